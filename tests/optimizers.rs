//! The optimizers of `[train.optimizer]` against independent references
//! (`tests/fixtures/optim/expected.safetensors`, made by `tests/fixtures/gen_optim.py`): AdamW
//! against `torch.optim.AdamW`, Adafactor against transformers' `Adafactor`, and 8-bit AdamW
//! against bitsandbytes' dynamic maps and a NumPy float32 implementation of its blockwise CUDA
//! kernel (bitsandbytes' own CPU optimizer rounds small moments through a lookup table, so it is
//! not the reference; see the script). Three steps on four parameters, one of them quantized.
//! Then, for every kind, a run checkpointed and resumed halfway ends bit-identical to an
//! uninterrupted one.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use diffalign::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffalign::optim::adamw8bit::{dequantize, dynamic_map};
use diffalign::optim::{AdafactorConfig, AdamW8bitConfig, AdamWConfig, Optimizer, OptimizerConfig};
use diffalign::rng::Rng;
use diffalign::train::checkpoint::{self, TrainState};
use diffalign::weights::VarBuilder;

const PARAMS: [&str; 4] = ["big", "small", "conv", "bias"];

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load("tests/fixtures/optim/expected.safetensors", &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The elements of `t` (any dtype) as f64, flat.
fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a - b| over the elements, after checking the shapes agree.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(t: &Tensor) -> f32 {
    flat(t).iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// The fixture's three steps with `config`, from its initial weights.
fn run_fixture(fx: &HashMap<String, Tensor>, config: OptimizerConfig) -> Optimizer {
    let vars = PARAMS
        .iter()
        .map(|k| (k.to_string(), Var::from_tensor(&fx[&format!("init.{k}")]).unwrap()))
        .collect();
    let mut opt = Optimizer::new(vars, config).unwrap();
    let lrs: Vec<f64> = fx["lr"].to_vec1().unwrap();
    for (t, lr) in lrs.iter().enumerate() {
        let grads: Vec<Tensor> = PARAMS
            .iter()
            .map(|k| fx[&format!("grad.{}.{k}", t + 1)].clone())
            .collect();
        opt.update(&grads, *lr).unwrap();
    }
    opt
}

fn state(opt: &Optimizer) -> HashMap<String, Tensor> {
    opt.state_tensors().into_iter().collect()
}

/// Checks every parameter's weights against `<prefix>.<param>` to `tol`.
fn check_weights(opt: &Optimizer, fx: &HashMap<String, Tensor>, prefix: &str, tol: f32) {
    for p in &opt.params {
        let want = &fx[&format!("{prefix}.{}", p.name)];
        let d = max_diff(&p.master, want);
        assert!(d <= tol, "{prefix}.{}: weights differ by {d}", p.name);
        assert_eq!(
            max_diff(&p.var.as_tensor().clone(), want),
            d,
            "the Var follows the master copy"
        );
    }
}

#[test]
fn adamw_matches_torch() {
    let fx = fixture();
    let opt = run_fixture(&fx, AdamWConfig::default().into());
    // f32 rounding only: torch divides sqrt(v) by sqrt(1 - beta2^t), we take sqrt(v / (1 - beta2^t)).
    check_weights(&opt, &fx, "adamw", 2e-6);
}

#[test]
fn the_dynamic_maps_are_bitsandbytes() {
    let fx = fixture();
    for (signed, key) in [(true, "map.signed"), (false, "map.unsigned")] {
        let ours = dynamic_map(signed);
        let theirs = flat(&fx[key]);
        let differ: Vec<(usize, f32, f32)> = ours
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, *a, *b))
            .collect();
        assert!(differ.is_empty(), "{key}: (index, ours, theirs) {differ:?}");
    }
}

#[test]
fn adamw8bit_matches_the_bitsandbytes_kernel() {
    let fx = fixture();
    let config = AdamW8bitConfig::default();
    let opt = run_fixture(&fx, OptimizerConfig::AdamW8bit(config));
    let st = state(&opt);
    // The same f32 operations in the same order as the reference: the codes agree exactly and
    // the weights to the last bit, up to a tolerance of one rounding in case a platform's sqrt
    // or division rounds differently.
    check_weights(&opt, &fx, "adamw8bit", 1e-6);
    // `big` (4,100 elements) is quantized: its codes and block scales, and the moments they give.
    for (m, signed) in [("m", true), ("v", false)] {
        let codes = &st[&format!("{m}.big")];
        assert_eq!(codes.dtype(), DType::U8);
        let want_codes = &fx[&format!("adamw8bit.{m}_codes.big")];
        let c: Vec<u8> = codes.flatten_all().unwrap().to_vec1().unwrap();
        let wc: Vec<u8> = want_codes.flatten_all().unwrap().to_vec1().unwrap();
        let differ = c.iter().zip(&wc).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{m}.big: {differ} of {} codes differ", c.len());
        let absmax = &st[&format!("{m}_absmax.big")];
        let want_absmax = &fx[&format!("adamw8bit.{m}_absmax.big")];
        assert_eq!(absmax.dims(), [17]);
        assert_eq!(flat(absmax), flat(want_absmax), "{m}_absmax.big");
        assert_eq!(flat(absmax)[1], 0.0, "the block of zero gradients keeps absmax 0");
        // Dequantized moments: ours against the reference's codes on bitsandbytes' map.
        let map = flat(&fx[if signed { "map.signed" } else { "map.unsigned" }]);
        let am = flat(want_absmax);
        let want: Vec<f32> = wc
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * am[i / 256])
            .collect();
        assert_eq!(
            flat(&dequantize(codes, absmax, signed).unwrap()),
            want,
            "{m}.big dequantized"
        );
    }
    // The small parameters keep f32 moments (bitsandbytes' min_8bit_size).
    for k in ["small", "conv", "bias"] {
        for m in ["m", "v"] {
            let got = &st[&format!("{m}.{k}")];
            assert_eq!(got.dtype(), DType::F32, "{m}.{k}");
            let want = &fx[&format!("adamw8bit.{m}.{k}")];
            let d = max_diff(got, want);
            assert!(d <= 1e-6 * max_abs(want), "{m}.{k}: differs by {d}");
        }
    }
}

