//! The samplers of issue 21 (PNDM, DPM-Solver++ / SDE-DPM-Solver++, LMS, UniPC, DDPM, Euler
//! with Karras and exponential sigmas) against diffusers 0.42: timestep grids, sigmas and step
//! loops (`tests/fixtures/samplers/expected.safetensors`) and whole images on the tiny
//! pipelines (`images.safetensors`), both made by `tests/fixtures/gen_samplers.py`; errors;
//! and the contract that a perfect model brings every sampler back to its x0.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::*;
use diffalign::rng::Rng;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::{GenerateRequest, StableDiffusionPipeline};
use diffalign::schedulers::{
    AlgorithmType, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler, Scheduler,
    SchedulerConfig, SchedulerKind, TimestepSpacing, UniPCMultistepScheduler,
};
use serde_json::Value;

/// Relative tolerance (against max(1, max |want|) over the tensor) on timesteps, sigmas and
/// samples: float32 arithmetic in diffusers' order, a few ulps of the largest value apart where
/// the order of a sum or the libm differs (a sample element can be a small difference of large
/// terms, so the scale is the tensor's, not the element's).
const SAMPLER_RTOL: f32 = 1e-5;

/// A fixture file of gen_samplers.py: tensors, cases and the configs diffusers saved.
struct Fixture {
    tensors: HashMap<String, Tensor>,
    cases: Vec<Value>,
    configs: Vec<SchedulerConfig>,
}

impl Fixture {
    fn load(file: &str) -> Self {
        let path = own_fixtures().join("samplers").join(file);
        let meta = metadata(&path);
        let cases: Vec<Value> = serde_json::from_str(&meta["cases"]).unwrap();
        let mut configs = Vec::new();
        while let Some(text) = meta.get(&format!("config.{}", configs.len())) {
            let source = format!("{file}: config.{}", configs.len());
            configs.push(SchedulerConfig::from_json(text, source).unwrap());
        }
        Fixture {
            tensors: load_on_device(&path),
            cases,
            configs,
        }
    }

    fn cases<'a>(&'a self, kinds: &'a [&'a str]) -> impl Iterator<Item = (&'a str, &'a SchedulerConfig, &'a Value)> {
        self.cases
            .iter()
            .filter(move |c| kinds.contains(&c["kind"].as_str().unwrap()))
            .map(|c| {
                (
                    c["name"].as_str().unwrap(),
                    &self.configs[c["config"].as_u64().unwrap() as usize],
                    c,
                )
            })
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("no tensor {key}"))
    }
}

