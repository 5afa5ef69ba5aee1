//! The stage home on disk: its directories, the script search path with positions, and
//! how a script name (`cluster.ready`, `file+id`) resolves to candidate files.

use std::path::{Path, PathBuf};

/// One entry of the search path (`%package`): a directory and its position.
///
/// The position is the entry's index in the list unless a `[n]` prefix forces it. A script
/// loaded from an entry whose position is > 0 is in *fail-over*.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchEntry {
    /// Directory relative to the home ("" = the home itself).
    pub dir: String,
    pub position: usize,
}

impl SearchEntry {
    /// Parses `"package"`, `"[0]lib"` or `"[0]"` at list index `index`.
    pub fn parse(s: &str, index: usize) -> Result<SearchEntry, String> {
        let (position, dir) = match s.strip_prefix('[') {
            Some(rest) => {
                let (n, dir) = rest
                    .split_once(']')
                    .ok_or_else(|| format!("unclosed '[' in search path entry \"{s}\""))?;
                let n = n
                    .parse::<usize>()
                    .map_err(|_| format!("expected a position number inside [] in \"{s}\""))?;
                (n, dir)
            }
            None => (index, s),
        };
        if dir.split('/').any(|c| c == "..") {
            return Err(format!("search path entry \"{s}\" may not leave the stage home"));
        }
        Ok(SearchEntry {
            dir: dir.trim_end_matches('/').to_string(),
            position,
        })
    }
}

/// A candidate file for a script name.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub path: PathBuf,
    pub position: usize,
}

/// The stage home: root directory and search path.
#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
    pub search: Vec<SearchEntry>,
}

impl Home {
    pub fn new(root: &Path, package: &[String]) -> Result<Home, String> {
        let search = package
            .iter()
            .enumerate()
            .map(|(i, s)| SearchEntry::parse(s, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Home {
            root: root.to_path_buf(),
            search,
        })
    }

    /// The directory of a search entry.
    pub fn dir(&self, entry: &SearchEntry) -> PathBuf {
        if entry.dir.is_empty() {
            self.root.clone()
        } else {
            self.root.join(&entry.dir)
        }
    }

    /// Every readable file that `name` may load from, in search order.
    pub fn candidates(&self, name: &str) -> Result<Vec<Candidate>, String> {
        let rel = script_rel_path(name)?;
        Ok(self
            .search
            .iter()
            .map(|e| Candidate {
                path: self.dir(e).join(&rel),
                position: e.position,
            })
            .filter(|c| c.path.is_file())
            .collect())
    }

    /// `package.path` for plain `require`: the same directories, in the same order.
    pub fn lua_package_path(&self) -> String {
        self.search
            .iter()
            .map(|e| format!("{}/?.lua", self.dir(e).display()))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Splits `"file+id"` into the script name and the field to take from what it returns.
pub fn split_name(name: &str) -> (&str, Option<&str>) {
    match name.split_once('+') {
        Some((file, id)) if !id.is_empty() => (file, Some(id)),
        Some((file, _)) => (file, None),
        None => (name, None),
    }
}

/// `cluster.ready` (or STAGE's `cluster:ready`) → `cluster/ready.lua`; names that could
/// leave the home are refused.
pub fn script_rel_path(name: &str) -> Result<PathBuf, String> {
    let name = name.strip_suffix(".lua").unwrap_or(name);
    let colons;
    let name = if name.contains(':') {
        colons = name.replace(':', ".");
        colons.as_str()
    } else {
        name
    };
    if name.is_empty() || name.starts_with('/') || name.split('.').any(|p| p.is_empty() || p.contains("..")) {
        return Err(format!("invalid script name \"{name}\""));
    }
    let mut p = PathBuf::new();
    for part in name.split('.') {
        if part.contains('/') && part.split('/').any(|c| c.is_empty() || c == "..") {
            return Err(format!("invalid script name \"{name}\""));
        }
        p.push(part);
    }
    p.set_extension("lua");
    Ok(p)
}

/// Parses `host:port`, `[v6]:port`; the host part may be empty only before a port.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("expected [ipv6]:port, found \"{s}\""))?;
        (h, p)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| format!("expected host:port, found \"{s}\""))?
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("invalid port \"{port}\" in \"{s}\""))?;
    Ok((host.to_string(), port))
}

/// The scripts STAGE's `%preload` names, in the order they run: each entry is a directory
/// (every `.lua` file in it and below, by name; a `.json` file in it is a list too), a `.lua`
/// file, or a `.json` file holding an entry or a list of entries (an array, or an object
/// whose string values are entries). Relative paths are relative to the home. A missing
/// entry is skipped (as in STAGE); a `.json` file that does not parse is a problem.
pub fn preload_files(root: &Path, entries: &[String]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = vec![];
    let mut problems = vec![];
    for e in entries {
        collect_preload(&root.join(e), root, 0, &mut files, &mut problems);
    }
    (files, problems)
}