#[test]
fn adafactor_matches_transformers() {
    let fx = fixture();
    for (prefix, config) in [
        ("adafactor", AdafactorConfig::default()),
        (
            "adafactor_b1wd",
            AdafactorConfig {
                beta1: Some(0.9),
                weight_decay: 1e-2,
                ..AdafactorConfig::default()
            },
        ),
    ] {
        let opt = run_fixture(&fx, OptimizerConfig::Adafactor(config));
        // f32 rounding: torch sums its means pairwise and fuses `add_(x, alpha)`; updates are
        // about lr (1e-2) in size, so 1e-6 on weights of size 1 is a relative 1e-4 of an update.
        check_weights(&opt, &fx, prefix, 1e-6);
        let st = state(&opt);
        let mut checked = 0;
        for (name, got) in &st {
            let want = &fx[&format!("{prefix}.{name}")];
            let d = max_diff(got, want);
            assert!(d <= 1e-5 * max_abs(want), "{prefix}.{name}: differs by {d}");
            checked += 1;
        }
        // Factored: big, small, conv (row + col); full: bias; plus m for each with beta1.
        let want = 7 + if config.beta1.is_some() { 4 } else { 0 };
        assert_eq!(
            checked,
            want,
            "{prefix}: state tensors {:?}",
            st.keys().collect::<Vec<_>>()
        );
        assert_eq!(st["v_row.conv"].dims(), [4, 3, 3], "rows of the last two dimensions");
        assert_eq!(st["v_col.conv"].dims(), [4, 3, 3]);
    }
}

/// Random parameters and gradients for `steps` steps, the same for every call.
fn random_problem(steps: usize) -> (Vec<(String, Tensor)>, Vec<Vec<Tensor>>) {
    let mut rng = Rng::new(5);
    let shapes: [(&str, &[usize]); 3] = [("big", &[20, 300]), ("mat", &[8, 6]), ("bias", &[6])];
    let init = shapes
        .iter()
        .map(|(k, s)| (k.to_string(), rng.randn(*s, &Device::Cpu).unwrap()))
        .collect();
    let grads = (0..steps)
        .map(|_| {
            shapes
                .iter()
                .map(|(_, s)| rng.randn(*s, &Device::Cpu).unwrap())
                .collect()
        })
        .collect();
    (init, grads)
}

fn fresh(init: &[(String, Tensor)], config: OptimizerConfig) -> Optimizer {
    let vars = init
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    Optimizer::new(vars, config).unwrap()
}

fn every_kind() -> [OptimizerConfig; 4] {
    [
        AdamWConfig::default().into(),
        OptimizerConfig::AdamW8bit(AdamW8bitConfig::default()),
        OptimizerConfig::Adafactor(AdafactorConfig::default()),
        OptimizerConfig::Adafactor(AdafactorConfig {
            beta1: Some(0.9),
            weight_decay: 0.1,
            ..AdafactorConfig::default()
        }),
    ]
}

