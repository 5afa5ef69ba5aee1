//! `stage check`: validates conf/stage.json and compiles every script of a home without
//! running anything, reporting `file:line: message` for each problem.

use std::path::{Path, PathBuf};

/// What `stage check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per problem or warning, ready to print.
    pub lines: Vec<String>,
    pub problems: usize,
    pub scripts: usize,
    pub instances: usize,
}

fn lua_files(dir: &Path, out: &mut Vec<PathBuf>, recurse: bool) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if recurse {
                lua_files(&p, out, true);
            }
        } else if p.extension().is_some_and(|e| e == "lua") {
            out.push(p);
        }
    }
}

pub fn check(root: &Path) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let (root, config, home) = match crate::host::node::open_home(root) {
        Ok(v) => v,
        Err(e) => {
            report.lines.push(format!("{e}"));
            report.problems += 1;
            return Ok(report);
        }
    };
    report.instances = config.startup.len();
    let log_conf = root.join("conf/log4rs.yaml");
    if log_conf.is_file() {
        if let Err(e) = crate::logging::check_file(&log_conf) {
            report.lines.push(format!("conf/log4rs.yaml: {e}"));
            report.problems += 1;
        }
    }
    for w in &config.warnings {
        report.lines.push(format!("conf/stage.json: warning: {w}"));
    }
    let mut files = vec![];
    for entry in &home.search {
        lua_files(&home.dir(entry), &mut files, !entry.dir.is_empty());
    }
    let (preloads, problems) = crate::home::preload_files(&root, &config.lua.preload);
    files.extend(preloads);
    for p in problems {
        report.lines.push(p);
        report.problems += 1;
    }
    files.sort();
    files.dedup();
    let lua = mlua::Lua::new();
    for f in &files {
        report.scripts += 1;
        let rel = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        let src = match std::fs::read(f) {
            Ok(s) => s,
            Err(e) => {
                report.lines.push(format!("{rel}: {e}"));
                report.problems += 1;
                continue;
            }
        };
        if let Err(e) = lua.load(src).set_name(format!("@{rel}")).into_function() {
            report.lines.push(crate::host::script_error::format(&e));
            report.problems += 1;
        }
    }
    for spec in &config.startup {
        if home.candidates(&spec.entry).map(|c| c.is_empty()).unwrap_or(true) {
            report.lines.push(format!(
                "warning: entry script \"{}\" of {} is not in the search path",
                spec.entry, spec.stage_id
            ));
        }
    }
    Ok(report)
}
