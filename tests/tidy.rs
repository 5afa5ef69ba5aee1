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
