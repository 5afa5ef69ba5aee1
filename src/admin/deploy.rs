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
    /// A deploy's staged tree (phase 1).
    pub next: PathBuf,
    /// The version before `prev`, kept while a deploy may still be undone.
    pub undo: PathBuf,
}

impl Dirs {
    pub fn new(root: &Path) -> Dirs {
        Dirs {
            live: root.join("package"),
            prev: root.join("package.prev"),
            next: root.join("package.next"),
            undo: root.join("package.undo"),
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

/// Writes `entries` into a fresh `package.next/` beside `package/` (phase 1 of a deploy:
/// nothing that runs changes). A leftover `package.next/` is replaced.
pub fn stage(dirs: &Dirs, entries: &[Entry]) -> Result<(), Refused> {
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
    Ok(())
}

/// The staged tree (`package.next/`), if any: its hash and file count.
pub fn staged(dirs: &Dirs) -> std::io::Result<Option<(String, usize)>> {
    hash(&dirs.next)
}

/// Removes the staged tree (an aborted deploy).
pub fn discard(dirs: &Dirs) -> Result<(), Refused> {
    if dirs.next.exists() {
        std::fs::remove_dir_all(&dirs.next).map_err(|e| io("cannot remove", &dirs.next, e))?;
    }
    Ok(())
}

fn io(what: &str, p: &Path, e: std::io::Error) -> Refused {
    Refused::Io(format!("{what} {}: {e}", p.display()))
}

/// Phase 2 of a deploy: exchanges the staged `package.next/` with `package/` in one step;
/// the old tree becomes `package.prev/`, and the one before it is kept as `package.undo/`
/// until `finish` (so that `undo_swap` restores all three exactly).
pub fn swap_in(dirs: &Dirs) -> Result<(), Refused> {
    if !dirs.next.is_dir() {
        return Err(Refused::Conflict(format!(
            "nothing is staged ({} does not exist)",
            dirs.next.display()
        )));
    }
    if dirs.undo.exists() {
        std::fs::remove_dir_all(&dirs.undo).map_err(|e| io("cannot remove", &dirs.undo, e))?;
    }
    if dirs.prev.exists() {
        std::fs::rename(&dirs.prev, &dirs.undo).map_err(|e| io("cannot keep", &dirs.prev, e))?;
    }
    if !dirs.live.exists() {
        return std::fs::rename(&dirs.next, &dirs.live).map_err(|e| io("cannot rename into", &dirs.live, e));
    }
    exchange(&dirs.next, &dirs.live).map_err(|e| io("cannot swap in", &dirs.live, e))?;
    // `next` now holds the old version: it becomes `prev`.
    std::fs::rename(&dirs.next, &dirs.prev).map_err(|e| io("cannot keep the old version as", &dirs.prev, e))
}

/// Undoes `swap_in`: the old tree is `package/` again, the one before it `package.prev/`.
pub fn undo_swap(dirs: &Dirs) -> Result<(), Refused> {
    if dirs.prev.is_dir() {
        exchange(&dirs.prev, &dirs.live).map_err(|e| io("cannot swap back", &dirs.live, e))?;
        std::fs::remove_dir_all(&dirs.prev).map_err(|e| io("cannot remove", &dirs.prev, e))?;
    } else if dirs.live.exists() {
        // The deploy created `package/`: it goes again.
        std::fs::remove_dir_all(&dirs.live).map_err(|e| io("cannot remove", &dirs.live, e))?;
    }
    if dirs.undo.exists() {
        std::fs::rename(&dirs.undo, &dirs.prev).map_err(|e| io("cannot restore", &dirs.prev, e))?;
    }
    Ok(())
}

/// Ends a deploy: the version before the previous one (`package.undo/`) is removed.
pub fn finish(dirs: &Dirs) {
    if dirs.undo.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dirs.undo) {
            log::warn!(target: "admin", "cannot remove {}: {e}", dirs.undo.display());
        }
    }
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

    fn tree(root: &Path, dir: &str, v: &str) {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("a.lua"), v).unwrap();
    }

    fn read(root: &Path, dir: &str) -> Option<String> {
        std::fs::read_to_string(root.join(dir).join("a.lua")).ok()
    }

    #[test]
    fn a_swap_is_undone_exactly() {
        let t = std::env::temp_dir().join(format!("stage-deploy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let d = Dirs::new(&t);
        tree(&t, "package", "v2");
        tree(&t, "package.prev", "v1");
        let e: Vec<Entry> = vec![(PathBuf::from("a.lua"), Some(b"v3".to_vec()))];
        stage(&d, &e).unwrap();
        assert_eq!(read(&t, "package").as_deref(), Some("v2"));
        swap_in(&d).unwrap();
        assert_eq!(read(&t, "package").as_deref(), Some("v3"));
        assert_eq!(read(&t, "package.prev").as_deref(), Some("v2"));
        assert_eq!(read(&t, "package.undo").as_deref(), Some("v1"));
        undo_swap(&d).unwrap();
        assert_eq!(read(&t, "package").as_deref(), Some("v2"));
        assert_eq!(read(&t, "package.prev").as_deref(), Some("v1"));
        assert!(!d.undo.exists() && !d.next.exists());
        stage(&d, &e).unwrap();
        discard(&d).unwrap();
        assert!(!d.next.exists());
        stage(&d, &e).unwrap();
        swap_in(&d).unwrap();
        finish(&d);
        assert_eq!(read(&t, "package").as_deref(), Some("v3"));
        assert_eq!(read(&t, "package.prev").as_deref(), Some("v2"));
        assert!(!d.undo.exists());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
