//! Full text-to-image pipelines against diffusers: images from the fixtures' initial noise.

mod common;

use std::path::Path;

use common::*;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::{GenerateRequest, StableDiffusionPipeline};
use diffalign::weights::LoadOptions;

fn json_list(meta: &std::collections::HashMap<String, String>, key: &str) -> Option<Vec<String>> {
    let v = meta.get(key)?;
    if v == "null" {
        return None;
    }
    Some(serde_json::from_str(v).unwrap_or_else(|e| panic!("metadata {key}: {e}")))
}

/// Runs the pipeline in `dir` on its reference's prompts and noise, and compares `prefix.images`.
fn check_pipeline(dir: &Path, prefix: &str, negatives_key: &str) {
    let reference = dir.join("reference.safetensors");
    let meta = metadata(&reference);
    let r = load(&reference);
    let pipe = StableDiffusionPipeline::load(&PipelineSources { root: dir.to_path_buf(), ..Default::default() }, &LoadOptions::default())
        .unwrap();
    let req = GenerateRequest {
        prompts: json_list(&meta, "prompts").unwrap(),
        negative_prompts: json_list(&meta, negatives_key),
        steps: meta["steps"].parse().unwrap(),
        guidance: meta["guidance_scale"].parse().unwrap(),
        height: meta["height"].parse().unwrap(),
        width: meta["width"].parse().unwrap(),
        init_noise: r[&format!("{prefix}.init_noise")].clone(),
        scheduler: None,
        seed: 0,
        time_ids: None,
    };
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert_close(&format!("{} {prefix}.images", dir.display()), &out.images, &r[&format!("{prefix}.images")], IMAGE_ATOL);
}

#[test]
fn pipeline_sd15_ddim_cfg_matches_diffusers() {
    check_pipeline(&shared_fixtures().join("sd15"), "pipe", "negative_prompts");
}

#[test]
fn pipeline_turbo_one_step_matches_diffusers() {
    check_pipeline(&shared_fixtures().join("turbo"), "pipe", "negative_prompts");
}