fn collect_preload(
    path: &Path,
    root: &Path,
    depth: usize,
    files: &mut Vec<PathBuf>,
    problems: &mut Vec<String>,
) {
    if depth > 8 {
        problems.push(format!("{}: %preload nests deeper than 8 levels", path.display()));
        return;
    }
    if path.is_dir() {
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        children.retain(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        });
        children.sort();
        for c in children {
            collect_preload(&c, root, depth + 1, files, problems);
        }
        return;
    }
    if !path.is_file() {
        return;
    }
    match path.extension().and_then(|x| x.to_str()) {
        Some("lua") if !files.iter().any(|f| f == path) => files.push(path.to_path_buf()),
        Some("lua") => {}
        Some("json") => {
            let parsed = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()));
            let list: Vec<String> = match parsed {
                Ok(serde_json::Value::String(s)) => vec![s],
                Ok(serde_json::Value::Array(a)) => {
                    a.iter().filter_map(|v| v.as_str().map(String::from)).collect()
                }
                Ok(serde_json::Value::Object(m)) => {
                    m.values().filter_map(|v| v.as_str().map(String::from)).collect()
                }
                Ok(_) => vec![],
                Err(e) => {
                    problems.push(format!("{}: %preload list: {e}", path.display()));
                    vec![]
                }
            };
            for e in list {
                collect_preload(&root.join(e), root, depth + 1, files, problems);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_entries_are_dirs_files_and_json_lists() {
        let dir = std::env::temp_dir().join(format!("stage-preload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("preload/sub")).unwrap();
        std::fs::write(dir.join("preload/b.lua"), "").unwrap();
        std::fs::write(dir.join("preload/a.lua"), "").unwrap();
        std::fs::write(dir.join("preload/sub/c.lua"), "").unwrap();
        std::fs::write(dir.join("preload/notes.txt"), "").unwrap();
        std::fs::write(dir.join("one.lua"), "").unwrap();
        std::fs::write(dir.join("list.json"), r#"["one.lua", "missing.lua"]"#).unwrap();
        std::fs::write(dir.join("bad.json"), "[").unwrap();
        let (files, problems) =
            preload_files(&dir, &["preload".into(), "list.json".into(), "bad.json".into()]);
        let names: Vec<String> = files
            .iter()
            .map(|f| f.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            ["preload/a.lua", "preload/b.lua", "preload/sub/c.lua", "one.lua"]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("bad.json"), "{problems:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn search_entries_have_positions() {
        let h = Home::new(
            Path::new("/h"),
            &["package", "[0]lib", "rollback", "[0]"].map(String::from),
        )
        .unwrap();
        let pos: Vec<_> = h.search.iter().map(|e| (e.dir.as_str(), e.position)).collect();
        assert_eq!(pos, vec![("package", 0), ("lib", 0), ("rollback", 2), ("", 0)]);
        assert_eq!(h.dir(&h.search[3]), PathBuf::from("/h"));
        assert!(SearchEntry::parse("[x]lib", 0).is_err());
        assert!(SearchEntry::parse("../etc", 0).is_err());
        assert_eq!(
            h.lua_package_path(),
            "/h/package/?.lua;/h/lib/?.lua;/h/rollback/?.lua;/h/?.lua"
        );
    }

    #[test]
    fn names_map_to_paths() {
        assert_eq!(script_rel_path("grp:sub").unwrap(), PathBuf::from("grp/sub.lua"));
        assert_eq!(script_rel_path("start").unwrap(), PathBuf::from("start.lua"));
        assert_eq!(
            script_rel_path("cluster.ready").unwrap(),
            PathBuf::from("cluster/ready.lua")
        );
        assert!(script_rel_path("../x").is_err());
        assert!(script_rel_path("a..b").is_err());
        assert!(script_rel_path("").is_err());
        assert_eq!(split_name("file+id"), ("file", Some("id")));
        assert_eq!(split_name("file"), ("file", None));
    }

    #[test]
    fn candidates_follow_the_search_order() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["package", "lib", "rollback"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("package/a.lua"), "return 1").unwrap();
        std::fs::write(dir.path().join("rollback/a.lua"), "return 2").unwrap();
        std::fs::write(dir.path().join("lib/b.lua"), "return 3").unwrap();
        let h = Home::new(
            dir.path(),
            &["package", "[0]lib", "rollback", "[0]"].map(String::from),
        )
        .unwrap();
        let a = h.candidates("a").unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].path, dir.path().join("package/a.lua"));
        assert_eq!((a[0].position, a[1].position), (0, 2));
        assert_eq!(h.candidates("b").unwrap()[0].position, 0);
        assert!(h.candidates("c").unwrap().is_empty());
    }

    #[test]
    fn host_port() {
        assert_eq!(parse_host_port("0.0.0.0:8801").unwrap(), ("0.0.0.0".into(), 8801));
        assert_eq!(parse_host_port("[::]:8802").unwrap(), ("::".into(), 8802));
        assert!(parse_host_port("0.0.0.0").is_err());
        assert!(parse_host_port("h:99999").is_err());
    }
}
