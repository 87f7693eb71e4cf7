//! Reading LoRA files: classifying keys (PEFT, old diffusers, kohya, text encoder), pairing A with B,
//! and each module's scale from `lora_adapter_metadata` (PEFT's `LoraConfig`, read in key order for
//! its patterns), `.alpha` tensors, or 1.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

use super::ldm::LDM_HEADS;
use super::{LoraFormat, METADATA_KEY};
use crate::weights::WeightFile;
use crate::{Error, Result};

/// The components a LoRA file may adapt: name, PEFT / diffusers key prefix, kohya key prefixes
/// (`lora_te_` is SD 1.x/2.x's one text encoder, `lora_te1_` / `lora_te2_` SDXL's two).
pub(super) const COMPONENTS: [(&str, &str, &[&str]); 3] = [
    ("unet", "unet.", &["lora_unet_"]),
    ("text_encoder", "text_encoder.", &["lora_te_", "lora_te1_"]),
    ("text_encoder_2", "text_encoder_2.", &["lora_te2_"]),
];

/// The component whose prefix `key` has, if any.
pub(super) fn component_of(key: &str) -> Option<&'static str> {
    COMPONENTS
        .iter()
        .find(|(_, peft, kohya)| key.starts_with(peft) || kohya.iter().any(|k| key.starts_with(k)))
        .map(|(c, _, _)| *c)
}

/// One adapter's tensors in a file.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// A's key.
    pub a: String,
    /// B's key.
    pub b: String,
    /// The alpha tensor's key, if any.
    pub alpha: Option<String>,
    /// The rank r (A's first dim).
    pub rank: usize,
    /// The factor on B A.
    pub scale: f64,
}

impl Entry {
    /// A's, B's and alpha's keys.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        [&self.a, &self.b].into_iter().chain(self.alpha.as_ref())
    }
}

/// A parsed LoRA file.
pub(super) struct FileLora {
    /// The file, memory-mapped.
    pub file: WeightFile,
    /// Its key form.
    pub format: LoraFormat,
    /// Adapters under diffusers module paths (PEFT and old diffusers forms).
    pub by_module: BTreeMap<String, Entry>,
    /// Adapters under kohya names (module path with dots as underscores).
    pub by_kohya: BTreeMap<String, Entry>,
    /// Whether the kohya names are LDM paths (SDXL, see [`super::ldm`]) rather than diffusers paths.
    pub ldm: bool,
    /// Whether the component is a text encoder (CLIP module paths, with or without `text_model.`).
    pub text_encoder: bool,
    /// Text-encoder keys, sorted.
    pub ignored: Vec<String>,
}

/// One key's role.
enum Role {
    A,
    B,
    Alpha,
}

/// Classifies a non-kohya key of the component (without its prefix): `(module, role, form)`.
fn classify(body: &str) -> Option<(String, Role, LoraFormat)> {
    const SUFFIXES: [(&str, Role, LoraFormat); 7] = [
        (".lora_A.weight", Role::A, LoraFormat::Peft),
        (".lora_B.weight", Role::B, LoraFormat::Peft),
        (".lora_linear_layer.down.weight", Role::A, LoraFormat::OldDiffusers),
        (".lora_linear_layer.up.weight", Role::B, LoraFormat::OldDiffusers),
        (".lora.down.weight", Role::A, LoraFormat::OldDiffusers),
        (".lora.up.weight", Role::B, LoraFormat::OldDiffusers),
        (".alpha", Role::Alpha, LoraFormat::OldDiffusers),
    ];
    for (suffix, role, format) in SUFFIXES {
        if let Some(module) = body.strip_suffix(suffix) {
            // The attention-processor form: `attn1.processor.to_q_lora` is `attn1.to_q.lora`.
            let module = match module.split_once(".processor.") {
                Some((attn, proj)) => {
                    let proj = proj.strip_suffix("_lora")?;
                    let proj = if proj == "to_out" { "to_out.0" } else { proj };
                    format!("{attn}.{proj}")
                }
                None => module.to_string(),
            };
            return Some((module, role, format));
        }
    }
    None
}

#[derive(Default)]
struct Pieces {
    a: Option<String>,
    b: Option<String>,
    alpha: Option<String>,
}

