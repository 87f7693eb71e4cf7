//! Writing trained LMs: whole weights, PEFT LoRA adapters with merged weights, and the
//! tokenizer and config files beside them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::reward_model::HeadSettings;
use super::LmStepRecord;
use crate::lm::reward_model::HeadKind;
use crate::models::llama::LlamaConfig;
use crate::weights::lora::LoraConfig;
use crate::weights::store::write_atomic;
use crate::weights::{save_safetensors, VarBuilder};
use crate::{Error, Result};

/// PEFT's key prefix for a causal LM's adapters (`base_model.model.<module>.lora_A.weight`).
pub const PEFT_LM_PREFIX: &str = "base_model.model";

/// Writes a LoRA policy: the PEFT adapter and config, and the base weights with the adapters
/// merged (so that every command loads `out/` as a plain model).
pub(super) fn save_lora_policy(
    base_dir: &Path,
    vb: &VarBuilder,
    cfg: &LoraConfig,
    out: &Path,
    records: &[LmStepRecord],
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let adapters: HashMap<String, Tensor> = vb
        .lora_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    save_safetensors(&out.join("adapter_model.safetensors"), &adapters, None)?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": cfg.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base_dir.display().to_string(),
    });
    write_atomic(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&adapter_config).expect("plain JSON") + "\n",
    )?;
    let store = crate::weights::layout::open_weights(base_dir, "model", None)?;
    let merged_by_module: HashMap<String, crate::nn::LoraAdapter> = vb.lora_adapters().into_iter().collect();
    let mut tensors = HashMap::new();
    for name in store.names() {
        let w = store.get(&name, None, DType::F32, &Device::Cpu)?;
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let w = match merged_by_module.get(module) {
            Some(a) => a.fuse(&w.to_device(a.a.device())?)?.to_device(&Device::Cpu)?,
            None => w,
        };
        tensors.insert(name, w);
    }
    save_safetensors(&out.join("model.safetensors"), &tensors, None)?;
    copy_model_files(base_dir, out, records)
}

/// Writes `out/config.json`, `out/model.safetensors` (the backbone's `model.*` weights, the
/// head's, or the whole policy) and `out/metrics.jsonl`, each atomically; copies the tokenizer.
pub(super) fn save_model(
    base_dir: &Path,
    vb: &VarBuilder,
    head: Option<(&VarBuilder, &HeadSettings, &LlamaConfig)>,
    out: &Path,
    records: &[LmStepRecord],
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let keep_all = head.is_none();
    for (name, var) in vb.vars() {
        if keep_all || name.starts_with("model.") {
            tensors.insert(name, var.as_tensor().detach());
        }
    }
    let mut config: serde_json::Value = crate::json::read_json(&base_dir.join("config.json"), "config file")?;
    if let Some((fresh, settings, cfg)) = head {
        for (name, var) in fresh.vars() {
            tensors.insert(name, var.as_tensor().detach());
        }
        let family = match cfg.model_type.as_str() {
            "qwen2" => "Qwen2",
            "mistral" => "Mistral",
            _ => "Llama",
        };
        let obj = config
            .as_object_mut()
            .ok_or_else(|| Error::config(base_dir, "(json)", "not an object"))?;
        obj.remove("tie_word_embeddings");
        match settings.kind {
            HeadKind::Bt => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!([format!("{family}ForSequenceClassification")]),
                );
                obj.insert("num_labels".into(), 1.into());
                obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
                obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            }
            HeadKind::Gpm => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!([format!("{family}ForGeneralPreference")]),
                );
                obj.insert("value_head_dim".into(), settings.gpm_dim.into());
                obj.insert("add_prompt_head".into(), settings.gate.into());
                obj.insert("general_preference_tau".into(), settings.tau.into());
            }
        }
        if obj.get("pad_token_id").is_none_or(|v| v.is_null()) {
            obj.insert("pad_token_id".into(), 0.into());
        }
    }
    save_safetensors(&out.join("model.safetensors"), &tensors, None)?;
    let pretty = serde_json::to_string_pretty(&config).map_err(|e| Error::input("config", e.to_string()))?;
    write_atomic(&out.join("config.json"), pretty + "\n")?;
    copy_model_files(base_dir, out, records)
}

/// Writes `metrics.jsonl` and copies the tokenizer and generation files (and, when `out` has
/// no config yet, the config) from `base_dir`.
fn copy_model_files(base_dir: &Path, out: &Path, records: &[LmStepRecord]) -> Result<()> {
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).expect("plain record") + "\n")
        .collect();
    write_atomic(&out.join("metrics.jsonl"), lines)?;
    if std::fs::canonicalize(base_dir).ok() == std::fs::canonicalize(out).ok() {
        return Ok(());
    }
    for extra in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let from = base_dir.join(extra);
        let keep = extra == "config.json" && out.join(extra).is_file();
        if from.is_file() && !keep {
            crate::weights::copy::copy_file(&from, &out.join(extra))?;
        }
    }
    Ok(())
}
