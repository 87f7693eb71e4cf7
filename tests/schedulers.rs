//! Schedulers against diffusers: the shared fixtures (`../shared/fixtures/{sd15,turbo}`), the
//! project's own cases (`tests/fixtures/schedulers/expected.safetensors`, made by
//! `tests/fixtures/gen_schedulers.py`), error messages, and one contract every sampler meets.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use diffalign::rng::Rng;
use diffalign::schedulers::{
    DDIMInverseScheduler, DDIMScheduler, DdimSettings, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    NoiseSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing, TimestepType,
};
use serde_json::Value;

/// Relative tolerance (against max(1, |want|)) on float32 scheduler outputs.
const SCHED_RTOL: f32 = 1e-5;
/// Absolute tolerance on ᾱ and betas (float32 values in [0, 1]).
const SCHEDULE_ATOL: f32 = 1e-7;
/// Relative tolerance on betas rescaled to zero terminal SNR (see the test).
const ZERO_SNR_BETAS_RTOL: f32 = 5e-5;

fn assert_close_rel(what: &str, got: &Tensor, want: &Tensor, rtol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        let tol = rtol * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

use common::f64s;

fn f64_tensor(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
}

fn sd_config() -> SchedulerConfig {
    SchedulerConfig::from_file(common::shared_fixtures().join("sd15/scheduler/scheduler_config.json")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Shared fixtures

#[test]
fn alphas_cumprod_match_shared_fixtures() {
    for case in ["sd15", "turbo"] {
        let dir = common::shared_fixtures().join(case);
        let cfg = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json")).unwrap();
        let reference = common::load(&dir.join("reference.safetensors"));
        let schedule = NoiseSchedule::from_config(&cfg).unwrap();
        let got = f64_tensor(schedule.alphas_cumprod());
        common::assert_close(
            &format!("{case}: alphas_cumprod"),
            &got,
            &reference["sched.alphas_cumprod"],
            SCHEDULE_ATOL,
        );
    }
}

#[test]
fn add_noise_matches_shared_fixtures_per_sample() {
    // The fixtures hold each pipeline scheduler's own add_noise: DDPM form for DDIM (sd15),
    // sigma space x0 + σ_t·noise for Euler (turbo).
    for case in ["sd15", "turbo"] {
        let dir = common::shared_fixtures().join(case);
        let cfg = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json")).unwrap();
        let r = common::load_on_device(&dir.join("reference.safetensors"));
        let schedule = NoiseSchedule::from_config(&cfg).unwrap();
        let (x0, noise, t) = (
            &r["sched.add_noise.x0"],
            &r["sched.add_noise.noise"],
            &r["sched.add_noise.t"],
        );
        let got = match cfg.kind(None).unwrap() {
            SchedulerKind::EulerDiscrete => schedule.add_noise_sigma(x0, noise, t).unwrap(),
            _ => schedule.add_noise(x0, noise, t).unwrap(),
        };
        assert_close_rel(
            &format!("{case}: add_noise"),
            &got,
            &r["sched.add_noise.out"],
            SCHED_RTOL,
        );
        // The two forms differ by the factor sqrt(ᾱ_t).
        let ddpm = schedule.add_noise(x0, noise, t).unwrap();
        let sigma = schedule.add_noise_sigma(x0, noise, t).unwrap();
        let ts = f64s(t);
        for (b, &tb) in ts.iter().enumerate() {
            let scale = schedule.alphas_cumprod()[tb as usize].sqrt();
            let want = sigma.get(b).unwrap().affine(scale, 0.0).unwrap();
            assert_close_rel(
                &format!("{case}: sigma form {b}"),
                &ddpm.get(b).unwrap(),
                &want,
                SCHED_RTOL,
            );
        }
    }
}

#[test]
fn inference_timesteps_match_shared_fixtures() {
    for case in ["sd15", "turbo"] {
        let dir = common::shared_fixtures().join(case);
        let cfg = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json")).unwrap();
        let meta = common::metadata(&dir.join("reference.safetensors"));
        let steps: usize = meta["steps"].parse().unwrap();
        let r = common::load(&dir.join("reference.safetensors"));
        let sched = cfg.build(None, steps).unwrap();
        assert_eq!(
            sched.timesteps(),
            f64s(&r["sched.inference_timesteps"]).as_slice(),
            "{case}"
        );
    }
}

#[test]
fn euler_trailing_one_step_is_turbo_timestep_999() {
    let cfg =
        SchedulerConfig::from_file(common::shared_fixtures().join("turbo/scheduler/scheduler_config.json")).unwrap();
    let sched = cfg.build(None, 1).unwrap();
    assert_eq!(sched.timesteps(), &[999.0]);
    let sigma_max = NoiseSchedule::from_config(&cfg).unwrap().train_sigmas()[999];
    assert_eq!(sched.init_noise_sigma(), sigma_max);
}

// ---------------------------------------------------------------------------------------------
// 2. Own diffusers cases

struct Expected {
    tensors: HashMap<String, Tensor>,
    cases: Vec<Value>,
    configs: Vec<SchedulerConfig>,
}

impl Expected {
    fn load() -> Self {
        let path = common::own_fixtures().join("schedulers/expected.safetensors");
        let meta = common::metadata(&path);
        let cases: Vec<Value> = serde_json::from_str(&meta["cases"]).unwrap();
        let configs: Vec<Value> = serde_json::from_str(&meta["configs"]).unwrap();
        let configs = configs
            .iter()
            .enumerate()
            .map(|(i, c)| SchedulerConfig::from_json(&c.to_string(), format!("configs[{i}]")).unwrap())
            .collect();
        Expected {
            tensors: common::load_on_device(&path),
            cases,
            configs,
        }
    }

    fn cases(&self, kind: &str) -> impl Iterator<Item = (&str, &SchedulerConfig, &Value)> {
        let kind = kind.to_string();
        self.cases.iter().filter(move |c| c["kind"] == kind.as_str()).map(|c| {
            (
                c["name"].as_str().unwrap(),
                &self.configs[c["config"].as_u64().unwrap() as usize],
                c,
            )
        })
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("expected.safetensors: no tensor {key}"))
    }
}

fn steps_of(case: &Value) -> usize {
    case["steps"].as_u64().unwrap() as usize
}

/// Timesteps, sigmas (Euler types) and init_noise_sigma of a built scheduler.
fn layout(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> (Vec<f64>, Option<Vec<f64>>, f64) {
    match kind {
        SchedulerKind::EulerDiscrete => {
            let s = EulerDiscreteScheduler::from_config(cfg, steps).unwrap();
            (s.timesteps().to_vec(), Some(s.sigmas().to_vec()), s.init_noise_sigma())
        }
        SchedulerKind::EulerAncestralDiscrete => {
            let s = EulerAncestralDiscreteScheduler::from_config(cfg, steps).unwrap();
            (s.timesteps().to_vec(), Some(s.sigmas().to_vec()), s.init_noise_sigma())
        }
        _ => {
            let s = cfg.build(Some(kind), steps).unwrap();
            (s.timesteps().to_vec(), None, s.init_noise_sigma())
        }
    }
}

fn check_layout(exp: &Expected, name: &str, cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) {
    let (ts, sigmas, init) = layout(cfg, kind, steps);
    let want_ts = exp.get(&format!("{name}.timesteps"));
    if cfg.timestep_type == TimestepType::Continuous {
        // 0.25·ln(σ): torch's float32 log may be one ulp off the correctly rounded one.
        assert_close_rel(&format!("{name}: timesteps"), &f64_tensor(&ts), want_ts, 1e-6);
    } else {
        assert_eq!(ts, f64s(want_ts), "{name}: timesteps");
    }
    if let Some(sigmas) = sigmas {
        let want = exp.get(&format!("{name}.sigmas"));
        assert_close_rel(&format!("{name}: sigmas"), &f64_tensor(&sigmas), want, 1e-6);
    }
    let want_init = f64s(exp.get(&format!("{name}.init_noise_sigma")))[0];
    assert!(
        (init - want_init).abs() <= 1e-6 * want_init.max(1.0),
        "{name}: init_noise_sigma {init} vs {want_init}"
    );
}

#[test]
fn betas_and_alphas_cumprod_match_diffusers() {
    let exp = Expected::load();
    let mut n = 0;
    for (name, cfg, _) in exp.cases("betas") {
        let s = NoiseSchedule::from_config(cfg).unwrap();
        let (got, want) = (f64_tensor(s.betas()), exp.get(&format!("betas.{name}")));
        if name == "zero_snr" {
            // torch's float32 sqrt is not always correctly rounded, and rescaling to zero terminal
            // SNR subtracts nearly equal numbers near t = T, so the last betas differ by ~1e-5.
            assert_close_rel("zero_snr: betas", &got, want, ZERO_SNR_BETAS_RTOL);
        } else {
            common::assert_close(&format!("{name}: betas"), &got, want, SCHEDULE_ATOL);
        }
        let want = exp.get(&format!("alphas_cumprod.{name}"));
        let atol = if name == "zero_snr" { 1e-6 } else { SCHEDULE_ATOL };
        common::assert_close(
            &format!("{name}: alphas_cumprod"),
            &f64_tensor(s.alphas_cumprod()),
            want,
            atol,
        );
        n += 1;
    }
    assert_eq!(n, 4, "linear, scaled_linear, squaredcos_cap_v2, zero_snr");
}

#[test]
fn timesteps_sigmas_and_init_noise_sigma_match_diffusers() {
    let exp = Expected::load();
    let mut n = 0;
    for (name, cfg, case) in exp.cases("timesteps") {
        let kind = cfg.kind(None).unwrap();
        check_layout(&exp, name, cfg, kind, steps_of(case));
        n += 1;
    }
    assert!(n >= 60, "only {n} timestep cases");
}

#[test]
fn class_override_keeps_config_settings_like_from_config() {
    let exp = Expected::load();
    let mut n = 0;
    for (name, cfg, case) in exp.cases("override") {
        let kind = SchedulerKind::from_class_name(case["target"].as_str().unwrap()).unwrap();
        check_layout(&exp, name, cfg, kind, steps_of(case));
        n += 1;
    }
    assert_eq!(n, 4);
}

enum Built {
    Ddim(DDIMScheduler),
    Inverse(DDIMInverseScheduler),
    Euler(EulerDiscreteScheduler),
    EulerA(EulerAncestralDiscreteScheduler),
}

impl Built {
    fn new(cfg: &SchedulerConfig, steps: usize, eta: f64) -> Self {
        match cfg.kind(None).unwrap() {
            SchedulerKind::Ddim => Built::Ddim(DDIMScheduler::from_config(cfg, steps).unwrap().with_eta(eta).unwrap()),
            SchedulerKind::DdimInverse => Built::Inverse(DDIMInverseScheduler::from_config(cfg, steps).unwrap()),
            SchedulerKind::EulerDiscrete => Built::Euler(EulerDiscreteScheduler::from_config(cfg, steps).unwrap()),
            SchedulerKind::EulerAncestralDiscrete => {
                Built::EulerA(EulerAncestralDiscreteScheduler::from_config(cfg, steps).unwrap())
            }
            other => panic!("gen_schedulers.py has no {other} loops (see tests/samplers.rs)"),
        }
    }

    fn sched(&mut self) -> &mut dyn Scheduler {
        match self {
            Built::Ddim(s) => s,
            Built::Inverse(s) => s,
            Built::Euler(s) => s,
            Built::EulerA(s) => s,
        }
    }

    fn step(&mut self, mo: &Tensor, i: usize, x: &Tensor, noise: &Tensor) -> Tensor {
        match self {
            Built::Ddim(s) => s.step_with_noise(mo, i, x, Some(noise)).unwrap(),
            Built::EulerA(s) => s.step_with_noise(mo, i, x, noise).unwrap(),
            other => other.sched().step(mo, i, x, &mut Rng::new(0)).unwrap(),
        }
    }
}

#[test]
fn step_loops_match_diffusers() {
    let exp = Expected::load();
    let sample0 = exp.get("loop.sample0");
    let model_outputs = exp.get("loop.model_outputs");
    let noises = exp.get("loop.noises");
    let mut n = 0;
    for (name, cfg, case) in exp.cases("loop") {
        let steps = steps_of(case);
        let mut built = Built::new(cfg, steps, case["eta"].as_f64().unwrap());
        let samples = exp.get(&format!("{name}.samples"));
        let scaled = exp.tensors.get(&format!("{name}.scaled"));
        let init = built.sched().init_noise_sigma() as f32;
        let mut x = sample0.affine(f64::from(init), 0.0).unwrap();
        assert_close_rel(
            &format!("{name}: initial sample"),
            &x,
            &samples.get(0).unwrap(),
            SCHED_RTOL,
        );
        for i in 0..steps {
            let input = built.sched().scale_model_input(&x, i).unwrap();
            match scaled {
                Some(want) => assert_close_rel(
                    &format!("{name}: scaled {i}"),
                    &input,
                    &want.get(i).unwrap(),
                    SCHED_RTOL,
                ),
                None => common::assert_close(&format!("{name}: scaled {i}"), &input, &x, 0.0),
            }
            x = built.step(&model_outputs.get(i).unwrap(), i, &x, &noises.get(i).unwrap());
            assert_close_rel(
                &format!("{name}: step {i}"),
                &x,
                &samples.get(i + 1).unwrap(),
                SCHED_RTOL,
            );
        }
        n += 1;
    }
    assert_eq!(n, 22, "loop cases");
}

#[test]
fn add_noise_and_velocity_match_diffusers_ddpm() {
    let exp = Expected::load();
    let (_, cfg, _) = exp.cases("train").next().unwrap();
    assert_eq!(cfg.class_name.as_deref(), Some("DDPMScheduler"));
    let s = NoiseSchedule::from_config(cfg).unwrap();
    let (x0, noise, t) = (exp.get("train.x0"), exp.get("train.noise"), exp.get("train.t"));
    for t in [
        t.clone(),
        t.to_dtype(DType::F32).unwrap(),
        t.to_dtype(DType::U32).unwrap(),
    ] {
        let got = s.add_noise(x0, noise, &t).unwrap();
        assert_close_rel("add_noise", &got, exp.get("train.add_noise"), SCHED_RTOL);
        let got = s.velocity(x0, noise, &t).unwrap();
        assert_close_rel("velocity", &got, exp.get("train.velocity"), SCHED_RTOL);
    }
}

#[test]
fn training_target_follows_prediction_type() {
    let exp = Expected::load();
    let (_, cfg, _) = exp.cases("train").next().unwrap();
    let (x0, noise, t) = (exp.get("train.x0"), exp.get("train.noise"), exp.get("train.t"));
    for (pred, want) in [
        (PredictionType::Epsilon, noise),
        (PredictionType::VPrediction, exp.get("train.velocity")),
        (PredictionType::Sample, x0),
    ] {
        let cfg = SchedulerConfig {
            prediction_type: pred,
            ..cfg.clone()
        };
        let got = NoiseSchedule::from_config(&cfg)
            .unwrap()
            .training_target(x0, noise, t)
            .unwrap();
        assert_close_rel(&format!("{pred:?}"), &got, want, SCHED_RTOL);
    }
}

#[test]
fn add_noise_scalar_timestep_and_dtype() {
    let s = NoiseSchedule::from_config(&sd_config()).unwrap();
    let dev = common::device();
    let x0 = Tensor::ones((2, 1, 2, 2), DType::F32, &dev).unwrap();
    let noise = x0.zeros_like().unwrap();
    let out = s.add_noise(&x0, &noise, &Tensor::new(500u32, &dev).unwrap()).unwrap();
    let want = (s.alphas_cumprod()[500] as f32).sqrt();
    assert!(out
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|&v| v == want));
    let half = s
        .add_noise(
            &x0.to_dtype(DType::BF16).unwrap(),
            &noise.to_dtype(DType::BF16).unwrap(),
            &Tensor::new(&[0i64, 999], &dev).unwrap(),
        )
        .unwrap();
    assert_eq!(half.dtype(), DType::BF16);
}

// ---------------------------------------------------------------------------------------------
// 3. Errors

fn err_text<T>(r: diffalign::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn config_with(pairs: &[(&str, Value)]) -> String {
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(common::shared_fixtures().join("sd15/scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    for (k, val) in pairs {
        v.insert(k.to_string(), val.clone());
    }
    Value::Object(v).to_string()
}

#[test]
fn build_unsupported_class_names_class_and_lists_supported() {
    let cfg = SchedulerConfig::from_json(
        &config_with(&[
            ("_class_name", "HeunDiscreteScheduler".into()),
            ("use_beta_sigmas_x", true.into()),
        ]),
        "heun.json",
    )
    .unwrap();
    let msg = err_text(cfg.build(None, 4));
    for part in [
        "heun.json",
        "_class_name",
        "HeunDiscreteScheduler",
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    ] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    // Its shared fields still serve an explicitly chosen sampler.
    assert_eq!(
        cfg.build(Some(SchedulerKind::Ddim), 4).unwrap().timesteps(),
        &[751.0, 501.0, 251.0, 1.0]
    );
    assert_eq!(cfg.unknown_keys(), vec!["use_beta_sigmas_x".to_string()]);
}

#[test]
fn scheduler_kind_parses_cli_names_and_rejects_unknown() {
    for (s, k) in [
        ("ddim", SchedulerKind::Ddim),
        ("DDIM", SchedulerKind::Ddim),
        ("ddim-inverse", SchedulerKind::DdimInverse),
        ("euler", SchedulerKind::EulerDiscrete),
        ("euler-a", SchedulerKind::EulerAncestralDiscrete),
        ("euler_a", SchedulerKind::EulerAncestralDiscrete),
        ("euler_ancestral", SchedulerKind::EulerAncestralDiscrete),
        ("EulerAncestralDiscreteScheduler", SchedulerKind::EulerAncestralDiscrete),
    ] {
        assert_eq!(s.parse::<SchedulerKind>().unwrap(), k, "{s}");
    }
    let msg = err_text("heun".parse::<SchedulerKind>());
    for part in ["--scheduler", "\"heun\"", "ddim", "euler", "euler-a"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
}

#[test]
fn config_invalid_beta_schedule_names_key_and_value() {
    let msg = err_text(SchedulerConfig::from_json(
        &config_with(&[("beta_schedule", "cosine".into())]),
        "s.json",
    ));
    for part in ["s.json", "beta_schedule", "cosine", "scaled_linear"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    let msg = err_text(SchedulerConfig::from_json(
        &config_with(&[("prediction_type", "flow".into())]),
        "s.json",
    ));
    assert!(msg.contains("prediction_type") && msg.contains("flow"), "{msg}");
    let msg = err_text(SchedulerConfig::from_json(
        &config_with(&[("timestep_spacing", "even".into())]),
        "s.json",
    ));
    assert!(msg.contains("timestep_spacing") && msg.contains("even"), "{msg}");
    let msg = err_text(SchedulerConfig::from_json(
        &config_with(&[("num_train_timesteps", "many".into())]),
        "s.json",
    ));
    assert!(msg.contains("num_train_timesteps") && msg.contains("many"), "{msg}");
}

#[test]
fn config_malformed_json_and_missing_file_are_errors() {
    let msg = err_text(SchedulerConfig::from_json("{\"beta_start\": 0.1,", "broken.json"));
    assert!(msg.contains("broken.json") && msg.contains("malformed JSON"), "{msg}");
    let msg = err_text(SchedulerConfig::from_json("[1, 2]", "list.json"));
    assert!(msg.contains("list.json") && msg.contains("JSON object"), "{msg}");
    let missing = Path::new("/nonexistent/scheduler/scheduler_config.json");
    let msg = err_text(SchedulerConfig::from_file(missing));
    assert!(
        msg.contains("scheduler_config.json") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn unsupported_options_are_errors_naming_the_key() {
    // Karras and exponential Euler sigmas are supported now (tests/samplers.rs).
    let cases: [(&str, Value, SchedulerKind); 4] = [
        ("use_beta_sigmas", true.into(), SchedulerKind::EulerDiscrete),
        ("interpolation_type", "log_linear".into(), SchedulerKind::EulerDiscrete),
        ("thresholding", true.into(), SchedulerKind::Ddim),
        ("timestep_spacing", "linspace".into(), SchedulerKind::DdimInverse),
    ];
    for (key, value, kind) in cases {
        let cfg = SchedulerConfig::from_json(&config_with(&[(key, value)]), "s.json").unwrap();
        let msg = err_text(cfg.build(Some(kind), 4));
        assert!(msg.contains("s.json") && msg.contains(key), "{key}: {msg}");
    }
    let msg = err_text(SchedulerConfig::from_json(
        &config_with(&[("trained_betas", serde_json::json!([0.1, 0.2]))]),
        "s.json",
    ));
    assert!(msg.contains("trained_betas") && msg.contains("1000"), "{msg}");
    let cfg = SchedulerConfig::from_json(&config_with(&[("beta_end", 1.5.into())]), "s.json").unwrap();
    let msg = err_text(cfg.build(None, 4));
    assert!(msg.contains("beta_end") && msg.contains("1.5"), "{msg}");
}

#[test]
fn trained_betas_and_unknown_keys_are_accepted() {
    let betas: Vec<f64> = NoiseSchedule::from_config(&sd_config()).unwrap().betas().to_vec();
    let json = config_with(&[
        ("trained_betas", serde_json::json!(betas)),
        ("beta_schedule", "linear".into()),
        ("some_new_key", 3.into()),
    ]);
    let cfg = SchedulerConfig::from_json(&json, "s.json").unwrap();
    assert_eq!(cfg.unknown_keys(), vec!["some_new_key".to_string()]);
    let s = NoiseSchedule::from_config(&cfg).unwrap();
    assert_eq!(
        s.alphas_cumprod(),
        NoiseSchedule::from_config(&sd_config()).unwrap().alphas_cumprod()
    );
}

#[test]
fn num_inference_steps_out_of_range_is_error() {
    let cfg = sd_config();
    for kind in SchedulerKind::ALL {
        for steps in [0, 1001] {
            let msg = err_text(cfg.build(Some(kind), steps));
            assert!(
                msg.contains("num_inference_steps") && msg.contains(&steps.to_string()),
                "{kind}: {msg}"
            );
        }
    }
}

#[test]
fn bad_step_inputs_are_errors() {
    let cfg = sd_config();
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((1, 4, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let mut rng = Rng::new(0);
    for kind in SchedulerKind::ALL {
        let mut s = cfg.build(Some(kind), 4).unwrap();
        // PNDM's Runge-Kutta warm-up evaluates the model 13 times for 4 steps.
        let n = s.timesteps().len();
        assert!(err_text(s.step(&x, n, &x, &mut rng)).contains("step_index"), "{kind}");
        assert!(err_text(s.scale_model_input(&x, n)).contains("step_index"), "{kind}");
        assert!(
            err_text(s.step(&wrong, 0, &x, &mut rng)).contains("model_output"),
            "{kind}"
        );
    }
    let s = NoiseSchedule::from_config(&cfg).unwrap();
    let dev = &Device::Cpu;
    assert!(err_text(s.add_noise(&x, &x, &Tensor::new(&[1000u32], dev).unwrap())).contains("1000"));
    assert!(err_text(s.add_noise(&x, &x, &Tensor::new(&[1.5f32], dev).unwrap())).contains("1.5"));
    assert!(err_text(s.add_noise(&x, &x, &Tensor::new(&[1u32, 2], dev).unwrap())).contains("timesteps"));
    assert!(err_text(s.add_noise(&x, &wrong, &Tensor::new(&[1u32], dev).unwrap())).contains("noise"));
}

#[test]
fn missing_timestep_spacing_takes_the_built_class_default() {
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(&config_with(&[])).unwrap();
    v.remove("timestep_spacing");
    let cfg = SchedulerConfig::from_json(&Value::Object(v).to_string(), "s.json").unwrap();
    assert_eq!(cfg.timestep_spacing_for(SchedulerKind::Ddim), TimestepSpacing::Leading);
    assert_eq!(
        cfg.timestep_spacing_for(SchedulerKind::EulerDiscrete),
        TimestepSpacing::Linspace
    );
    assert_eq!(
        cfg.build(Some(SchedulerKind::Ddim), 4).unwrap().timesteps(),
        &[751.0, 501.0, 251.0, 1.0]
    );
    assert_eq!(
        cfg.build(Some(SchedulerKind::EulerDiscrete), 4).unwrap().timesteps(),
        &[999.0, 666.0, 333.0, 0.0]
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The contract every sampler meets

/// The model output a perfect model gives for `x` at the current level, where `x` was made from
/// `x0` and `eps`: `level` is (sqrt(ᾱ), sqrt(1−ᾱ)) in the sampler's own sample space.
fn perfect_output(pred: PredictionType, x: &Tensor, x0: &Tensor, sa: f64, sb: f64) -> Tensor {
    // The noise the sample implies: (x − sa·x0)/sb, then the target of the prediction type.
    let eps = ((x - x0.affine(sa, 0.0).unwrap()).unwrap().affine(1.0 / sb, 0.0)).unwrap();
    match pred {
        PredictionType::Epsilon => eps,
        PredictionType::Sample => x0.clone(),
        PredictionType::VPrediction => {
            // Velocity of the unit-variance sample: sa'·eps − sb'·x0 with ᾱ' = sa²/(sa²+sb²).
            let norm = (sa * sa + sb * sb).sqrt();
            (eps.affine(sa / norm, 0.0).unwrap() - x0.affine(sb / norm, 0.0).unwrap()).unwrap()
        }
    }
}

#[test]
fn every_sampler_meets_the_contract() {
    let dev = common::device();
    let mut rng = Rng::new(42);
    let x0 = rng.randn((2, 4, 4, 4), &dev).unwrap().affine(0.5, 0.0).unwrap();
    let eps = rng.randn((2, 4, 4, 4), &dev).unwrap();
    let base = SchedulerConfig {
        set_alpha_to_one: Some(true),
        ..sd_config()
    };
    let sampling = [
        SchedulerKind::Ddim,
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
    ];
    for kind in sampling {
        for pred in [
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ] {
            for spacing in [
                TimestepSpacing::Leading,
                TimestepSpacing::Trailing,
                TimestepSpacing::Linspace,
            ] {
                for steps in [1, 4, 8, 50] {
                    let what = format!("{kind} {pred:?} {spacing:?} {steps} steps");
                    let cfg = SchedulerConfig {
                        prediction_type: pred,
                        timestep_spacing: Some(spacing),
                        ..base.clone()
                    };
                    let schedule = NoiseSchedule::from_config(&cfg).unwrap();
                    let mut sched = cfg.build(Some(kind), steps).unwrap();
                    let ts = sched.timesteps().to_vec();
                    assert_eq!(ts.len(), steps, "{what}");
                    assert!(
                        ts.windows(2).all(|w| w[0] > w[1]),
                        "{what}: not strictly decreasing: {ts:?}"
                    );
                    assert!(ts.iter().all(|&t| (0.0..1000.0).contains(&t)), "{what}: {ts:?}");
                    assert!(sched.init_noise_sigma() >= 1.0 || steps == 1, "{what}");
                    // The sampler's own noise level at each step: ᾱ_t for DDIM; for Euler,
                    // samples are x0 + σ·ε, i.e. sqrt(ᾱ) = 1 and sqrt(1−ᾱ) = σ.
                    let level = |i: usize| -> (f64, f64) {
                        match kind {
                            SchedulerKind::Ddim => {
                                let a = schedule.alphas_cumprod()[ts[i] as usize];
                                (a.sqrt(), (1.0 - a).sqrt())
                            }
                            _ => {
                                let sigmas = match kind {
                                    SchedulerKind::EulerDiscrete => EulerDiscreteScheduler::from_config(&cfg, steps)
                                        .unwrap()
                                        .sigmas()
                                        .to_vec(),
                                    _ => EulerAncestralDiscreteScheduler::from_config(&cfg, steps)
                                        .unwrap()
                                        .sigmas()
                                        .to_vec(),
                                };
                                (1.0, sigmas[i])
                            }
                        }
                    };
                    let (sa, sb) = level(0);
                    let mut x = (x0.affine(sa, 0.0).unwrap() + eps.affine(sb, 0.0).unwrap()).unwrap();
                    for i in 0..steps {
                        let input = sched.scale_model_input(&x, i).unwrap();
                        assert_eq!((input.dims(), input.dtype()), (x.dims(), x.dtype()), "{what}");
                        let (sa, sb) = level(i);
                        let out = perfect_output(pred, &x, &x0, sa, sb);
                        x = sched.step(&out, i, &x, &mut rng).unwrap();
                    }
                    // A perfect model brings every sampler back to x0.
                    common::assert_close(&what, &x, &x0, 2e-4);
                }
            }
        }
    }
}

#[test]
fn ddim_inverse_meets_the_contract() {
    let dev = common::device();
    let mut rng = Rng::new(7);
    let x0 = rng.randn((1, 4, 4, 4), &dev).unwrap();
    let eps = rng.randn((1, 4, 4, 4), &dev).unwrap();
    // Step counts that divide T: otherwise trailing steps start from t − T div N, which is not
    // where the previous step landed (diffusers' convention, kept).
    for spacing in [TimestepSpacing::Leading, TimestepSpacing::Trailing] {
        for steps in [1, 4, 8, 50] {
            let cfg = SchedulerConfig {
                set_alpha_to_one: Some(true),
                timestep_spacing: Some(spacing),
                ..sd_config()
            };
            let inv = DDIMInverseScheduler::from_config(&cfg, steps).unwrap();
            let mut sched = cfg.build(Some(SchedulerKind::DdimInverse), steps).unwrap();
            let ts = sched.timesteps().to_vec();
            assert_eq!(ts.len(), steps);
            assert!(
                ts.windows(2).all(|w| w[0] < w[1]),
                "{spacing:?} {steps}: not increasing: {ts:?}"
            );
            // Each inverse step lands on the forward-noised sample at its timestep.
            let mut x = x0.clone();
            let a0 = inv.move_to(ts[0] as usize).unwrap().alpha_prod_t;
            if a0 < 1.0 {
                x = (x0.affine(a0.sqrt(), 0.0).unwrap() + eps.affine((1.0 - a0).sqrt(), 0.0).unwrap()).unwrap();
            }
            for (i, &t) in ts.iter().enumerate() {
                x = sched.step(&eps, i, &x, &mut rng).unwrap();
                let a = inv.schedule().alphas_cumprod()[t as usize];
                let want = (x0.affine(a.sqrt(), 0.0).unwrap() + eps.affine((1.0 - a).sqrt(), 0.0).unwrap()).unwrap();
                common::assert_close(&format!("{spacing:?} {steps} step {i}"), &x, &want, 1e-4);
            }
        }
    }
}

#[test]
fn smpo_inversion_timesteps_and_first_step() {
    // SmPO: leading, offset 1, 5 steps, no clipping, ᾱ_0 below the first timestep.
    let schedule = NoiseSchedule::from_config(&sd_config()).unwrap();
    let settings = DdimSettings {
        timestep_spacing: TimestepSpacing::Leading,
        steps_offset: 1,
        set_alpha_to_one: false,
        clip: None,
    };
    let inv = DDIMInverseScheduler::new(&schedule, settings, 5).unwrap();
    assert_eq!(inv.timesteps(), &[1.0, 201.0, 401.0, 601.0, 801.0]);
    let first = inv.move_to(1).unwrap();
    assert_eq!(
        (first.alpha_prod_t, first.alpha_prod_to),
        (schedule.alphas_cumprod()[0], schedule.alphas_cumprod()[1])
    );
    let mid = inv.move_to(401).unwrap();
    assert_eq!((mid.alpha_prod_t, mid.clip), (schedule.alphas_cumprod()[201], None));
}

#[test]
fn trailing_timesteps_have_exactly_n_values_for_every_n() {
    let schedule = NoiseSchedule::from_config(&sd_config()).unwrap();
    for n in 1..=1000 {
        let ts = schedule
            .inference_timesteps(
                TimestepSpacing::Trailing,
                1,
                n,
                diffalign::schedulers::TimestepValues::Integer,
            )
            .unwrap();
        assert_eq!(ts.len(), n);
        assert_eq!(ts[0], 999.0);
        assert!(ts.windows(2).all(|w| w[0] > w[1]) && ts[n - 1] >= 0.0, "{n}: {ts:?}");
    }
}

#[test]
fn ancestral_noise_comes_from_the_seeded_rng() {
    let cfg =
        SchedulerConfig::from_file(common::shared_fixtures().join("turbo/scheduler/scheduler_config.json")).unwrap();
    let x = Tensor::ones((1, 4, 4, 4), DType::F32, &common::device()).unwrap();
    let run = |seed: u64| {
        let mut s = cfg.build(Some(SchedulerKind::EulerAncestralDiscrete), 4).unwrap();
        s.step(&x.zeros_like().unwrap(), 0, &x, &mut Rng::new(seed)).unwrap()
    };
    assert_eq!(common::max_abs_diff(&run(3), &run(3)), 0.0);
    assert!(common::max_abs_diff(&run(3), &run(4)) > 0.1);
    // Deterministic samplers ignore the rng.
    let mut ddim = cfg.build(Some(SchedulerKind::Ddim), 4).unwrap();
    let a = ddim.step(&x, 0, &x, &mut Rng::new(1)).unwrap();
    let b = ddim.step(&x, 0, &x, &mut Rng::new(2)).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn steps_keep_half_precision_dtypes() {
    let cfg = sd_config();
    let x = Tensor::ones((1, 4, 2, 2), DType::F16, &common::device()).unwrap();
    for kind in SchedulerKind::ALL {
        let mut s = cfg.build(Some(kind), 4).unwrap();
        let input = s.scale_model_input(&x, 0).unwrap();
        assert_eq!(input.dtype(), DType::F16, "{kind}");
        let out = s.step(&x, 0, &x, &mut Rng::new(0)).unwrap();
        assert_eq!(out.dtype(), DType::F16, "{kind}");
    }
}
