//! Package deploy on this node (`PUT /packages`, `GET /packages`, `POST /packages/rollback`;
//! docs/admin.md). A bundle is a tar.gz of a `package/` tree. It is read whole into memory
//! within the size limit (compressed and decompressed), every entry's path and type is
//! checked, every `.lua` file is compiled, and only then is anything written: into a new
//! directory beside `package/`, exchanged with it in one `renameat2(RENAME_EXCHANGE)`, the
//! old tree kept as `package.prev/` for a rollback. Nothing here runs a script.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why a deploy or a rollback was refused; `status()` is the HTTP answer.
#[derive(Debug)]
pub enum Refused {
    /// Over the size limit (413).
    TooLarge(String),
    /// A bad bundle (400): not gzip/tar, a bad path or entry type, a syntax error.
    Bad(String),
    /// Nothing to roll back to (409).
    Conflict(String),
    /// The file system failed (500).
    Io(String),
}

impl Refused {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refused::TooLarge(_) => http::StatusCode::PAYLOAD_TOO_LARGE,
            Refused::Bad(_) => http::StatusCode::BAD_REQUEST,
            Refused::Conflict(_) => http::StatusCode::CONFLICT,
            Refused::Io(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::TooLarge(m) | Refused::Bad(m) | Refused::Conflict(m) | Refused::Io(m) => f.write_str(m),
        }
    }
}

/// One entry of a checked bundle: a path relative to `package/`, and the file's bytes
/// (`None` for a directory).
pub type Entry = (PathBuf, Option<Vec<u8>>);

/// Compiles (never runs) one script: `Err` holds the syntax error, naming `name` and the
/// line. Handed in by `host` (the floor that holds Lua), so this module stays plain Rust.
pub type SyntaxCheck = fn(name: &str, src: &[u8]) -> Result<(), String>;

/// The package directory of the home at `root` and the two names beside it.
pub struct Dirs {
    pub live: PathBuf,
    pub prev: PathBuf,
    next: PathBuf,
}

impl Dirs {
    pub fn new(root: &Path) -> Dirs {
        Dirs {
            live: root.join("package"),
            prev: root.join("package.prev"),
            next: root.join("package.next"),
        }
    }
}

