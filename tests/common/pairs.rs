//! Preference data and recipes for training tests: JSONL pairs of synthetic disc images.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use diffalign::rng::Rng;

/// A 64x64 image: a disc of `fg` on `bg`, centre and radius jittered by `rng`.
pub fn disc(fg: [u8; 3], bg: [u8; 3], rng: &mut Rng) -> image::RgbImage {
    let cx = 24.0 + 16.0 * rng.uniform();
    let cy = 24.0 + 16.0 * rng.uniform();
    let r = 10.0 + 10.0 * rng.uniform();
    image::RgbImage::from_fn(64, 64, |x, y| {
        let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
        image::Rgb(if d < r { fg } else { bg })
    })
}

/// A JSONL preference set in `dir`: the preferred image shows a red disc, the rejected one a
/// blue disc, both on grey; soft labels in (0.5, 1).
pub fn write_pairs(dir: &Path, n: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut rng = Rng::new(seed);
    let mut lines = String::new();
    for i in 0..n {
        let w = disc([220, 30, 30], [128, 128, 128], &mut rng);
        let l = disc([30, 30, 220], [128, 128, 128], &mut rng);
        w.save(dir.join(format!("img/{i}_w.png"))).unwrap();
        l.save(dir.join(format!("img/{i}_l.png"))).unwrap();
        let p = 0.6 + 0.3 * rng.uniform();
        lines.push_str(
            &serde_json::json!({
                "prompt": "a disc on a grey background",
                "chosen": format!("img/{i}_w.png"),
                "rejected": format!("img/{i}_l.png"),
                "caption_chosen": "a red disc on a grey background",
                "caption_rejected": "a blue disc on a grey background",
                "soft_label": p,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// A recipe in `dir` training `model` with `method` on `data` (20 steps of 2 pairs at 64x64,
/// seed 7), `extra` appended to `[train]`, writing to `dir/out`.
pub fn recipe_for(model: &Path, dir: &Path, data: &Path, method: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"

[data]
format = "jsonl"
path = "{data}"
dual_captions = {dual}

[train]
method = "{method}"
steps = 20
batch_size = 2
lr = 1e-3
resolution = 64
random_flip = false
seed = 7
inversion_steps = 2
{extra}

[output]
dir = "{out}"
"#,
        model = model.display(),
        data = data.display(),
        dual = method == "dcpo",
        out = dir.join("out").display(),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `diffalign train recipe args`; fails the test with its stderr if it fails.
pub fn train(recipe: &Path, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("train")
        .arg(recipe)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Trains 6 steps at once (in `tmp/a`) and in three runs (in `tmp/b`: 2, 3 and 1 steps, resumed
/// twice) from the recipe `recipe(dir)` writes (writing to `dir/out`): the final weights (the
/// LoRA when the recipe trains one, else the UNet) and the metrics must be identical (`what`
/// names the case in failures).
pub fn assert_resume_exact(tmp: &Path, recipe: impl Fn(&Path) -> PathBuf, what: &str) {
    let a = tmp.join("a");
    let b = tmp.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let ra = recipe(&a);
    let rb = recipe(&b);
    let steps = ["--set", "train.steps=6"];
    train(&ra, &steps);
    train(&rb, &[&steps[..], &["--max-steps-this-run", "2"]].concat());
    train(&rb, &[&steps[..], &["--resume", "--max-steps-this-run", "3"]].concat());
    train(&rb, &[&steps[..], &["--resume"]].concat());
    let weights = |dir: &Path| {
        let lora = dir.join("out/pytorch_lora_weights.safetensors");
        super::load(&if lora.exists() {
            lora
        } else {
            dir.join("out/unet/diffusion_pytorch_model.safetensors")
        })
    };
    let (wa, wb) = (weights(&a), weights(&b));
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        let d = super::max_abs_diff(t, &wb[k]);
        assert!(d == 0.0, "{what}: {k}: resumed run differs by {d}");
    }
    let ma = std::fs::read_to_string(a.join("out/metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(b.join("out/metrics.jsonl")).unwrap();
    assert_eq!(ma, mb, "{what}: metrics of the resumed run differ");
}

/// The tensors of a LoRA file, sorted by name.
pub fn sorted_tensors(file: &Path) -> Vec<(String, Tensor)> {
    let mut t: Vec<(String, Tensor)> = super::load(file).into_iter().collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}