#[test]
fn a_checkpointed_and_resumed_run_equals_an_uninterrupted_one_for_every_kind() {
    let (init, grads) = random_problem(6);
    let lr = |t: usize| 1e-2 * (1.0 + t as f64);
    let loop_state = |step| TrainState {
        step,
        epoch: 0,
        position: 0,
        world_size: 1,
        nonfinite_in_a_row: 0,
        loss_scale: None,
    };
    for config in every_kind() {
        let kind = config.kind();
        let mut straight = fresh(&init, config);
        for (t, g) in grads.iter().enumerate() {
            straight.update(g, lr(t)).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut first = fresh(&init, config);
        for (t, g) in grads[..3].iter().enumerate() {
            first.update(g, lr(t)).unwrap();
        }
        let ck = checkpoint::save(tmp.path(), &first, &loop_state(3)).unwrap();
        let mut resumed = fresh(&init, config);
        assert_eq!(checkpoint::load(&ck, &mut resumed).unwrap(), loop_state(3), "{kind}");
        assert_eq!(resumed.step, 3, "{kind}");
        for (t, g) in grads.iter().enumerate().skip(3) {
            resumed.update(g, lr(t)).unwrap();
        }
        for (a, b) in straight.params.iter().zip(&resumed.params) {
            assert_eq!(flat(&a.master), flat(&b.master), "{kind}: {}", a.name);
        }
        let (sa, sb) = (state(&straight), state(&resumed));
        assert_eq!(sa.len(), sb.len(), "{kind}");
        for (k, t) in &sa {
            assert!(values(t) == values(&sb[k]), "{kind}: state {k} differs after resuming");
        }
    }
}

#[test]
fn a_checkpoint_of_another_kind_is_refused_naming_both() {
    let (init, grads) = random_problem(1);
    let tmp = tempfile::tempdir().unwrap();
    let mut opt = fresh(&init, OptimizerConfig::AdamW8bit(AdamW8bitConfig::default()));
    opt.update(&grads[0], 1e-3).unwrap();
    let state = TrainState {
        step: 1,
        epoch: 0,
        position: 0,
        world_size: 1,
        nonfinite_in_a_row: 0,
        loss_scale: None,
    };
    let ck = checkpoint::save(tmp.path(), &opt, &state).unwrap();
    let mut other = fresh(&init, AdamWConfig::default().into());
    let err = checkpoint::load(&ck, &mut other).unwrap_err().to_string();
    assert!(
        err.contains("adamw8bit") && err.contains("train.optimizer is adamw"),
        "{err}"
    );
}

#[test]
fn state_bytes_per_parameter() {
    // 6,000 + 48 + 6 parameters: the quantized one holds 2 bytes per element plus 2 f32 scales
    // per 256-element block; the small ones 8 bytes (f32 m and v).
    let (init, _) = random_problem(0);
    let n: usize = init.iter().map(|(_, t)| t.elem_count()).sum();
    let bytes = |c: OptimizerConfig| fresh(&init, c).state_bytes();
    let [adamw, adamw8bit, adafactor, adafactor_m] = every_kind().map(bytes);
    assert_eq!(adamw, 8 * n);
    assert_eq!(adamw8bit, 2 * 6000 + 2 * 4 * 6000usize.div_ceil(256) + 8 * (48 + 6));
    // Adafactor: rows + columns for the matrices, full v for the bias; beta1 adds a full m.
    assert_eq!(adafactor, 4 * (20 + 300 + 8 + 6 + 6));
    assert_eq!(adafactor_m, adafactor + 4 * n);
    assert_eq!(fresh(&init, AdamWConfig::default().into()).master_bytes(), 4 * n);
}

#[test]
fn state_memory_on_the_unet_mid_benchmark_model() {
    // The UNet of ../shared/bench/unet-mid (37.5M parameters, random weights): the state each
    // kind really allocates, in bytes per trained parameter (printed for BENCHMARKS.md).
    let dir = std::path::Path::new("../shared/bench/unet-mid");
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = VarBuilder::random(0, DType::F32, &Device::Cpu, true);
    UNet2DConditionModel::new(&cfg, &dir.join("config.json"), vb.clone()).unwrap();
    let vars = vb.vars();
    let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let per_param = |config: OptimizerConfig| {
        let opt = Optimizer::new(vars.clone(), config).unwrap();
        assert_eq!(opt.master_bytes(), 4 * n);
        opt.state_bytes() as f64 / n as f64
    };
    let [adamw, adamw8bit, adafactor, adafactor_m] = every_kind().map(per_param);
    eprintln!(
        "unet-mid, {n} parameters, state bytes per parameter: adamw {adamw:.3}, adamw8bit \
         {adamw8bit:.3}, adafactor {adafactor:.4}, adafactor with beta1 {adafactor_m:.4}"
    );
    assert_eq!(adamw, 8.0);
    // The same from the shapes alone: 8-bit, two codes per element and two f32 scales per
    // 256-element block, or f32 m and v under 4,096 elements; Adafactor, f32 rows and columns
    // (a conv kernel [o, i, 3, 3] is factored over its 3x3 window, as transformers does) or a
    // full v for 1-D tensors.
    let (mut q8, mut fa) = (0usize, 0usize);
    for (_, v) in &vars {
        let (d, e) = (v.dims(), v.elem_count());
        q8 += if e >= 4096 { 2 * e + 8 * e.div_ceil(256) } else { 8 * e };
        fa += 4 * if d.len() >= 2 {
            e / d[d.len() - 1] + e / d[d.len() - 2]
        } else {
            e
        };
    }
    assert_eq!(adamw8bit, q8 as f64 / n as f64);
    assert_eq!(adafactor, fa as f64 / n as f64);
    assert_eq!(adafactor_m, (fa + 4 * n) as f64 / n as f64);
}
