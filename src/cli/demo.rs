//! `diffalign demo`: the whole framework on the embedded shapes-world model, with nothing
//! downloaded (see [`diffalign::shapes::demo`] for what it does and its honesty rules).
//!
//! Writes into `--out` (default `demo/`, which may exist): `index.html` (win-rate table, training
//! curves, ReNO trajectories, same-seed grid), `metrics.json`
//! (`{"methods": {METHOD: {"win_rate", "ci95", "n", "true_reward", "base_true_reward"}}}`),
//! `gallery/manifest.json` (one object per image: `path`, `prompt`, `method`, `seed`), the
//! images, the labelled pairs and each method's training run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Tensor;
use clap::Args;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::recipe::Plan;
use diffalign::reno::{Reno, RenoConfig, Sampler, WeightedReward};
use diffalign::reward::{load_reward, RewardKind};
use diffalign::sampling::image_io::save_png;
use diffalign::schedulers::SchedulerKind;
use diffalign::shapes::demo::{
    eval_cases, fit_demo_pair_head, method_recipe, npo_negative_unet, sample_pairs, split_prompts, true_reward,
    DcpoCaption, DemoConfig, GalleryImage, Generator, MethodResult, DPO_NPO, METHODS,
};
use diffalign::shapes::reward_demo::{draft_recipe, write_prompts, DraftDemo, DRAFT};
use diffalign::train::report::{line_plot_svg, Curve};
use diffalign::train::{Resume, TrainOptions, Trainer};
use diffalign::weights::store::write_atomic;
use diffalign::weights::LoadOptions;
use indicatif::ProgressBar;

use super::device_arg::DeviceArg;
use super::inputs::parse_finite;

/// Flags of `diffalign demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder (created if needed; may exist).
    #[arg(long, default_value = "demo")]
    out: PathBuf,
    /// A short pass through every phase (under three minutes on two cores).
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Optimizer steps per method (default: 240, quick 3).
    #[arg(long)]
    train_steps: Option<usize>,
    /// Learning rate of the aligned UNet (default 3e-5).
    #[arg(long, value_parser = parse_positive)]
    lr: Option<f64>,
    /// A method's beta as METHOD=B, repeatable (defaults: dpo 1000, dcpo 2000, mapo 0.02, smpo 200).
    #[arg(long = "beta", value_parser = parse_beta)]
    betas: Vec<(String, f64)>,
    /// Seeds per held-out prompt (default 6, quick 2).
    #[arg(long)]
    eval_seeds: Option<u64>,
    /// ReNO iterations per held-out image (default 2, quick 2).
    #[arg(long)]
    reno_iters: Option<usize>,
    /// A shapes-world pipeline folder to align instead of the embedded one (e.g. the output of
    /// `diffalign pretrain`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A shapes-world reward CLIP folder for ReNO instead of the embedded one.
    #[arg(long)]
    reward: Option<PathBuf>,
    /// The methods to run, comma-separated (default: dpo,dcpo,mapo,smpo,kto,dpo+npo,draft,reno;
    /// dpo+npo also runs dpo).
    #[arg(long, value_delimiter = ',', value_parser = parse_method)]
    methods: Vec<String>,
    /// How DCPO's caption of each rejected image is made: `captioned` (DCPO-c, the world's
    /// captioner), `perturbed` (DCPO-p, the prompt with one attribute changed) or `hybrid`
    /// (DCPO-h, the captioner's caption with one attribute changed).
    #[arg(long, default_value = "perturbed")]
    dcpo_caption: DcpoCaption,
    /// SmPO's ReNoise inversion steps (default 0: forward noising as DPO, the smoothed loss
    /// alone; the paper's SmPO uses 5 on SD 1.5).
    #[arg(long)]
    inversion_steps: Option<usize>,
    /// The run's seed (default 0): it moves the pairs' noise, the labels, DCPO's captions, the
    /// training and the evaluation noise; the prompt split stays.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// ReNO's weight on the pair head fitted on the labelled pairs, beside the reward CLIP's
    /// score (default 10; 0 leaves ReNO with the CLIP score alone).
    #[arg(long, value_parser = parse_non_negative)]
    head_weight: Option<f64>,
    /// DRaFT's optimizer steps (default 60, quick 3).
    #[arg(long)]
    draft_steps: Option<usize>,
    /// DRaFT's learning rate (default 2e-6).
    #[arg(long, value_parser = parse_positive)]
    draft_lr: Option<f64>,
    /// DRaFT's K: the final sampler steps gradients flow through (default: all of them).
    #[arg(long)]
    draft_k: Option<usize>,
    /// DRaFT's weight on the pair head beside the reward CLIP's score (default 100; 0: the CLIP
    /// score alone).
    #[arg(long, value_parser = parse_non_negative)]
    draft_head_weight: Option<f64>,
    /// The NPO model's optimizer steps, for `dpo+npo` (default: a quarter of --train-steps).
    #[arg(long)]
    npo_steps: Option<usize>,
}

