//! The key map of OpenCLIP text encoders (SD 2.x, SDXL's second encoder) to transformers'
//! `CLIPTextModel` names: renamed leaves, the fused `attn.in_proj_*` read as three slices, the
//! projection read transposed.

use crate::weights::store::ViewTransform;

/// What the OpenCLIP key map needs from the text encoder's config.
pub(super) struct OpenClip {
    /// `num_hidden_layers` of our encoder.
    pub(super) layers: usize,
    /// Whether our encoder has `text_projection` (`CLIPTextModelWithProjection`).
    pub(super) projection: bool,
    /// Whether the file's block `layers` (its last) is SD 2.x's unused one.
    pub(super) skip_last: bool,
}

/// Our names (and transforms) for the OpenCLIP tensor `rest` (past `...model.`) of `shape`.
pub(super) fn open_clip_name(
    rest: &str,
    shape: &[usize],
    opts: &OpenClip,
) -> std::result::Result<Vec<(String, ViewTransform)>, &'static str> {
    let one = |n: &str| Ok(vec![(n.to_string(), ViewTransform::Identity)]);
    match rest {
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => return one("text_model.final_layer_norm.weight"),
        "ln_final.bias" => return one("text_model.final_layer_norm.bias"),
        // CLIP's contrastive temperature: only image-text similarity uses it.
        "logit_scale" => return Err("CLIP's logit scale, not used to encode text"),
        "text_projection" if opts.projection => {
            return Ok(vec![("text_projection.weight".into(), ViewTransform::Transpose)])
        }
        // SD 2.x: diffusers' text encoder is a CLIPTextModel, which has no projection.
        "text_projection" => return Err("OpenCLIP's text projection, which a CLIPTextModel does not have"),
        _ => {}
    }
    let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
        return Ok(vec![]);
    };
    let Some((k, leaf)) = block.split_once('.') else {
        return Ok(vec![]);
    };
    let Ok(k) = k.parse::<usize>() else {
        return Ok(vec![]);
    };
    if k >= opts.layers {
        return if opts.skip_last && k == opts.layers {
            Err("SD 2.x's last OpenCLIP block, unused: the model conditions on the penultimate block")
        } else {
            Ok(vec![])
        };
    }
    let layer = format!("text_model.encoder.layers.{k}");
    const LEAVES: &[(&str, &str)] = &[
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ];
    if let Some(name) = LEAVES
        .iter()
        .find_map(|(ldm, ours)| leaf.strip_prefix(ldm).map(|l| format!("{layer}.{ours}{l}")))
    {
        return Ok(vec![(name, ViewTransform::Identity)]);
    }
    let kind = match leaf {
        "attn.in_proj_weight" => "weight",
        "attn.in_proj_bias" => "bias",
        _ => return Ok(vec![]),
    };
    // q, k and v stacked along dim 0: [3D, D] (weight) or [3D] (bias).
    match shape.first() {
        Some(&rows) if rows % 3 == 0 => {
            let d = rows / 3;
            Ok(["q", "k", "v"]
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        format!("{layer}.self_attn.{p}_proj.{kind}"),
                        ViewTransform::Narrow {
                            dim: 0,
                            start: i * d,
                            len: d,
                        },
                    )
                })
                .collect())
        }
        _ => Ok(vec![]),
    }
}
