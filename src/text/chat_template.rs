//! Chat templates: the Jinja `chat_template` of a Hugging Face tokenizer folder rendered over
//! `[{"role", "content"}]` messages as transformers' `apply_chat_template(tokenize=False)` does.
//! Counterpart: `transformers/utils/chat_template_utils.py` (`_compile_jinja_template`,
//! `render_jinja_template`).
//!
//! The environment mirrors transformers': `trim_blocks` and `lstrip_blocks` on, loop controls,
//! the globals `raise_exception(message)` and `strftime_now(format)`, a `tojson` filter that
//! writes as Python's `json.dumps(ensure_ascii=False)` (separators `, ` and `: `, or `indent=N`),
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`, ... from
//! minijinja-contrib's pycompat), undefined variables lenient (empty). The variables are
//! `messages`, `add_generation_prompt`, `tools` and `documents` (none), and the special tokens
//! `bos_token`, `eos_token`, `unk_token`, `pad_token` that `tokenizer_config.json` names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::json::{read_json, read_text};
use crate::{Error, Result};

/// One chat message, as transformers' `apply_chat_template` and TRL's conversational datasets
/// hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or any role the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors.
    source: PathBuf,
    tokens: BTreeMap<String, String>,
}

/// The template's name in the environment.
const NAME: &str = "chat_template";
/// The special tokens transformers passes to the template (its `special_tokens_map`).
const SPECIAL_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

impl ChatTemplate {
    /// The chat template of a tokenizer folder: `tokenizer_config.json`'s `chat_template` (a
    /// string, or a list of `{"name", "template"}` of which `default` is taken), else the file
    /// `chat_template.jinja` transformers 5 writes; `None` when the folder has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Map<String, Json> = if config_path.is_file() {
            read_json(&config_path, "tokenizer config")?
        } else {
            serde_json::Map::new()
        };
        let mut tokens = BTreeMap::new();
        for key in SPECIAL_TOKENS {
            match config.get(key) {
                Some(Json::String(s)) => {
                    tokens.insert(key.to_string(), s.clone());
                }
                Some(Json::Object(o)) => {
                    if let Some(s) = o.get("content").and_then(Json::as_str) {
                        tokens.insert(key.to_string(), s.to_string());
                    }
                }
                _ => {}
            }
        }
        let (template, source) = match config.get("chat_template") {
            Some(Json::String(s)) => (s.clone(), config_path),
            Some(Json::Array(list)) => {
                let default = list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                    Some(s) => (s.to_string(), config_path),
                    None => {
                        return Err(Error::config(
                            &config_path,
                            "chat_template",
                            "a list of templates without one named \"default\"",
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(Error::config(
                    &config_path,
                    "chat_template",
                    format!("expected a string or a list of named templates, got {other}"),
                ))
            }
            None => {
                let file = dir.join("chat_template.jinja");
                if !file.is_file() {
                    return Ok(None);
                }
                (read_text(&file, "chat template")?, file)
            }
        };
        Self::new(&template, tokens, &source).map(Some)
    }

    /// Compiles `template`; `tokens` are the special-token variables (`bos_token` -> `<s>`),
    /// `source` names the template in errors.
    pub fn new(template: &str, tokens: BTreeMap<String, String>, source: &Path) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, template.to_string())
            .map_err(|e| Error::config(source, "chat_template", format!("does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_path_buf(),
            tokens,
        })
    }

    /// Where the template came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Renders `messages`, followed by the assistant header when `add_generation_prompt`; an
    /// error (such as the template's own `raise_exception`) gives the template's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let template = self.env.get_template(NAME).expect("added in new");
        template.render(ctx).map_err(|e| {
            let reason = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => format!("{e:#}"),
            };
            Error::config(&self.source, "chat_template", reason)
        })
    }
}

/// transformers' `raise_exception`: the template refuses its input with `message`.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    use serde::Serialize as _;
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut s =
                serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
            value.serialize(&mut s)
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PySeparators)),
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

/// Python's default JSON separators: `, ` between items, `: ` after keys.
struct PySeparators;

impl serde_json::ser::Formatter for PySeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// transformers' `strftime_now`: the current UTC time formatted as Python's `strftime` does
/// for `%Y %y %m %d %H %M %S %j %b %B %a %A %p %I %%` and glibc's unpadded `%-d %-m %-H %-I`.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    strftime(&format, secs).map(Value::from)
}

/// Formats `secs` since the Unix epoch (UTC); see [`strftime_now`].
fn strftime(format: &str, secs: i64) -> std::result::Result<String, minijinja::Error> {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, min, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days to the civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let piece = match spec {
            Some('Y') => y.to_string(),
            Some('y') => num(y % 100, 2),
            Some('m') => num(m, 2),
            Some('d') => num(d, 2),
            Some('H') => num(h, 2),
            Some('I') => num(h12, 2),
            Some('M') => num(min, 2),
            Some('S') => num(s, 2),
            Some('j') => num(yday, 3),
            Some('b') => MONTHS[(m - 1) as usize][..3].to_string(),
            Some('B') => MONTHS[(m - 1) as usize].to_string(),
            Some('a') => WEEKDAYS[weekday][..3].to_string(),
            Some('A') => WEEKDAYS[weekday].to_string(),
            Some('p') => (if h < 12 { "AM" } else { "PM" }).to_string(),
            Some('%') => "%".to_string(),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported format %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::strftime;

    #[test]
    fn strftime_matches_python() {
        // datetime.fromtimestamp(1721952000 + 3723, timezone.utc).strftime(...), Python 3.11
        let t = 1_721_952_000 + 3723;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %p %j %y", t).unwrap(),
            "Friday July 26, 01:02:03 AM 208 24"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
    }
}
