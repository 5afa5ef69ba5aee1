//! `stage new`: a fresh stage home from the templates in the repository's conf/.

use anyhow::Context;
use std::path::Path;

/// The files of a new home: path → contents.
const FILES: &[(&str, &str)] = &[
    ("conf/stage.json", include_str!("../conf/stage.json")),
    ("conf/log4rs.yaml", include_str!("../conf/log4rs.yaml")),
    ("conf/odbcinst.ini", include_str!("../conf/odbcinst.ini")),
    ("package/start.lua", include_str!("../conf/start.lua")),
];

const DIRS: &[&str] = &["conf", "package", "lib", "rollback", "preload", "logs", "data"];

/// Creates `dir` as a stage home; refuses to write into a non-empty directory.
pub fn new_home(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() && dir.read_dir().map(|mut d| d.next().is_some()).unwrap_or(true) {
        anyhow::bail!("{} already exists and is not empty", dir.display());
    }
    for d in DIRS {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("creating {}", dir.join(d).display()))?;
    }
    for (path, text) in FILES {
        std::fs::write(dir.join(path), text)
            .with_context(|| format!("writing {}", dir.join(path).display()))?;
    }
    Ok(())
}