fn parse_method(s: &str) -> Result<String, String> {
    if METHODS.contains(&s) || s == "reno" || s == DPO_NPO || s == DRAFT {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown method {s:?}; expected one of {}, {DPO_NPO}, {DRAFT}, reno",
            METHODS.join(", ")
        ))
    }
}

fn parse_beta(s: &str) -> Result<(String, f64), String> {
    let (m, b) = s
        .split_once('=')
        .ok_or_else(|| format!("expected METHOD=BETA, got {s:?}"))?;
    if !METHODS.contains(&m) {
        return Err(format!("unknown method {m:?}; expected one of {}", METHODS.join(", ")));
    }
    let b = parse_positive(b).map_err(|e| format!("{m}: beta {e}"))?;
    Ok((m.to_string(), b))
}

/// A finite number > 0 for clap (a learning rate, a beta): `NaN`, `inf` and 0 are refused.
fn parse_positive(s: &str) -> Result<f64, String> {
    let v = parse_finite(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be > 0, got {s}"))
    }
}

/// A finite number >= 0 for clap (a weight that 0 turns off).
fn parse_non_negative(s: &str) -> Result<f64, String> {
    let v = parse_finite(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be >= 0, got {s}"))
    }
}

fn bar(phase: &str, len: usize) -> ProgressBar {
    super::progress_bar(phase, len as u64)
}

