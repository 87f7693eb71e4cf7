//! Full text-to-image pipelines against diffusers: images from the fixtures' initial noise.

mod common;

use std::path::Path;

use common::*;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::{GenerateRequest, StableDiffusionPipeline};

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
    let r = load_on_device(&reference);
    let pipe = StableDiffusionPipeline::load(
        &PipelineSources {
            root: dir.to_path_buf(),
            ..Default::default()
        },
        &load_options(),
    )
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
    assert_close(
        &format!("{} {prefix}.images", dir.display()),
        &out.images,
        &r[&format!("{prefix}.images")],
        IMAGE_ATOL,
    );
}

#[test]
fn pipeline_sd15_ddim_cfg_matches_diffusers() {
    check_pipeline(&shared_fixtures().join("sd15"), "pipe", "negative_prompts");
}

#[test]
fn pipeline_turbo_one_step_matches_diffusers() {
    check_pipeline(&shared_fixtures().join("turbo"), "pipe", "negative_prompts");
}

#[test]
fn pipeline_sd21_v_prediction_non_square_matches_diffusers() {
    check_pipeline(&own_fixtures().join("sd21v"), "pipe", "negative_prompts");
}

#[test]
fn pipeline_sdxl_explicit_negative_prompts_match_diffusers() {
    check_pipeline(&own_fixtures().join("sdxl"), "pipe", "negative_prompts");
}

#[test]
fn pipeline_sdxl_without_negative_prompt_uses_zero_embeddings_like_diffusers() {
    check_pipeline(
        &own_fixtures().join("sdxl"),
        "pipe_noneg",
        "pipe_noneg.negative_prompts",
    );
}

#[test]
fn pipeline_sdxl_turbo_one_step_ancestral_matches_diffusers() {
    check_pipeline(&own_fixtures().join("sdxl-turbo"), "pipe", "negative_prompts");
}

#[test]
fn pipeline_sdxl_prompt_conditioning_matches_diffusers() {
    let dir = own_fixtures().join("sdxl");
    let reference = dir.join("reference.safetensors");
    let meta = metadata(&reference);
    let r = load_on_device(&reference);
    let pipe = StableDiffusionPipeline::load(
        &PipelineSources {
            root: dir.clone(),
            ..Default::default()
        },
        &load_options(),
    )
    .unwrap();
    let prompts = json_list(&meta, "prompts").unwrap();
    let negatives = json_list(&meta, "negative_prompts").unwrap();
    let pos = pipe.encode_text(&prompts).unwrap();
    let neg = pipe.encode_text(&negatives).unwrap();
    assert_close("prompt_embeds", &pos.context, &r["pipe.prompt_embeds"], MODULE_ATOL);
    assert_close(
        "pooled_prompt_embeds",
        pos.pooled.as_ref().unwrap(),
        &r["pipe.pooled_prompt_embeds"],
        MODULE_ATOL,
    );
    assert_close(
        "negative_prompt_embeds",
        &neg.context,
        &r["pipe.negative_prompt_embeds"],
        MODULE_ATOL,
    );
    assert_close(
        "negative_pooled_prompt_embeds",
        neg.pooled.as_ref().unwrap(),
        &r["pipe.negative_pooled_prompt_embeds"],
        MODULE_ATOL,
    );
}