/// Reads the keys and metadata of `file` for `component` (see the parent module's docs).
pub(super) fn parse_file(file: WeightFile, component: &str) -> Result<FileLora> {
    let path = file.path().to_path_buf();
    let mut names = file.names();
    names.sort();
    let (_, prefix, kohya_prefixes) = COMPONENTS
        .iter()
        .find(|(c, _, _)| *c == component)
        .expect("LoraSource::from_file checks the component");
    // Unprefixed keys are the UNet's, in files that hold nothing else (old diffusers).
    let bare_ok = component == "unet" && names.iter().all(|n| component_of(n).is_none_or(|c| c == "unet"));
    let mut ignored = Vec::new();
    let mut unsupported = Vec::new();
    let mut modules: BTreeMap<String, Pieces> = BTreeMap::new();
    let mut kohya: BTreeMap<String, Pieces> = BTreeMap::new();
    let mut formats = BTreeSet::new();
    for name in &names {
        if unimplemented_kind(name).is_some() {
            unsupported.push(name.clone());
        } else if component_of(name).is_some_and(|c| c != component) {
            ignored.push(name.clone());
        } else if let Some(rest) = kohya_prefixes.iter().find_map(|p| name.strip_prefix(p)) {
            let slot = rest.split_once('.').and_then(|(m, role)| {
                let pieces = kohya.entry(m.to_string()).or_default();
                match role {
                    "lora_down.weight" => Some(&mut pieces.a),
                    "lora_up.weight" => Some(&mut pieces.b),
                    "alpha" => Some(&mut pieces.alpha),
                    _ => None,
                }
            });
            match slot {
                Some(s) => *s = Some(name.clone()),
                None => unsupported.push(name.clone()),
            }
            formats.insert(format!("{:?}", LoraFormat::Kohya));
        } else {
            let body = match name.strip_prefix(prefix) {
                Some(b) => Some(b),
                None if bare_ok => Some(name.as_str()),
                None => None,
            };
            match body.and_then(classify) {
                Some((module, role, format)) => {
                    let pieces = modules.entry(module).or_default();
                    let slot = match role {
                        Role::A => &mut pieces.a,
                        Role::B => &mut pieces.b,
                        Role::Alpha => &mut pieces.alpha,
                    };
                    *slot = Some(name.clone());
                    if !matches!(role, Role::Alpha) {
                        formats.insert(format!("{format:?}"));
                    }
                }
                None => unsupported.push(name.clone()),
            }
        }
    }
    // Drop the empty kohya entries made for unsupported roles.
    kohya.retain(|_, p| p.a.is_some() || p.b.is_some() || p.alpha.is_some());
    if !unsupported.is_empty() {
        // Known adapter kinds first, each named with its keys; then keys of no known form.
        let mut kinds: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for k in &unsupported {
            let kind = unimplemented_kind(k).unwrap_or("");
            kinds.entry(kind).or_default().push(k.clone());
        }
        let parts: Vec<String> = kinds
            .iter()
            .map(|(kind, keys)| match *kind {
                "" => format!(
                    "{} key(s) are not {component} LoRA tensors of a supported form (PEFT lora_A/lora_B, \
                     lora.down/lora.up, kohya lora_down/lora_up/alpha; bias terms are not supported): {}",
                    keys.len(),
                    preview(keys)
                ),
                _ => format!(
                    "{kind} is not implemented, only plain LoRA (A/B and alpha): {} key(s): {}",
                    keys.len(),
                    preview(keys)
                ),
            })
            .collect();
        return Err(Error::BadSafetensors {
            file: path,
            reason: parts.join("; "),
        });
    }
    let config = PeftMetadata::from_file(&file, component)?;
    let by_module = modules
        .into_iter()
        .map(|(m, p)| {
            let e = make_entry(&file, &m, p, |m, rank| scale_for(config.as_ref(), &file, m, rank))?;
            Ok((m, e))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let by_kohya = kohya
        .into_iter()
        .map(|(m, p)| Ok((m.clone(), make_entry(&file, &m, p, |_, _| Ok(None))?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    if by_module.is_empty() && by_kohya.is_empty() {
        return Err(Error::BadSafetensors {
            file: path,
            reason: format!(
                "no {component} LoRA tensors (ignored: {} key(s) of other components)",
                ignored.len()
            ),
        });
    }
    let ldm = component == "unet" && by_kohya.keys().any(|k| LDM_HEADS.iter().any(|h| k.starts_with(h)));
    let format = if !by_kohya.is_empty() {
        LoraFormat::Kohya
    } else if formats.contains("Peft") {
        LoraFormat::Peft
    } else {
        LoraFormat::OldDiffusers
    };
    Ok(FileLora {
        file,
        format,
        by_module,
        by_kohya,
        ldm,
        text_encoder: component != "unet",
        ignored,
    })
}

/// The adapter kind a key belongs to when it is a known one that is not implemented (DoRA, the
/// LyCORIS families, full-weight differences), for a refusal that says what the file is.
fn unimplemented_kind(key: &str) -> Option<&'static str> {
    if key.ends_with(".dora_scale") || key.contains(".lora_magnitude_vector") {
        return Some("DoRA (dora_scale / lora_magnitude_vector)");
    }
    // LyCORIS keys are kohya-style: the module name, one dot, the role.
    match key.split_once('.')?.1 {
        r if r.starts_with("hada_") => Some("LyCORIS LoHa (hada_*)"),
        r if r.starts_with("lokr_") => Some("LyCORIS LoKr (lokr_*)"),
        "lora_mid.weight" => Some("LyCORIS Tucker decomposition (lora_mid)"),
        "diff" | "diff_b" => Some("a full weight difference (diff / diff_b)"),
        _ => None,
    }
}

/// Checks a module's pieces (A and B present, equal ranks) and computes its scale: `configured`
/// gives it from the PEFT metadata (`None` without), else `.alpha / r`, else 1.
fn make_entry(
    file: &WeightFile,
    module: &str,
    p: Pieces,
    configured: impl Fn(&str, usize) -> Result<Option<f64>>,
) -> Result<Entry> {
    let path = file.path();
    let missing = |have: &str, what: &str| Error::BadSafetensors {
        file: path.to_path_buf(),
        reason: format!("{have}: LoRA module {module} has no {what}"),
    };
    let (a, b) = match (p.a, p.b, &p.alpha) {
        (Some(a), Some(b), _) => (a, b),
        (Some(a), None, _) => return Err(missing(&a, "up (B) tensor")),
        (None, Some(b), _) => return Err(missing(&b, "down (A) tensor")),
        (None, None, Some(alpha)) => return Err(missing(alpha, "down (A) and up (B) tensors")),
        (None, None, None) => unreachable!("entries are made from keys"),
    };
    let sa = file.shape(&a).expect("listed key");
    let sb = file.shape(&b).expect("listed key");
    if sa.len() < 2 || sb.len() < 2 || sa[0] != sb[1] {
        return Err(Error::config(
            path,
            &b,
            format!("rank does not match {a}: shapes {sa:?} (A, rank first) and {sb:?} (B, rank second)"),
        ));
    }
    let rank = sa[0];
    let scale = match configured(module, rank)? {
        Some(s) => s,
        None => match &p.alpha {
            Some(k) => {
                let t = file.load(k, &Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
                let v = t.to_vec1::<f64>()?;
                match v.as_slice() {
                    [alpha] => alpha / rank as f64,
                    _ => {
                        return Err(Error::config(
                            path,
                            k,
                            format!(
                                "alpha must be a scalar, got shape {:?}",
                                file.shape(k).unwrap_or_default()
                            ),
                        ))
                    }
                }
            }
            None => 1.0,
        },
    };
    Ok(Entry {
        a,
        b,
        alpha: p.alpha,
        rank,
        scale,
    })
}

/// The PEFT config of one component, from `lora_adapter_metadata`.
#[derive(Debug)]
struct PeftMetadata {
    r: usize,
    lora_alpha: f64,
    use_rslora: bool,
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
}

impl PeftMetadata {
    /// `None` when the file has no metadata for `component`.
    fn from_file(file: &WeightFile, component: &str) -> Result<Option<Self>> {
        let Some(text) = file.metadata().get(METADATA_KEY).cloned() else {
            return Ok(None);
        };
        let bad = |reason: String| Error::config(file.path(), METADATA_KEY, reason);
        let entries: Ordered = serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let prefix = format!("{component}.");
        let get = |k: &str| -> Option<&Json> {
            entries
                .0
                .iter()
                .find(|(key, _)| key.strip_prefix(&prefix) == Some(k))
                .map(|(_, v)| v)
        };
        let Some(r) = get("r") else {
            return Ok(None);
        };
        let number = |k: &str, v: &Json| -> Result<f64> {
            match v {
                Json::Value(serde_json::Value::Number(n)) => Ok(n.as_f64().expect("JSON numbers are finite")),
                _ => Err(bad(format!("{prefix}{k}: expected a number, got {v:?}"))),
            }
        };
        let r = number("r", r)?;
        let lora_alpha = match get("lora_alpha") {
            Some(v) => number("lora_alpha", v)?,
            None => 8.0, // PEFT's LoraConfig default
        };
        let use_rslora = matches!(get("use_rslora"), Some(Json::Value(serde_json::Value::Bool(true))));
        for unsupported in ["use_dora", "lora_bias"] {
            if matches!(get(unsupported), Some(Json::Value(serde_json::Value::Bool(true)))) {
                return Err(bad(format!("{prefix}{unsupported}: true is not supported")));
            }
        }
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            match get(k) {
                None | Some(Json::Value(serde_json::Value::Null)) => Ok(Vec::new()),
                Some(Json::Object(o)) => {
                    o.0.iter()
                        .map(|(pk, v)| Ok((pk.clone(), number(&format!("{k}.{pk}"), v)?)))
                        .collect()
                }
                Some(v) => Err(bad(format!("{prefix}{k}: expected an object, got {v:?}"))),
            }
        };
        if r < 1.0 || r.fract() != 0.0 {
            return Err(bad(format!("{prefix}r: expected a positive integer, got {r}")));
        }
        Ok(Some(PeftMetadata {
            r: r as usize,
            lora_alpha,
            use_rslora,
            rank_pattern: pattern("rank_pattern")?,
            alpha_pattern: pattern("alpha_pattern")?,
        }))
    }

    /// PEFT's `get_pattern_key`: the value of the first key `k` with `module` matching `(.*\.)?(k)$`.
    fn lookup(pattern: &[(String, f64)], module: &str) -> Option<f64> {
        pattern.iter().find_map(|(k, v)| {
            let hit = match regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")) {
                Ok(re) => re.is_match(module),
                Err(_) => super::module_matches(module, k),
            };
            hit.then_some(*v)
        })
    }
}

/// The metadata's scale for `module` with tensor rank `rank`; `None` without metadata.
fn scale_for(config: Option<&PeftMetadata>, file: &WeightFile, module: &str, rank: usize) -> Result<Option<f64>> {
    let Some(c) = config else {
        return Ok(None);
    };
    let r = PeftMetadata::lookup(&c.rank_pattern, module).unwrap_or(c.r as f64);
    if r != rank as f64 {
        return Err(Error::config(
            file.path(),
            METADATA_KEY,
            format!("{module}: the config gives rank {r} but its tensors have rank {rank}"),
        ));
    }
    let alpha = PeftMetadata::lookup(&c.alpha_pattern, module).unwrap_or(c.lora_alpha);
    Ok(Some(if c.use_rslora { alpha / r.sqrt() } else { alpha / r }))
}

/// A JSON value whose objects keep their key order (PEFT's pattern lookup takes the first match,
/// and serde_json's own map sorts its keys).
#[derive(Debug)]
enum Json {
    Object(Ordered),
    Value(serde_json::Value),
}

impl Json {
    fn into_value(self) -> serde_json::Value {
        match self {
            Json::Object(o) => serde_json::Value::Object(o.0.into_iter().map(|(k, v)| (k, v.into_value())).collect()),
            Json::Value(v) => v,
        }
    }
}

/// A JSON object's entries in file order.
#[derive(Debug)]
struct Ordered(Vec<(String, Json)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::Object(o) => Ok(o),
            Json::Value(v) => Err(serde::de::Error::custom(format!("expected an object, got {v}"))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> std::result::Result<Json, M::Error> {
                let mut v = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    v.push((k, m.next_value::<Json>()?));
                }
                Ok(Json::Object(Ordered(v)))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> std::result::Result<Json, S::Error> {
                let mut v = Vec::new();
                while let Some(x) = s.next_element::<Json>()? {
                    v.push(x.into_value());
                }
                Ok(Json::Value(serde_json::Value::Array(v)))
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Json, E> {
                Ok(Json::Value(b.into()))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<Json, E> {
                Ok(Json::Value(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<Json, E> {
                Ok(Json::Value(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> std::result::Result<Json, E> {
                Ok(Json::Value(n.into()))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<Json, E> {
                Ok(Json::Value(s.into()))
            }
            fn visit_unit<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Value(serde_json::Value::Null))
            }
            fn visit_none<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Value(serde_json::Value::Null))
            }
        }
        d.deserialize_any(V)
    }
}

fn preview(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    s
}