fn hwc(image_nchw: &Tensor) -> anyhow::Result<Tensor> {
    Ok(image_nchw.get(0)?.permute((1, 2, 0))?.contiguous()?)
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut cfg = if args.quick {
        DemoConfig::quick()
    } else {
        DemoConfig::full()
    };
    cfg.device = args.device.device()?;
    cfg.train_steps = args.train_steps.unwrap_or(cfg.train_steps);
    cfg.lr = args.lr.unwrap_or(cfg.lr);
    cfg.eval_seeds = args.eval_seeds.unwrap_or(cfg.eval_seeds);
    cfg.reno_iters = args.reno_iters.unwrap_or(cfg.reno_iters);
    cfg.betas = args.betas.iter().cloned().collect();
    cfg.dcpo_caption = args.dcpo_caption;
    cfg.inversion_steps = args.inversion_steps.unwrap_or(cfg.inversion_steps);
    cfg.head_weight = args.head_weight.unwrap_or(cfg.head_weight);
    cfg.seed = args.seed;
    let mut draft = if args.quick {
        DraftDemo::quick()
    } else {
        DraftDemo::full()
    };
    draft.steps = args.draft_steps.unwrap_or(draft.steps);
    draft.lr = args.draft_lr.unwrap_or(draft.lr);
    draft.k = args.draft_k.or(draft.k);
    draft.head_weight = args.draft_head_weight.unwrap_or(draft.head_weight);
    if !(cfg.head_weight.is_finite() && cfg.head_weight >= 0.0) {
        anyhow::bail!("--head-weight must be a number >= 0, got {}", cfg.head_weight);
    }
    let wanted = |m: &str| args.methods.is_empty() || args.methods.iter().any(|x| x == m);
    if cfg.train_steps == 0 || cfg.eval_seeds == 0 || cfg.reno_iters == 0 {
        anyhow::bail!("--train-steps, --eval-seeds and --reno-iters must be at least 1");
    }
    let start = std::time::Instant::now();
    let out = &args.out;
    std::fs::create_dir_all(out.join("gallery")).with_context(|| format!("creating {}", out.display()))?;
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => diffalign::shapes::assets::shapes_model_dir(&super::assets_cache())?,
    };
    let reward_dir = match &args.reward {
        Some(dir) => dir.clone(),
        None => diffalign::shapes::assets::shapes_reward_dir(&super::assets_cache())?,
    };
    let gen = Generator::load(&model_dir, &cfg)?;
    let device_opts = LoadOptions {
        device: cfg.device.clone(),
        ..Default::default()
    };
    let (train, held_out) = split_prompts();
    let train: Vec<_> = train.into_iter().take(cfg.train_prompts).collect();

    // 1. Pairs from the base model, labelled by the rater.
    let b = bar("pairs", train.len() * cfg.pairs_per_prompt);
    let pairs = sample_pairs(&gen, &train, &cfg, &out.join("pairs"), &mut |i, _| {
        b.set_position(i as u64)
    })?;
    b.finish();

    // 2. Base images of the held-out cases.
    let cases = eval_cases(&held_out, &cfg);
    let mut manifest: Vec<GalleryImage> = Vec::new();
    let mut scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let render = |method: &str,
                  unet: &UNet2DConditionModel,
                  negative: Option<&UNet2DConditionModel>,
                  manifest: &mut Vec<GalleryImage>|
     -> anyhow::Result<Vec<f64>> {
        let b = bar(method, cases.len());
        let mut s = Vec::with_capacity(cases.len());
        for (i, (prompt, seed)) in cases.iter().enumerate() {
            let image = gen.generate_guided(unet, negative, prompt, &gen.noise(*seed)?, *seed)?;
            let path = format!("gallery/{method}/{i:03}-{seed}.png");
            save_png(&image, &out.join(&path))?;
            manifest.push(GalleryImage {
                path,
                prompt: prompt.to_string(),
                method: method.into(),
                seed: *seed,
            });
            s.push(true_reward(&image, prompt)?);
            b.inc(1);
        }
        b.finish();
        Ok(s)
    };
    let base = render("base", &gen.pipe.unet, None, &mut manifest)?;

    // The pair head, fitted on the labelled pairs, for ReNO and DRaFT.
    let mut head_report = None;
    if (wanted("reno") && cfg.head_weight > 0.0) || (wanted(DRAFT) && draft.head_weight > 0.0) {
        let b = bar("pair head", 1);
        head_report = Some(fit_demo_pair_head(&pairs, &reward_dir, &out.join("reward"), &cfg)?);
        b.finish();
    }

    // 3. Each method: train, then render the held-out cases.
    let mut results: BTreeMap<String, MethodResult> = BTreeMap::new();
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let opts = TrainOptions {
        resume: Resume::Never,
        allow_recipe_change: false,
        max_steps_this_run: None,
        device: cfg.device.clone(),
        hub_cache: None,
        comm: std::rc::Rc::new(diffalign::dist::Comm::alone()),
    };
    let mut tuned_unets = BTreeMap::new();
    let npo_wanted = wanted(DPO_NPO);
    let trained = METHODS.into_iter().filter(|m| wanted(m) || (*m == "dpo" && npo_wanted));
    let extra = npo_wanted
        .then_some("npo")
        .into_iter()
        .chain(wanted(DRAFT).then_some(DRAFT));
    for method in trained.chain(extra) {
        let run_dir = out.join("runs").join(method);
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir).with_context(|| format!("clearing {}", run_dir.display()))?;
        }
        std::fs::create_dir_all(&run_dir)?;
        let recipe = if method == DRAFT {
            let prompts = run_dir.join("prompts.txt");
            write_prompts(&train, &prompts)?;
            let head = head_report
                .as_ref()
                .filter(|_| draft.head_weight > 0.0)
                .map(|h| h.dir.as_path());
            draft_recipe(&model_dir, &prompts, &reward_dir, head, &run_dir, &cfg, &draft)
        } else {
            let mut recipe = method_recipe(method, &model_dir, &pairs, &run_dir, &cfg);
            if method == "npo" {
                // A quarter of the steps keeps the negative model near the base, as the paper's
                // adapter weight below 1 does (all the steps: 0.37 against dpo, README).
                let steps = args.npo_steps.unwrap_or(cfg.train_steps / 4).max(1);
                recipe["train"]["steps"] = toml::Value::from(steps as i64);
            }
            recipe
        };
        let plan = Plan::from_table(&run_dir.join("recipe.toml"), recipe)?;
        let steps = plan.raw.train.steps;
        let mut trainer = Trainer::new(plan, &opts).with_context(|| format!("setting up {method}"))?;
        let b = bar(&format!("train {method}"), steps);
        let mut points = Vec::new();
        trainer.run(&opts, &mut |r, _| {
            b.set_position(r.step as u64);
            b.set_message(format!("loss {:.4}", r.loss));
            points.push((r.step as f64, r.loss));
        })?;
        b.finish();
        curves.push((format!("{method} training loss"), points));
        let mut unet_dir = run_dir.join("unet");
        if method == "npo" {
            // Diffusion-NPO guides the DPO model with the DPO weights plus the NPO offset.
            let negative = run_dir.join("negative-unet");
            let dpo_unet = out.join("runs").join("dpo").join("unet");
            npo_negative_unet(&dpo_unet, &unet_dir, &model_dir.join("unet"), &negative)?;
            unet_dir = negative;
        }
        let (tuned, _) = UNet2DConditionModel::from_pretrained(&unet_dir, &device_opts)
            .with_context(|| format!("loading the {method} UNet"))?;
        if method == "npo" {
            let s = render(DPO_NPO, &tuned_unets["dpo"], Some(&tuned), &mut manifest)?;
            results.insert(DPO_NPO.into(), MethodResult::with_dpo(&base, &scores["dpo"], &s)?);
            scores.insert(DPO_NPO.into(), s);
            continue;
        }
        let s = render(method, &tuned, None, &mut manifest)?;
        results.insert(method.into(), MethodResult::from_scores(&base, &s)?);
        scores.insert(method.into(), s);
        tuned_unets.insert(method, tuned);
    }

    // 4. ReNO with the learned shapes reward and the pair head, from each held-out case's own
    //    noise.
    if wanted("reno") {
        let reward = load_reward(RewardKind::ClipScore, &reward_dir, &device_opts)?;
        let mut rewards = vec![WeightedReward::new(reward, None)];
        if let Some(report) = head_report.as_ref().filter(|_| cfg.head_weight > 0.0) {
            let head = load_reward(RewardKind::PairHead, &report.dir, &device_opts)?;
            rewards.push(WeightedReward::new(head, Some(cfg.head_weight)));
        }
        let reno_cfg = RenoConfig {
            iters: cfg.reno_iters,
            ..RenoConfig::default()
        };
        let sampler = Sampler::Scheduler {
            kind: Some(SchedulerKind::Ddim),
            steps: cfg.steps,
        };
        let b = bar("reno", cases.len() * cfg.reno_iters);
        let mut reno_scores = Vec::with_capacity(cases.len());
        let mut trajectory = vec![Vec::new(); cfg.reno_iters];
        for (i, (prompt, seed)) in cases.iter().enumerate() {
            let reno = Reno::new(&gen.pipe, &rewards, sampler, reno_cfg.clone(), *seed)?;
            let z0 = gen.noise(*seed)?;
            let size = reno.image_size(&z0)?;
            let cond = gen
                .pipe
                .conditioning(&[prompt.to_string()], None, cfg.guidance, size, None)?;
            let outcome = reno.run_with(&cond, &prompt.to_string(), &z0, &mut |r, _| {
                trajectory[r.iter].push(r.reward_loss);
                b.inc(1);
                Ok(())
            })?;
            let image = hwc(&outcome.best_image)?;
            let path = format!("gallery/reno/{i:03}-{seed}.png");
            save_png(&image, &out.join(&path))?;
            manifest.push(GalleryImage {
                path,
                prompt: prompt.to_string(),
                method: "reno".into(),
                seed: *seed,
            });
            reno_scores.push(true_reward(&image, prompt)?);
        }
        b.finish();
        results.insert("reno".into(), MethodResult::from_scores(&base, &reno_scores)?);
        scores.insert("reno".into(), reno_scores);
        let reno_curve: Vec<(f64, f64)> = trajectory
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(i, v)| (i as f64, v.iter().sum::<f64>() / v.len() as f64))
            .collect();
        curves.push(("ReNO reward loss (mean over held-out images)".into(), reno_curve));
    }
    // 5. Outputs.
    let metrics = serde_json::json!({
        "methods": results,
        "config": {"quick": args.quick, "dcpo_caption": cfg.dcpo_caption, "inversion_steps": cfg.inversion_steps, "head_weight": cfg.head_weight, "seed": cfg.seed, "train_pairs": train.len() * cfg.pairs_per_prompt, "eval_cases": cases.len(),
                   "train_steps": cfg.train_steps, "lr": cfg.lr, "betas": cfg.betas, "reno_iters": cfg.reno_iters,
                   "draft": {"steps": draft.steps, "batch_size": draft.batch_size, "lr": draft.lr, "k": draft.k.unwrap_or(cfg.steps), "head_weight": draft.head_weight},
                   "sampler_steps": cfg.steps, "guidance": cfg.guidance,
                   "model": args.model.as_ref().map(|p| p.display().to_string()),
                   "reward": args.reward.as_ref().map(|p| p.display().to_string())},
        "pair_head": head_report,
        "seconds": start.elapsed().as_secs_f64(),
    });
    write_atomic(&out.join("metrics.json"), &serde_json::to_string_pretty(&metrics)?)?;
    write_atomic(
        &out.join("gallery/manifest.json"),
        &serde_json::to_string_pretty(&manifest)?,
    )?;
    write_atomic(
        &out.join("index.html"),
        &page(&results, &curves, &manifest, &cases, &base, &scores)?,
    )?;
    println!("{}", serde_json::json!({"out": out, "metrics": metrics}));
    Ok(())
}

