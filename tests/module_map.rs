//! The module map of `src/lib.rs` holds: every module uses only the modules listed above it, so
//! the layers (and the folders) tell the same story as the imports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The top-level modules in the map's order, read from the `//! - [`name`]` lines of lib.rs.
fn map_order(lib: &str) -> Vec<String> {
    let mut order = Vec::new();
    for line in lib.lines().filter(|l| l.starts_with("//! - ")) {
        let mut rest = line;
        // Only the module names of the bullet's own links (`[`name`]:`), not paths into them.
        while let Some(start) = rest.find("[`") {
            let after = &rest[start + 2..];
            let end = after.find("`]").expect("a closed link");
            let name = &after[..end];
            if !name.contains("::") && !order.iter().any(|m: &String| m == name) {
                order.push(name.to_string());
            }
            rest = &after[end..];
            if !rest.starts_with("`]:") && !rest.starts_with("`],") {
                break;
            }
        }
    }
    order
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `code` names through `crate::` paths (also inside `crate::{...}` lists).
fn crate_uses(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            // Top-level names of the list: those at brace depth 0.
            let mut depth = 0;
            let mut token = String::new();
            for c in list.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(std::mem::take(&mut token));
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    token.push(c);
                }
            }
            names.insert(token);
        } else {
            names.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    names
        .into_iter()
        .map(|n| n.trim().split("::").next().unwrap_or("").trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

#[test]
fn every_module_uses_only_the_modules_above_it_in_the_map() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = map_order(&lib);
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    assert_eq!(
        order.iter().cloned().collect::<BTreeSet<_>>(),
        declared,
        "the map lists every module once"
    );
    let mut violations = Vec::new();
    for (rank, module) in order.iter().enumerate() {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{module}.rs")));
        }
        for file in files {
            let code = std::fs::read_to_string(&file).unwrap();
            for used in crate_uses(&code) {
                if let Some(r) = order.iter().position(|m| *m == used) {
                    if r > rank {
                        violations.push(format!("{}: {module} uses {used}, listed below it", file.display()));
                    }
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
