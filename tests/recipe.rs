//! Recipes: the shipped ones parse, and the objective a recipe asks for is the one built.

use std::path::PathBuf;

use diffalign::optim::{AdafactorConfig, AdamW8bitConfig, AdamWConfig, OptimizerConfig};
use diffalign::preference::diffusion::Method;
use diffalign::preference::{LossType, Objective};
use diffalign::recipe::Plan;

#[test]
fn every_recipe_in_pipelines_parses() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let is_pretrain = p
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("pretrain-"));
        if p.extension().is_some_and(|x| x == "toml") {
            if is_pretrain {
                let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
                diffalign::shapes::pretrain::PretrainRecipe::load(&p, &root)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            } else {
                Plan::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
    }
    assert!(n >= 6, "expected the papers' recipes, found {n}");
}

/// A minimal valid recipe for `method`, with `extra` lines in `[train]`.
fn recipe(dir: &std::path::Path, method: &str, extra: &str) -> PathBuf {
    let path = dir.join("recipe.toml");
    let text = format!(
        "[model]\npath = \"m\"\n[data]\nformat = \"jsonl\"\npath = \"d\"\n[train]\nmethod = \"{method}\"\n\
         steps = 1\nlr = 1e-5\nresolution = 32\n{extra}\n[output]\ndir = \"o\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_recipe_builds_the_objective_of_its_method() {
    let tmp = tempfile::tempdir().unwrap();
    for (method, extra) in [
        ("dpo", ""),
        ("dcpo", "beta = 250.0"),
        ("smpo", "loss_type = \"ipo\""),
        ("mapo", ""),
    ] {
        let plan = Plan::load(&recipe(tmp.path(), method, extra), &[]).unwrap();
        let m = Method::parse(method, 5).unwrap();
        let beta = extra.strip_prefix("beta = ").map(|b| b.parse::<f64>().unwrap());
        let loss_type = if method == "smpo" {
            LossType::Ipo
        } else {
            LossType::Sigmoid
        };
        assert_eq!(
            plan.objective,
            Objective::for_method(m, beta, loss_type, 0.0).unwrap(),
            "{method}"
        );
    }
    // MaPO's own constants, and the method's paper beta by default.
    let plan = Plan::load(&recipe(tmp.path(), "mapo", ""), &[]).unwrap();
    assert_eq!(
        plan.objective,
        Objective::Mapo {
            beta: 0.1,
            margin_scale: 1000.0,
            snr: 0.5
        }
    );
}

#[test]
fn mapo_with_a_dpo_loss_setting_is_an_error_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("loss_type = \"hinge\"", "train.loss_type"),
        ("label_smoothing = 0.1", "train.label_smoothing"),
    ] {
        let err = Plan::load(&recipe(tmp.path(), "mapo", extra), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains("mapo"), "{extra}: {err}");
    }
}

#[test]
fn train_optimizer_picks_the_kind_and_train_adam_still_means_adamw() {
    let tmp = tempfile::tempdir().unwrap();
    let config = |extra: &str| {
        Plan::load(&recipe(tmp.path(), "dpo", extra), &[])
            .unwrap()
            .raw
            .train
            .optimizer_config()
    };
    assert_eq!(config(""), OptimizerConfig::AdamW(AdamWConfig::default()));
    let adam = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    assert_eq!(config("[train.adam]\nweight_decay = 0.0"), OptimizerConfig::AdamW(adam));
    assert_eq!(
        config("[train.optimizer]\nkind = \"adamw\"\nweight_decay = 0.0"),
        OptimizerConfig::AdamW(adam)
    );
    assert_eq!(
        config("[train.optimizer]\nkind = \"adamw8bit\"\nmin_8bit_size = 16"),
        OptimizerConfig::AdamW8bit(AdamW8bitConfig {
            min_8bit_size: 16,
            ..AdamW8bitConfig::default()
        })
    );
    // The dotted --set the dpo-sdxl recipe suggests for the official optimizer.
    let sets = ["train.optimizer.kind=adafactor", "train.optimizer.weight_decay=0.01"].map(String::from);
    let plan = Plan::load(&recipe(tmp.path(), "dpo", ""), &sets).unwrap();
    assert_eq!(
        plan.raw.train.optimizer_config(),
        OptimizerConfig::Adafactor(AdafactorConfig {
            weight_decay: 0.01,
            ..AdafactorConfig::default()
        })
    );
    assert_eq!(
        config("[train.optimizer]\nkind = \"adafactor\"\nbeta1 = 0.9"),
        OptimizerConfig::Adafactor(AdafactorConfig {
            beta1: Some(0.9),
            ..AdafactorConfig::default()
        })
    );
}

#[test]
fn a_bad_train_optimizer_is_an_error_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, expected) in [
        ("[train.optimizer]\nkind = \"lion\"", "unknown variant `lion`"),
        (
            "[train.optimizer]\nkind = \"adafactor\"\nbeta2 = 0.9",
            "unknown field `beta2`",
        ),
        ("[train.optimizer]\nbeta1 = 0.9", "missing field `kind`"),
        (
            "[train.optimizer]\nkind = \"adamw8bit\"\nbeta2 = 1.5",
            "train.optimizer.beta2: must be in [0, 1), got 1.5",
        ),
        (
            "[train.optimizer]\nkind = \"adafactor\"\nclip_threshold = 0.0",
            "train.optimizer.clip_threshold",
        ),
        ("[train.adam]\neps = -1.0", "train.adam.eps"),
        (
            "[train.adam]\neps = 1e-8\n[train.optimizer]\nkind = \"adamw\"",
            "train.adam: give the optimizer's settings",
        ),
    ] {
        let err = Plan::load(&recipe(tmp.path(), "dpo", extra), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{extra}: {err}");
    }
}