fn page(
    results: &BTreeMap<String, MethodResult>,
    curves: &[(String, Vec<(f64, f64)>)],
    manifest: &[GalleryImage],
    cases: &[(diffalign::shapes::Prompt, u64)],
    base: &[f64],
    scores: &BTreeMap<String, Vec<f64>>,
) -> anyhow::Result<String> {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>diffalign demo</title><style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;width:96px}td,th{padding:4px;text-align:center}</style></head><body><h1>diffalign demo: the shapes world</h1>",
    );
    h.push_str("<p>Base model against each aligned model on held-out prompts, same seeds, judged by the ground-truth rater.</p><table><tr><th>method</th><th>win rate</th><th>95% interval</th><th>n</th><th>mean true reward</th><th>base</th></tr>");
    for (m, r) in results {
        let _ = write!(
            h,
            "<tr><td>{m}</td><td>{:.3}</td><td>[{:.3}, {:.3}]</td><td>{}</td><td>{:.4}</td><td>{:.4}</td></tr>",
            r.win_rate, r.ci95[0], r.ci95[1], r.n, r.true_reward, r.base_true_reward
        );
    }
    h.push_str("</table><h2>Curves</h2>");
    for (title, points) in curves.iter().filter(|c| !c.1.is_empty()) {
        h.push_str(&line_plot_svg(&Curve {
            title,
            points: points.clone(),
        })?);
    }
    h.push_str(
        "<h2>Same-seed images (true reward below each)</h2><table><tr><th>prompt</th><th>seed</th><th>base</th>",
    );
    for m in scores.keys() {
        let _ = write!(h, "<th>{m}</th>");
    }
    h.push_str("</tr>");
    let path_of = |method: &str, i: usize| {
        manifest
            .iter()
            .filter(|g| g.method == method)
            .nth(i)
            .map(|g| g.path.clone())
            .unwrap_or_default()
    };
    for (i, (prompt, seed)) in cases.iter().enumerate() {
        let _ = write!(
            h,
            "<tr><td>{prompt}</td><td>{seed}</td><td><img src=\"{}\"><br>{:.3}</td>",
            path_of("base", i),
            base[i]
        );
        for (m, s) in scores {
            let _ = write!(h, "<td><img src=\"{}\"><br>{:.3}</td>", path_of(m, i), s[i]);
        }
        h.push_str("</tr>");
    }
    h.push_str("</table></body></html>\n");
    Ok(h)
}
