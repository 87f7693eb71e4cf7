//! `diffalign bench --suite kernels`: every fused kernel of `diffalign::ops` against its composed
//! reference on the same device in the same run, forward and forward + backward, one JSON line
//! each: `{"op", "backend", "shape", "ours_ms", "baseline_ms", "max_abs_err", "max_rel_err"}`.
//!
//! With `--device wgpu` the kernels run as WGSL shaders (`"backend": "wgpu"`) and the baseline is
//! still the composed candle ops on the CPU; each line then adds `upload_ms` and `download_ms`,
//! the part of `ours_ms` spent moving inputs to the device and outputs back (mean per call over
//! the timed runs, all the op's kernel calls together).

use candle_core::{Device, Tensor, Var};
use diffalign::ops;
use diffalign::rng::Rng;

type OpFn = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// One benchmarked op: its inputs, the fused version and the reference.
struct Case {
    op: &'static str,
    shape: String,
    inputs: Vec<Tensor>,
    ours: OpFn,
    reference: OpFn,
}

/// The cases, at the sizes of the `unet-mid` benchmark UNet (latents 32x32, 128 channels).
fn cases(dev: &Device) -> anyhow::Result<Vec<Case>> {
    let mut rng = Rng::new(3);
    let mut randn = |shape: &[usize]| rng.randn(shape, dev);
    let (b, c, s) = (2, 128, 32);
    let mut out = vec![
        Case {
            op: "conv2d",
            shape: format!("x[{b},{c},{s},{s}] w[{c},{c},3,3] stride 1 pad 1"),
            inputs: vec![randn(&[b, c, s, s])?, (randn(&[c, c, 3, 3])? * 0.03)?],
            ours: Box::new(|x| ops::conv2d::conv2d(&x[0], &x[1], 1, 1)),
            reference: Box::new(|x| ops::conv2d::reference(&x[0], &x[1], 1, 1)),
        },
        Case {
            op: "conv2d_strided",
            shape: format!("x[{b},{c},{s},{s}] w[{c},{c},3,3] stride 2 pad 0 (input cut to the windows)"),
            inputs: vec![randn(&[b, c, s + 1, s + 1])?, (randn(&[c, c, 3, 3])? * 0.03)?],
            ours: Box::new(|x| ops::conv2d::conv2d(&x[0], &x[1], 2, 0)),
            reference: Box::new(|x| ops::conv2d::reference(&x[0], &x[1], 2, 0)),
        },
    ];
    let groups = 32;
    for silu in [false, true] {
        out.push(Case {
            op: if silu { "group_norm_silu" } else { "group_norm" },
            shape: format!("x[{b},{c},{s},{s}] groups {groups}"),
            inputs: vec![randn(&[b, c, s, s])?, randn(&[c])?, randn(&[c])?],
            ours: Box::new(move |x| ops::group_norm::group_norm(&x[0], &x[1], &x[2], groups, 1e-5, silu)),
            reference: Box::new(move |x| ops::group_norm::reference(&x[0], &x[1], &x[2], groups, 1e-5, silu)),
        });
    }
    let (tokens, width, heads, text) = (s * s, 128, 8, 77);
    out.extend([
        Case {
            op: "layer_norm",
            shape: format!("x[{b},{tokens},{width}]"),
            inputs: vec![randn(&[b, tokens, width])?, randn(&[width])?, randn(&[width])?],
            ours: Box::new(|x| ops::layer_norm::layer_norm(&x[0], &x[1], &x[2], 1e-5)),
            reference: Box::new(|x| ops::layer_norm::reference(&x[0], &x[1], &x[2], 1e-5)),
        },
        Case {
            op: "softmax",
            shape: format!("x[{},{tokens},{tokens}]", b * heads),
            inputs: vec![(randn(&[b * heads, tokens, tokens])? * 3.0)?],
            ours: Box::new(|x| ops::softmax::softmax(&x[0])),
            reference: Box::new(|x| ops::softmax::reference(&x[0])),
        },
    ]);
    let d = width / heads;
    for (op, lk) in [("attention_self", tokens), ("attention_cross", text)] {
        out.push(Case {
            op,
            shape: format!("q[{b},{heads},{tokens},{d}] k,v[{b},{heads},{lk},{d}]"),
            inputs: vec![
                randn(&[b, heads, tokens, d])?,
                randn(&[b, heads, lk, d])?,
                randn(&[b, heads, lk, d])?,
            ],
            ours: Box::new(move |x| ops::attention::attention(&x[0], &x[1], &x[2], 1.0 / (d as f64).sqrt(), None)),
            reference: Box::new(move |x| ops::attention::reference(&x[0], &x[1], &x[2], 1.0 / (d as f64).sqrt(), None)),
        });
    }
    // Causal self-attention at the sizes of `benches/llama-small` (batch 4, 256 tokens, 8 heads
    // of 64): one [1, 1, T, T] mask shared by every slice (no gradient).
    let (lm_b, lm_heads, lm_t, lm_d) = (4, 8, 256, 64);
    let causal: Vec<f32> = (0..lm_t * lm_t)
        .map(|e| if e % lm_t > e / lm_t { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, lm_t, lm_t), dev)?;
    let lm_scale = 1.0 / (lm_d as f64).sqrt();
    let mask = causal.clone();
    out.push(Case {
        op: "attention_causal",
        shape: format!("q,k,v[{lm_b},{lm_heads},{lm_t},{lm_d}] mask[1,1,{lm_t},{lm_t}]"),
        inputs: vec![
            randn(&[lm_b, lm_heads, lm_t, lm_d])?,
            randn(&[lm_b, lm_heads, lm_t, lm_d])?,
            randn(&[lm_b, lm_heads, lm_t, lm_d])?,
        ],
        ours: Box::new(move |x| ops::attention::attention(&x[0], &x[1], &x[2], lm_scale, Some(&mask))),
        reference: Box::new(move |x| ops::attention::reference(&x[0], &x[1], &x[2], lm_scale, Some(&causal))),
    });
    out.push(Case {
        op: "per_sample_mse",
        shape: "a,b[8,4,64,64]".into(),
        inputs: vec![randn(&[8, 4, 64, 64])?, randn(&[8, 4, 64, 64])?],
        ours: Box::new(|x| ops::mse::per_sample_mse(&x[0], &x[1])),
        reference: Box::new(|x| ops::mse::reference(&x[0], &x[1])),
    });
    Ok(out)
}

