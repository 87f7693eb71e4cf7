//! The optimizers and schedules of `diffalign::optim` against PyTorch's and diffusers' update
//! rules, written out in f64.

use candle_core::{DType, Device, Tensor};
use diffalign::optim::{AdamWConfig, LrSchedule, Optimizer, Sgd};

#[test]
fn lr_schedules_follow_diffusers() {
    assert_eq!(LrSchedule::Constant.lr(1.0, 3, 10, 100), 1.0);
    assert_eq!(LrSchedule::ConstantWithWarmup.lr(1.0, 5, 10, 100), 0.5);
    assert_eq!(LrSchedule::ConstantWithWarmup.lr(1.0, 50, 10, 100), 1.0);
    assert!((LrSchedule::Cosine.lr(1.0, 55, 10, 100) - 0.5).abs() < 1e-12);
    assert!(LrSchedule::Cosine.lr(1.0, 100, 10, 100).abs() < 1e-12);
}

#[test]
fn adamw_matches_pytorch_formula() {
    // One parameter, two steps, against torch.optim.AdamW's update written out in f64.
    let var = candle_core::Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = Optimizer::new(vec![("w".into(), var.clone())], cfg).unwrap();
    let grads = [[0.5f64, -1.0], [0.25, 2.0]];
    let lr = 0.1;
    let (mut w, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
    for (step, g) in grads.iter().enumerate() {
        opt.update(&[Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap()], lr)
            .unwrap();
        let t = (step + 1) as i32;
        for i in 0..2 {
            w[i] *= 1.0 - lr * 0.01;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            w[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
    }
    let got: Vec<f32> = var.as_tensor().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    for i in 0..2 {
        assert!((got[i] as f64 - w[i]).abs() < 1e-6, "w[{i}]: {} vs {}", got[i], w[i]);
    }
}

#[test]
fn sgd_nesterov_matches_torch_update_rule() {
    // torch.optim.SGD(momentum=0.9, nesterov=True): b1 = g1, p1 = p0 − lr(g1 + m·b1);
    // b2 = m·b1 + g2, p2 = p1 − lr(g2 + m·b2).
    let dev = Device::Cpu;
    let p0 = Tensor::new(&[1.0f64, -2.0], &dev).unwrap();
    let (g1, g2) = (
        Tensor::new(&[0.5f64, 0.25], &dev).unwrap(),
        Tensor::new(&[-1.0f64, 2.0], &dev).unwrap(),
    );
    let mut sgd = Sgd::new(0.1, 0.9, true);
    let p1 = sgd.step(&p0, &g1).unwrap();
    let p2 = sgd.step(&p1, &g2).unwrap();
    let p1_want = [1.0 - 0.1 * (0.5 + 0.9 * 0.5), -2.0 - 0.1 * (0.25 + 0.9 * 0.25)];
    let b2 = [0.9 * 0.5 - 1.0, 0.9 * 0.25 + 2.0];
    let p2_want = [
        p1_want[0] - 0.1 * (-1.0 + 0.9 * b2[0]),
        p1_want[1] - 0.1 * (2.0 + 0.9 * b2[1]),
    ];
    for (got, want) in [(p1, p1_want), (p2, p2_want)] {
        let got = got.to_vec1::<f64>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "got {got:?}, want {want:?}");
        }
    }
}
