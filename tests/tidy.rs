//! Repository rules that a reviewer would otherwise check by hand.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut files = vec![];
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    assert!(files.len() > 10);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "files without a leading //! doc: {missing:?}");
}

#[test]
fn every_lua_module_has_docs_and_type_stubs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mods = std::fs::read_to_string(root.join("src/lua/mod.rs")).unwrap();
    let mut names = vec![];
    for line in mods.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("(\"") {
            names.push(rest.split('"').next().unwrap().to_string());
        }
    }
    assert!(names.contains(&"stage".to_string()), "{names:?}");
    for n in names {
        assert!(
            root.join(format!("types/{n}.lua")).is_file(),
            "types/{n}.lua is missing"
        );
        let doc = root.join(format!("docs/{n}.md"));
        assert!(doc.is_file(), "docs/{n}.md is missing");
        assert!(
            std::fs::read_to_string(&doc).unwrap().contains("```lua"),
            "docs/{n}.md has no Lua example"
        );
    }
}

/// The code of a Rust file without comments, string and char literals, as a list of tokens:
/// identifiers, `::`, and single punctuation characters. Enough to see paths such as
/// `mlua::Lua` or `crate::{host, lua::value}` without being fooled by prose or strings.
fn tokens(src: &str) -> Vec<String> {
    let c: Vec<char> = src.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == 'r' && matches!(c.get(i + 1), Some('#') | Some('"')) && {
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            c.get(j) == Some(&'"')
        } {
            // raw string r#"..."#
            let mut hashes = 0;
            i += 1;
            while c[i] == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"' && (0..hashes).all(|k| c.get(i + 1 + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '\'' {
            // a char literal ('x', '\n', '\u{..}') or a lifetime ('a): skip literals only
            if c.get(i + 1) == Some(&'\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(c[start..i].iter().collect());
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(ch.to_string());
            }
            i += 1;
        }
    }
    out
}

/// Whether the tokens name the crate `krate` as a path's first segment (`mlua::Lua`,
/// `use mlua;`, `use mlua::{..}`, `::mlua::..`, `extern crate mlua`).
fn uses_crate(toks: &[String], krate: &str) -> bool {
    (0..toks.len()).any(|i| {
        let after_sep = i >= 1 && toks[i - 1] == "::";
        // `::mlua` opens a path unless a segment precedes it (`crate::host::mlua` does not)
        let opens_path = !after_sep || i < 2 || toks[i - 2] == "use" || !is_ident(&toks[i - 2]);
        toks[i] == krate && opens_path
    })
}

fn is_ident(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// Whether the tokens reach the crate's module `module` by path: `crate::lua...`,
/// `super::lua` (from a file whose parent is the crate root), or a `crate::{.., lua, ..}`
/// group.
fn uses_crate_module(toks: &[String], module: &str) -> bool {
    for i in 0..toks.len() {
        if toks[i] != "crate" && toks[i] != "super" || toks.get(i + 1).map(String::as_str) != Some("::") {
            continue;
        }
        // follow `super::super::...`
        let mut j = i + 2;
        while toks.get(j).map(String::as_str) == Some("super")
            && toks.get(j + 1).map(String::as_str) == Some("::")
        {
            j += 2;
        }
        match toks.get(j).map(String::as_str) {
            Some(m) if m == module => return true,
            Some("{") => {
                // the top level of the group: `crate::{a, lua::x, b::{..}}`
                let mut depth = 0;
                let mut expect_name = true;
                for t in &toks[j..] {
                    match t.as_str() {
                        "{" => {
                            depth += 1;
                            expect_name = depth == 1;
                        }
                        "}" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        "," if depth == 1 => expect_name = true,
                        name if depth == 1 && expect_name => {
                            if name == module {
                                return true;
                            }
                            expect_name = false;
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    false
}

/// The core: plain Rust with no Lua in it. Directories are taken whole; a path that does not
/// exist yet (a floor still to come) is skipped.
const CORE: &[&str] = &[
    "src/net",
    "src/router.rs",
    "src/metrics",
    "src/db",
    "src/cloud",
    "src/config.rs",
    "src/home.rs",
    "src/value.rs",
    "src/logging.rs",
    "src/random.rs",
    "src/usage.rs",
    "src/cluster",
    "src/stages",
    "src/admin",
];

fn files_under(root: &Path, rel: &str) -> Vec<std::path::PathBuf> {
    let p = root.join(rel);
    let mut files = vec![];
    if p.is_dir() {
        rust_files(&p, &mut files);
    } else if p.is_file() {
        files.push(p);
    }
    files
}

/// The floors (ARCHITECTURE.md): `main` → `lua/` → `host/` → core. The core does not import
/// mlua; `host/` (which holds the Lua states) may, but it never imports `lua/`.
#[test]
fn floors_point_down() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bad = vec![];
    let mut checked = 0;
    for rel in CORE {
        for f in files_under(root, rel) {
            checked += 1;
            if uses_crate(&tokens(&std::fs::read_to_string(&f).unwrap()), "mlua") {
                bad.push(format!(
                    "{} (core) imports mlua",
                    f.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    assert!(checked >= 10, "only {checked} core files found");
    let host = files_under(root, "src/host");
    assert!(host.len() >= 5, "src/host has {} files", host.len());
    for f in host {
        if uses_crate_module(&tokens(&std::fs::read_to_string(&f).unwrap()), "lua") {
            bad.push(format!(
                "{} (host) imports crate::lua",
                f.strip_prefix(root).unwrap().display()
            ));
        }
    }
    // The admin API sits beside host/: it reads the node's state, never a Lua binding.
    for f in files_under(root, "src/admin") {
        if uses_crate_module(&tokens(&std::fs::read_to_string(&f).unwrap()), "lua") {
            bad.push(format!(
                "{} (admin) imports crate::lua",
                f.strip_prefix(root).unwrap().display()
            ));
        }
    }
    assert!(bad.is_empty(), "imports against the floors:\n{}", bad.join("\n"));
}

#[test]
fn the_floor_check_sees_imports_and_ignores_prose() {
    let t = |s: &str| tokens(s);
    assert!(uses_crate(&t("use mlua::{Lua, Table};"), "mlua"));
    assert!(uses_crate(&t("fn f(l: &mlua::Lua) {}"), "mlua"));
    assert!(uses_crate(&t("use ::mlua::Lua;"), "mlua"));
    assert!(uses_crate(&t("extern crate mlua;"), "mlua"));
    assert!(!uses_crate(
        &t("//! no mlua here\n/* mlua::Lua */ let s = \"mlua::Lua\";"),
        "mlua"
    ));
    assert!(!uses_crate(
        &t("let s = r#\"use mlua::Lua;\"#; let c = '\"';"),
        "mlua"
    ));
    assert!(!uses_crate(&t("use crate::host::mlua;"), "mlua"));
    assert!(uses_crate_module(&t("use crate::lua::value;"), "lua"));
    assert!(uses_crate_module(&t("use crate::{host, lua::bson};"), "lua"));
    assert!(uses_crate_module(&t("use super::super::lua;"), "lua"));
    assert!(uses_crate_module(&t("let x = crate::lua::bindings();"), "lua"));
    assert!(!uses_crate_module(
        &t("use crate::{host::{lua, x}, value};"),
        "lua"
    ));
    assert!(!uses_crate_module(&t("use mlua::Lua; // crate::lua::x"), "lua"));
    assert!(!uses_crate_module(&t("use crate::lua_state;"), "lua"));
}