/// Unpacks and checks `body` (a tar.gz) without writing anything.
pub fn unpack(body: &[u8], max: usize, check: SyntaxCheck) -> Result<Vec<Entry>, Refused> {
    let too_large = |what: &str| {
        Refused::TooLarge(format!(
            "the bundle is over the limit of {max} bytes {what} (#admin.packages in conf/stage.json raises it)"
        ))
    };
    if body.len() > max {
        return Err(too_large("compressed"));
    }
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut tar)
        .map_err(|e| {
            Refused::Bad(format!(
                "the body is not a gzip stream ({e}); send a tar.gz of package/"
            ))
        })?;
    if tar.len() > max {
        return Err(too_large("decompressed"));
    }
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut out = vec![];
    let entries = archive
        .entries()
        .map_err(|e| Refused::Bad(format!("the body is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Refused::Bad(format!("the tar archive is damaged: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = checked_path(&raw)
            .map_err(|why| Refused::Bad(format!("entry {name:?}: {why}; nothing was written")))?;
        let kind = entry.header().entry_type();
        let refuse = |what: &str| {
            Refused::Bad(format!(
                "entry {name:?} is {what}: only regular files and directories are taken; nothing was written"
            ))
        };
        match kind {
            tar::EntryType::Directory => {
                if let Some(rel) = rel {
                    out.push((rel, None));
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let Some(rel) = rel else {
                    return Err(refuse("a file named package"));
                };
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| Refused::Bad(format!("entry {name:?}: cannot read it: {e}")))?;
                out.push((rel, Some(data)));
            }
            tar::EntryType::Symlink => return Err(refuse("a symbolic link")),
            tar::EntryType::Link => return Err(refuse("a hard link")),
            other => return Err(refuse(&format!("of type {other:?}"))),
        }
    }
    if !out.iter().any(|(_, d)| d.is_some()) {
        return Err(Refused::Bad(
            "the bundle holds no file under package/ (make it with: tar czf bundle.tgz package)".into(),
        ));
    }
    compile_all(&out, check)?;
    Ok(out)
}

/// The path of an entry relative to `package/` (`None` for `package/` itself), or why not.
fn checked_path(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    let s = std::str::from_utf8(raw).map_err(|_| "the path is not UTF-8")?;
    if s.contains('\0') || s.contains('\\') {
        return Err("the path holds a NUL or a backslash");
    }
    let mut parts = vec![];
    for c in Path::new(s).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path holds `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("the path is absolute"),
        }
    }
    match parts.first() {
        Some(first) if first == "package" => {}
        _ => return Err("the path is not under package/ (make the bundle with: tar czf bundle.tgz package)"),
    }
    if parts.len() == 1 {
        return Ok(None);
    }
    Ok(Some(parts[1..].iter().collect()))
}

/// Compiles every `.lua` file (nothing runs): the first syntax error refuses the bundle.
fn compile_all(entries: &[Entry], check: SyntaxCheck) -> Result<(), Refused> {
    for (rel, data) in entries {
        let Some(data) = data else { continue };
        if rel.extension().is_none_or(|e| e != "lua") {
            continue;
        }
        let shown = Path::new("package").join(rel);
        if let Err(msg) = check(&shown.display().to_string(), data) {
            return Err(Refused::Bad(format!("syntax error: {msg}; nothing was written")));
        }
    }
    Ok(())
}

/// Writes `entries` into a fresh `package.next/`, then exchanges it with `package/` and
/// keeps the old tree as `package.prev/` (the one before it is removed).
pub fn install(dirs: &Dirs, entries: &[Entry]) -> Result<(), Refused> {
    let io = |what: &str, p: &Path, e: std::io::Error| Refused::Io(format!("{what} {}: {e}", p.display()));
    if dirs.next.exists() {
        std::fs::remove_dir_all(&dirs.next).map_err(|e| io("cannot remove the leftover", &dirs.next, e))?;
    }
    std::fs::create_dir(&dirs.next).map_err(|e| io("cannot create", &dirs.next, e))?;
    let written = (|| {
        for (rel, data) in entries {
            let p = dirs.next.join(rel);
            match data {
                None => std::fs::create_dir_all(&p).map_err(|e| io("cannot create", &p, e))?,
                Some(bytes) => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| io("cannot create", parent, e))?;
                    }
                    let mut f = std::fs::File::create(&p).map_err(|e| io("cannot create", &p, e))?;
                    std::io::Write::write_all(&mut f, bytes).map_err(|e| io("cannot write", &p, e))?;
                    f.sync_all().map_err(|e| io("cannot sync", &p, e))?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&dirs.next);
        return Err(e);
    }
    if !dirs.live.exists() {
        return std::fs::rename(&dirs.next, &dirs.live).map_err(|e| io("cannot rename into", &dirs.live, e));
    }
    exchange(&dirs.next, &dirs.live).map_err(|e| io("cannot swap in", &dirs.live, e))?;
    // `next` now holds the old version: it becomes `prev`.
    if dirs.prev.exists() {
        std::fs::remove_dir_all(&dirs.prev).map_err(|e| io("cannot remove", &dirs.prev, e))?;
    }
    std::fs::rename(&dirs.next, &dirs.prev).map_err(|e| io("cannot keep the old version as", &dirs.prev, e))
}

/// Swaps `package/` and `package.prev/`.
pub fn rollback(dirs: &Dirs) -> Result<(), Refused> {
    if !dirs.prev.is_dir() {
        return Err(Refused::Conflict(format!(
            "no previous version to roll back to ({} does not exist; it is kept by PUT /packages)",
            dirs.prev.display()
        )));
    }
    exchange(&dirs.prev, &dirs.live).map_err(|e| {
        Refused::Io(format!(
            "cannot swap {} and {}: {e}",
            dirs.prev.display(),
            dirs.live.display()
        ))
    })
}

/// Exchanges two directories in one step (Linux `renameat2(RENAME_EXCHANGE)`), so that
/// `b` always exists; where the file system cannot, two renames through a third name.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: two NUL-terminated paths that live across the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    let tmp = a.with_extension("swap");
    std::fs::rename(b, &tmp)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&tmp, a)
}

/// The content hash of the tree at `dir`: SHA-256 over its files in path order, each as
/// path, NUL, length (8 bytes, little-endian), contents. `None` when `dir` does not exist.
pub fn hash(dir: &Path) -> std::io::Result<Option<(String, usize)>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files = vec![];
    walk(dir, Path::new(""), &mut files)?;
    files.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for rel in &files {
        let data = std::fs::read(dir.join(rel))?;
        ctx.update(rel.to_string_lossy().as_bytes());
        ctx.update(&[0]);
        ctx.update(&(data.len() as u64).to_le_bytes());
        ctx.update(&data);
    }
    let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some((hex, files.len())))
}

fn walk(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir.join(rel))? {
        let e = e?;
        let r = rel.join(e.file_name());
        let t = e.file_type()?;
        if t.is_dir() {
            walk(dir, &r, out)?;
        } else if t.is_file() {
            out.push(r);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            checked_path(b"package/a.lua").unwrap(),
            Some(PathBuf::from("a.lua"))
        );
        assert_eq!(
            checked_path(b"./package/x/b.lua").unwrap(),
            Some(PathBuf::from("x/b.lua"))
        );
        assert_eq!(checked_path(b"package/").unwrap(), None);
        assert!(checked_path(b"package/../../etc/passwd").is_err());
        assert!(checked_path(b"/etc/passwd").is_err());
        assert!(checked_path(b"other/a.lua").is_err());
        assert!(checked_path(b"package\\..\\a").is_err());
    }
}
