//! JSON as Python's `json` module writes it: diffusers saves `float("-inf")` (the default of
//! `DPMSolverMultistepScheduler`'s `lambda_min_clipped`) as the bare token `-Infinity`, and
//! likewise `Infinity` and `NaN`, which strict JSON (and serde_json) rejects.
//!
//! [`parse`] turns each such token outside a string into a marker string, and [`float`] /
//! [`optional_float`] read a float-valued key back, markers included.

use serde_json::Value;

/// The marker strings of the non-finite tokens: they start with a NUL character, which no
/// string of a scheduler config holds.
const MARKERS: [(&str, &str, f64); 3] = [
    ("-Infinity", "\u{0}-Infinity", f64::NEG_INFINITY),
    ("Infinity", "\u{0}Infinity", f64::INFINITY),
    ("NaN", "\u{0}NaN", f64::NAN),
];

/// Parses Python-flavoured JSON; serde_json's error is returned for anything else malformed.
pub(crate) fn parse(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str(&quote_non_finite(text))
}

/// `text` with every `-Infinity`, `Infinity` and `NaN` token outside strings replaced by its
/// quoted marker.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                '\\' => {
                    // Keep the escape and the escaped character together.
                    let n = rest[1..].chars().next().map_or(1, |e| 1 + e.len_utf8());
                    out.push_str(&rest[..n]);
                    rest = &rest[n..];
                    continue;
                }
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some((token, marker, _)) = MARKERS.iter().find(|(t, _, _)| rest.starts_with(t)) {
            out.push('"');
            out.push_str(&marker.replace('\u{0}', "\\u0000"));
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The non-finite float a marker string stands for.
fn marker_value(v: &Value) -> Option<f64> {
    let s = v.as_str()?;
    MARKERS.iter().find(|(_, m, _)| *m == s).map(|&(_, _, x)| x)
}

/// A key of any type (non-finite floats are read by [`float`] only).
pub(crate) fn value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// A float-valued key: a JSON number or one of Python's non-finite tokens.
pub(crate) fn float(v: Value) -> Result<f64, String> {
    match marker_value(&v) {
        Some(x) => Ok(x),
        None => value(v),
    }
}

/// An optional float-valued key: `null`, a JSON number or one of Python's non-finite tokens.
pub(crate) fn optional_float(v: Value) -> Result<Option<f64>, String> {
    match v {
        Value::Null => Ok(None),
        v => float(v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_non_finite_tokens_outside_strings_only() {
        let v = parse(r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "NaN -Infinity \" Infinity", "d": 1.5}"#)
            .expect("valid Python JSON");
        assert_eq!(float(v["a"].clone()), Ok(f64::NEG_INFINITY));
        assert_eq!(float(v["b"][0].clone()), Ok(f64::INFINITY));
        assert!(float(v["b"][1].clone()).expect("NaN").is_nan());
        assert_eq!(v["c"], "NaN -Infinity \" Infinity");
        assert_eq!(optional_float(v["d"].clone()), Ok(Some(1.5)));
        assert_eq!(optional_float(Value::Null), Ok(None));
        assert!(float(v["c"].clone()).is_err());
        assert!(parse("{\"a\": -Inf}").is_err());
    }
}