fn steps_of(case: &Value) -> usize {
    case["steps"].as_u64().unwrap() as usize
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_close_rel(what: &str, got: &Tensor, want: &Tensor, rtol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let want = f32s(want);
    let tol = rtol * want.iter().fold(1.0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in f32s(got).iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

fn vec_tensor(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &candle_core::Device::Cpu).unwrap()
}

/// The sigmas of a built sampler of `kind`, where the class has them.
fn sigmas_of(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Option<Vec<f64>> {
    Some(match kind {
        SchedulerKind::EulerDiscrete => EulerDiscreteScheduler::from_config(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        SchedulerKind::LmsDiscrete => LMSDiscreteScheduler::from_config(cfg, steps).unwrap().sigmas().to_vec(),
        SchedulerKind::DpmSolverMultistep => DPMSolverMultistepScheduler::from_config(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        SchedulerKind::UniPcMultistep => UniPCMultistepScheduler::from_config(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Scheduler-level parity

#[test]
fn sampler_timesteps_sigmas_and_init_noise_sigma_match_diffusers() {
    let fx = Fixture::load("expected.safetensors");
    // Every key diffusers writes for these classes is read (no spurious unknown-key warning).
    for cfg in &fx.configs {
        assert_eq!(cfg.unknown_keys(), Vec::<String>::new(), "{}", cfg.source.display());
    }
    let mut n = 0;
    for (name, cfg, case) in fx.cases(&["timesteps", "loop"]) {
        let steps = steps_of(case);
        let kind = cfg.kind(None).unwrap();
        let sched = cfg.build(None, steps).unwrap();
        let want = fx.get(&format!("{name}.timesteps"));
        let got = vec_tensor(sched.timesteps());
        if want.dtype() == DType::I64 {
            assert_eq!(sched.timesteps(), f64s(want).as_slice(), "{name}: timesteps");
        } else {
            assert_close_rel(&format!("{name}: timesteps"), &got, want, SAMPLER_RTOL);
        }
        if let Some(sigmas) = sigmas_of(cfg, kind, steps) {
            let want = fx.get(&format!("{name}.sigmas"));
            assert_close_rel(&format!("{name}: sigmas"), &vec_tensor(&sigmas), want, SAMPLER_RTOL);
        }
        let want = f64s(fx.get(&format!("{name}.init_noise_sigma")))[0];
        assert!(
            (sched.init_noise_sigma() - want).abs() <= 1e-5 * want.max(1.0),
            "{name}: init_noise_sigma {} vs {want}",
            sched.init_noise_sigma()
        );
        n += 1;
    }
    assert!(n > 150, "only {n} cases");
}

/// Runs one step of a built sampler with the fixture's noise where the sampler draws noise.
enum Built {
    Sde(DPMSolverMultistepScheduler),
    Ddpm(DDPMScheduler),
    Other(Box<dyn Scheduler>),
}

impl Built {
    fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        match cfg.kind(None).unwrap() {
            SchedulerKind::DpmSolverMultistep if cfg.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus => {
                Built::Sde(DPMSolverMultistepScheduler::from_config(cfg, steps).unwrap())
            }
            SchedulerKind::Ddpm => Built::Ddpm(DDPMScheduler::from_config(cfg, steps).unwrap()),
            _ => Built::Other(cfg.build(None, steps).unwrap()),
        }
    }

    fn sched(&self) -> &dyn Scheduler {
        match self {
            Built::Sde(s) => s,
            Built::Ddpm(s) => s,
            Built::Other(s) => s.as_ref(),
        }
    }

    fn step(&mut self, mo: &Tensor, i: usize, x: &Tensor, noise: &Tensor) -> Tensor {
        match self {
            Built::Sde(s) => s.step_with_noise(mo, i, x, Some(noise)).unwrap(),
            Built::Ddpm(s) => s.step_with_noise(mo, i, x, Some(noise)).unwrap(),
            Built::Other(s) => s.step(mo, i, x, &mut Rng::new(0)).unwrap(),
        }
    }
}

#[test]
fn sampler_step_loops_match_diffusers() {
    let fx = Fixture::load("expected.safetensors");
    let (sample0, outputs, noises) = (
        fx.get("loop.sample0"),
        fx.get("loop.model_outputs"),
        fx.get("loop.noises"),
    );
    let mut n = 0;
    for (name, cfg, case) in fx.cases(&["loop"]) {
        let steps = steps_of(case);
        let rtol = SAMPLER_RTOL;
        let mut built = Built::new(cfg, steps);
        let samples = fx.get(&format!("{name}.samples"));
        let scaled = fx.tensors.get(&format!("{name}.scaled"));
        let mut x = sample0.affine(built.sched().init_noise_sigma(), 0.0).unwrap();
        assert_close_rel(&format!("{name}: start"), &x, &samples.get(0).unwrap(), rtol);
        let calls = built.sched().timesteps().len();
        assert_eq!(calls + 1, samples.dim(0).unwrap(), "{name}: model calls");
        for i in 0..calls {
            let input = built.sched().scale_model_input(&x, i).unwrap();
            match scaled {
                Some(want) => assert_close_rel(&format!("{name}: scaled {i}"), &input, &want.get(i).unwrap(), rtol),
                None => assert_close(&format!("{name}: scaled {i}"), &input, &x, 0.0),
            }
            x = built.step(&outputs.get(i).unwrap(), i, &x, &noises.get(i).unwrap());
            assert_close_rel(&format!("{name}: step {i}"), &x, &samples.get(i + 1).unwrap(), rtol);
        }
        n += 1;
    }
    assert!(n >= 50, "only {n} loop cases");
}

// ---------------------------------------------------------------------------------------------
// 2. Whole images

#[test]
fn sampler_images_match_diffusers_on_tiny_pipelines() {
    let fx = Fixture::load("images.safetensors");
    let mut pipelines: HashMap<String, (StableDiffusionPipeline, HashMap<String, String>, Tensor)> = HashMap::new();
    let mut n = 0;
    for (name, cfg, case) in fx.cases(&["image"]) {
        let key = case["pipeline"].as_str().unwrap().to_string();
        let (pipe, meta, noise) = pipelines.entry(key.clone()).or_insert_with(|| {
            let dir = match key.as_str() {
                "sd15" | "turbo" => shared_fixtures().join(&key),
                _ => own_fixtures().join(&key),
            };
            let reference = dir.join("reference.safetensors");
            let pipe = StableDiffusionPipeline::load(
                &PipelineSources {
                    root: dir.clone(),
                    ..Default::default()
                },
                &load_options(),
            )
            .unwrap();
            let noise = load_on_device(&reference)["pipe.init_noise"].clone();
            (pipe, metadata(&reference), noise)
        });
        // The checkpoint's own scheduler class: diffusers' saved config of the swapped one.
        pipe.scheduler_config = cfg.clone();
        let req = GenerateRequest {
            prompts: serde_json::from_str(&meta["prompts"]).unwrap(),
            negative_prompts: serde_json::from_str(&meta["negative_prompts"]).unwrap(),
            steps: steps_of(case),
            guidance: meta["guidance_scale"].parse().unwrap(),
            height: meta["height"].parse().unwrap(),
            width: meta["width"].parse().unwrap(),
            init_noise: noise.clone(),
            scheduler: None,
            seed: case["seed"].as_u64().unwrap(),
            time_ids: None,
        };
        let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
        let want = fx.get(&format!("images.{name}")).to_dtype(DType::F32).unwrap();
        eprintln!("images.{name}: max abs diff {}", max_abs_diff(&out.images, &want));
        assert_close(&format!("images.{name}"), &out.images, &want, IMAGE_ATOL);
        n += 1;
    }
    assert_eq!(n, 20, "image cases");
}

// ---------------------------------------------------------------------------------------------
// 3. Configs, names and errors

fn err_text<T>(r: diffalign::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn sd_config(extra: &[(&str, Value)]) -> SchedulerConfig {
    let mut v = serde_json::json!({
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1,
    });
    for (k, x) in extra {
        v[*k] = x.clone();
    }
    SchedulerConfig::from_json(&v.to_string(), "scheduler_config.json").unwrap()
}

#[test]
fn config_reads_python_json_non_finite_floats() {
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
        "sigma_max": Infinity, "beta_start": 0.00085, "note": "-Infinity stays a string"}"#;
    let cfg = SchedulerConfig::from_json(text, "scheduler_config.json").unwrap();
    assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
    assert_eq!(cfg.sigma_max, Some(f64::INFINITY));
    assert_eq!(cfg.other["note"], "-Infinity stays a string");
    let bad = SchedulerConfig::from_json(r#"{"solver_order": -Infinity}"#, "x.json");
    assert!(err_text(bad).contains("solver_order"));
    let bad = SchedulerConfig::from_json(r#"{"solver_p": {"a": 1}}"#, "x.json");
    assert!(err_text(bad).contains("solver_p"));
}

#[test]
fn scheduler_kind_parses_new_sampler_names() {
    for (name, kind) in [
        ("pndm", SchedulerKind::Pndm),
        ("PLMS", SchedulerKind::Pndm),
        ("PNDMScheduler", SchedulerKind::Pndm),
        ("dpm++", SchedulerKind::DpmSolverMultistep),
        ("dpm_solver", SchedulerKind::DpmSolverMultistep),
        ("DPMSolverMultistepScheduler", SchedulerKind::DpmSolverMultistep),
        ("lms", SchedulerKind::LmsDiscrete),
        ("unipc", SchedulerKind::UniPcMultistep),
        ("UniPCMultistepScheduler", SchedulerKind::UniPcMultistep),
        ("ddpm", SchedulerKind::Ddpm),
    ] {
        assert_eq!(name.parse::<SchedulerKind>().unwrap(), kind, "{name}");
        assert_eq!(kind.cli_name().parse::<SchedulerKind>().unwrap(), kind);
    }
    let e = err_text("heun".parse::<SchedulerKind>());
    assert!(e.contains("pndm") && e.contains("dpm++") && e.contains("unipc"), "{e}");
}

#[test]
fn unsupported_sampler_options_are_errors_naming_the_key() {
    let pndm = |extra: &[(&str, Value)]| {
        let mut c = sd_config(extra);
        c.class_name = Some("PNDMScheduler".into());
        c
    };
    let e = err_text(pndm(&[]).build(None, 3));
    assert!(e.contains("skip_prk_steps") && e.contains("at least 4 steps"), "{e}");
    assert_eq!(pndm(&[]).build(None, 4).unwrap().timesteps().len(), 13);
    let e = err_text(
        pndm(&[
            ("skip_prk_steps", Value::Bool(true)),
            ("prediction_type", "sample".into()),
        ])
        .build(None, 10),
    );
    assert!(e.contains("prediction_type"), "{e}");
    for (key, value, kind) in [
        ("solver_order", Value::from(4), SchedulerKind::DpmSolverMultistep),
        ("algorithm_type", "dpmsolver".into(), SchedulerKind::DpmSolverMultistep),
        ("use_lu_lambdas", Value::Bool(true), SchedulerKind::DpmSolverMultistep),
        (
            "variance_type",
            "learned_range".into(),
            SchedulerKind::DpmSolverMultistep,
        ),
        ("use_beta_sigmas", Value::Bool(true), SchedulerKind::EulerDiscrete),
        ("use_exponential_sigmas", Value::Bool(true), SchedulerKind::LmsDiscrete),
        ("predict_x0", Value::Bool(false), SchedulerKind::UniPcMultistep),
        ("solver_type", "heun".into(), SchedulerKind::UniPcMultistep),
        ("variance_type", "learned".into(), SchedulerKind::Ddpm),
    ] {
        let mut extra = vec![(key, value)];
        if key == "use_exponential_sigmas" {
            extra.push(("use_karras_sigmas", Value::Bool(true)));
        }
        let e = err_text(sd_config(&extra).build(Some(kind), 10));
        assert!(
            e.contains("scheduler_config.json") && e.contains(key),
            "{kind} {key}: {e}"
        );
    }
}

#[test]
fn multistep_samplers_reject_steps_out_of_order() {
    let cfg = sd_config(&[]);
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &device()).unwrap();
    for kind in [
        SchedulerKind::Pndm,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::LmsDiscrete,
        SchedulerKind::UniPcMultistep,
    ] {
        let cfg = SchedulerConfig {
            skip_prk_steps: true,
            ..cfg.clone()
        };
        let mut s = cfg.build(Some(kind), 5).unwrap();
        let mut rng = Rng::new(0);
        s.step(&x, 0, &x, &mut rng).unwrap();
        let e = err_text(s.step(&x, 2, &x, &mut rng));
        assert!(e.contains("expected step 1, got 2"), "{kind}: {e}");
        // Step 0 starts over.
        s.step(&x, 0, &x, &mut rng).unwrap();
        s.step(&x, 1, &x, &mut rng).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The contract: a perfect model brings every sampler back to x0

#[test]
fn every_new_sampler_returns_x0_for_a_perfect_model() {
    let dev = device();
    let mut rng = Rng::new(11);
    let x0 = rng.randn((2, 4, 4, 4), &dev).unwrap().affine(0.5, 0.0).unwrap();
    let eps = rng.randn((2, 4, 4, 4), &dev).unwrap();
    for (kind, extra) in [
        (SchedulerKind::Pndm, vec![("skip_prk_steps", Value::Bool(true))]),
        (
            SchedulerKind::DpmSolverMultistep,
            vec![("solver_order", Value::from(3))],
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            vec![("algorithm_type", "sde-dpmsolver++".into())],
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            vec![("use_karras_sigmas", Value::Bool(true))],
        ),
        (SchedulerKind::LmsDiscrete, vec![]),
        (
            SchedulerKind::LmsDiscrete,
            vec![("use_karras_sigmas", Value::Bool(true))],
        ),
        (SchedulerKind::UniPcMultistep, vec![("solver_order", Value::from(3))]),
        (SchedulerKind::Ddpm, vec![("clip_sample", Value::Bool(false))]),
        (
            SchedulerKind::EulerDiscrete,
            vec![("use_exponential_sigmas", Value::Bool(true))],
        ),
    ] {
        for pred in ["epsilon", "v_prediction"] {
            for spacing in [
                TimestepSpacing::Leading,
                TimestepSpacing::Trailing,
                TimestepSpacing::Linspace,
            ] {
                // PNDM moves by T div N whatever the spacing, off a trailing or linspace grid; and
                // its second step converts a velocity predicted at t_1 with ᾱ and sample of t_0.
                if kind == SchedulerKind::Pndm && (spacing != TimestepSpacing::Leading || pred != "epsilon") {
                    continue;
                }
                for steps in [1, 3, 8, 30] {
                    let mut extra = extra.clone();
                    extra.push(("prediction_type", pred.into()));
                    extra.push(("set_alpha_to_one", Value::Bool(true)));
                    let cfg = SchedulerConfig {
                        timestep_spacing: Some(spacing),
                        ..sd_config(&extra)
                    };
                    let what = format!("{kind} {extra:?} {spacing:?} {steps} steps");
                    let schedule = diffalign::schedulers::NoiseSchedule::from_config(&cfg).unwrap();
                    let mut sched = cfg.build(Some(kind), steps).unwrap();
                    let ts = sched.timesteps().to_vec();
                    // (sqrt(ᾱ), sqrt(1−ᾱ)) of the sample at call i, in the sampler's own space.
                    let sigmas = sigmas_of(&cfg, kind, steps);
                    let level = |i: usize| -> (f64, f64) {
                        match (&sigmas, kind) {
                            (Some(s), SchedulerKind::EulerDiscrete | SchedulerKind::LmsDiscrete) => (1.0, s[i]),
                            (Some(s), _) => {
                                let a = 1.0 / (s[i] * s[i] + 1.0);
                                (a.sqrt(), (1.0 - a).sqrt())
                            }
                            (None, _) => {
                                let a = schedule.alphas_cumprod()[ts[i] as usize];
                                (a.sqrt(), (1.0 - a).sqrt())
                            }
                        }
                    };
                    let (sa, sb) = level(0);
                    let mut x = (x0.affine(sa, 0.0).unwrap() + eps.affine(sb, 0.0).unwrap()).unwrap();
                    for i in 0..ts.len() {
                        let (sa, sb) = level(i);
                        let implied = ((&x - x0.affine(sa, 0.0).unwrap()).unwrap().affine(1.0 / sb, 0.0)).unwrap();
                        let out = match pred {
                            "epsilon" => implied,
                            _ => {
                                let norm = (sa * sa + sb * sb).sqrt();
                                (implied.affine(sa / norm, 0.0).unwrap() - x0.affine(sb / norm, 0.0).unwrap()).unwrap()
                            }
                        };
                        x = sched.step(&out, i, &x, &mut rng).unwrap();
                    }
                    assert_close(&what, &x, &x0, 2e-4);
                }
            }
        }
    }
}