/// The gradients of `sum(f(inputs) * r)` with respect to every input.
fn gradients(f: &OpFn, inputs: &[Tensor], r: &Tensor) -> anyhow::Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&xs)? * r)?.sum_all()?.backward()?;
    xs.iter()
        .map(|x| {
            grads
                .get(x)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("an input got no gradient"))
        })
        .collect()
}

/// Mean transfer time per call of `f` over its warm-up and `repeats` runs, as
/// `(upload_ms, download_ms)`: `None` on the CPU backend.
struct Transfers {
    #[cfg(feature = "wgpu")]
    before: Option<ops::wgpu::TransferTotals>,
}

impl Transfers {
    fn start() -> Self {
        Transfers {
            #[cfg(feature = "wgpu")]
            before: (ops::backend() == ops::Backend::Wgpu).then(ops::wgpu::transfer_totals),
        }
    }

    fn per_call_ms(&self, _calls: usize) -> Option<(f64, f64)> {
        #[cfg(feature = "wgpu")]
        if let Some(b) = self.before {
            let a = ops::wgpu::transfer_totals();
            let n = _calls as f64;
            return Some((
                (a.upload_s - b.upload_s) * 1e3 / n,
                (a.download_s - b.download_s) * 1e3 / n,
            ));
        }
        None
    }
}

/// The median time of `f` (see `median_secs`) and, on wgpu, its mean transfer time per call.
fn timed(
    dev: &Device,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, Option<(f64, f64)>)> {
    let transfers = Transfers::start();
    let secs = super::bench::median_secs(dev, repeats, &mut f)?;
    Ok((secs, transfers.per_call_ms(repeats + 1)))
}

/// Runs every case whose op name starts with `only` (all when `None`), forward and backward,
/// printing one JSON line each.
pub fn run(dev: &Device, repeats: usize, only: Option<&str>) -> anyhow::Result<()> {
    let backend = if dev.is_cuda() {
        // On a CUDA device "ours" are the CUDA kernels (`BenchArgs::adjust_kernels` turns them on).
        "cuda"
    } else if dev.is_cpu() {
        ops::backend().name()
    } else {
        anyhow::bail!(
            "--suite kernels: the fused kernels exist for the CPU, CUDA and wgpu (use --device cpu, cuda or wgpu)"
        );
    };
    let cases: Vec<Case> = cases(dev)?
        .into_iter()
        .filter(|c| only.is_none_or(|p| c.op.starts_with(p)))
        .collect();
    if cases.is_empty() {
        anyhow::bail!("--op: no kernel case starts with {:?}", only.unwrap_or_default());
    }
    for case in cases {
        let (ours, reference) = ((case.ours)(&case.inputs)?, (case.reference)(&case.inputs)?);
        let (abs, rel) = ops::compare(&ours, &reference)?;
        let (ours_s, transfer) = timed(dev, repeats, || {
            (case.ours)(&case.inputs)?;
            Ok(())
        })?;
        let base_s = super::bench::median_secs(dev, repeats, || {
            (case.reference)(&case.inputs)?;
            Ok(())
        })?;
        line(
            &format!("{}.forward", case.op),
            backend,
            &case.shape,
            (ours_s, base_s),
            (abs, rel),
            transfer,
        );

        let r = Rng::new(4).randn(reference.dims(), dev)?;
        let (ga, gb) = (
            gradients(&case.ours, &case.inputs, &r)?,
            gradients(&case.reference, &case.inputs, &r)?,
        );
        let (mut abs, mut rel) = (0f64, 0f64);
        for (a, b) in ga.iter().zip(&gb) {
            let (x, y) = ops::compare(a, b)?;
            (abs, rel) = (abs.max(x), rel.max(y));
        }
        let (ours_s, transfer) = timed(dev, repeats, || {
            gradients(&case.ours, &case.inputs, &r)?;
            Ok(())
        })?;
        let base_s = super::bench::median_secs(dev, repeats, || {
            gradients(&case.reference, &case.inputs, &r)?;
            Ok(())
        })?;
        line(
            &format!("{}.backward", case.op),
            backend,
            &case.shape,
            (ours_s, base_s),
            (abs, rel),
            transfer,
        );
    }
    Ok(())
}

/// One JSON line; `.backward` timings are forward plus backward. `transfer` (wgpu only) adds
/// `upload_ms` and `download_ms`.
fn line(
    op: &str,
    backend: &str,
    shape: &str,
    (ours_s, base_s): (f64, f64),
    (abs, rel): (f64, f64),
    transfer: Option<(f64, f64)>,
) {
    let mut json = serde_json::json!({
        "op": op,
        "backend": backend,
        "shape": shape,
        "ours_ms": ours_s * 1e3,
        "baseline_ms": base_s * 1e3,
        "max_abs_err": abs,
        "max_rel_err": rel,
    });
    if let Some((up, down)) = transfer {
        json["upload_ms"] = up.into();
        json["download_ms"] = down.into();
    }
    println!("{json}");
}
