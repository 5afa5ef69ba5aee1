//! BSON bytes <-> Lua values, directly: decoding walks the raw document bytes and builds Lua
//! tables, encoding walks Lua tables and writes bytes. No intermediate `bson::Document`.
//!
//! This is the broker's hot path (every frame is decoded and every reply encoded), and the
//! safe mlua table API costs about twice the CPU of the Lua C API here (one registry ref per
//! table, a `Value` per field). So the core below is a small unsafe walker over `mlua::ffi`
//! that runs inside ONE protected call (`Lua::exec_raw`) per document.
//!
//! Safety rules of the unsafe core, which every function below keeps:
//! * It only runs inside `exec_raw`, i.e. inside `lua_pcall`: a Lua error (out of memory is
//!   the only one these API calls can raise) unwinds with `longjmp` to that pcall. The frames
//!   it skips hold only `Copy` data and references (`&[u8]`, `&mut Vec<u8>` owned by the
//!   caller outside the pcall), so nothing with a destructor is skipped.
//! * Stack space is reserved with `lua_checkstack` (which never raises) at each nesting level,
//!   and nesting is bounded by [`MAX_DEPTH`], which also turns a cyclic table into an error.
//! * Only raw accessors are used (`lua_rawset`, `lua_rawgeti`, `lua_next`), so no metamethod
//!   (arbitrary Lua code) runs inside the walker, and `lua_tolstring` is only applied to
//!   values that are already strings (it would otherwise convert them in place and confuse
//!   `lua_next`).
//!
//! The mapping (API.md §6, STAGE's where it matters, `lua/helper/lhelper.cpp` of
//! datumflux/platform): document <-> table with string keys; array <-> sequence; int32 and
//! int64 <-> integer; double <-> float; string <-> string; binary <-> string (a string that is
//! not UTF-8 encodes as binary subtype 0); bool; null -> nil (the field is absent; STAGE) and
//! `bundle.null` -> null; datetime <-> integer **seconds** (STAGE; encoded from a `name@D` key
//! or a `{["$date"] = ms}` table); ObjectId <-> `{["$oid"] = hex}`. Rarer types decode as:
//! undefined -> nil, timestamp -> integer, regex -> `{["$regex"], ["$options"]}`, JavaScript
//! code and symbol -> string, decimal128 -> 16-byte string, min/max key -> nil. Binary of any
//! subtype is a string: a Lua function is never loaded from BSON (STAGE loads bytecode from
//! its function subtypes; a client frame must not be able to run code here).
//!
//! Key type hints on encode (STAGE): a key ending in `@X` is written without the suffix and
//! `X` chooses the type: `i` int32, `l` int64, `b` bool (number > 0), `D` datetime from
//! seconds, `f`/`d` double, `A` array, `O` document, `S` symbol, `C` JavaScript code, `B`
//! binary. With [`Mode::stage_arrays`] (opt-in per port and for `bundle.bson`) arrays follow
//! STAGE: a BSON array decodes with its own (0-based) indexes, `"#n"` keys decode as integer
//! keys, and tables encode as documents with integer keys written `"#n"` (`@A` still makes an
//! array).

use mlua::{ffi, Lua, Value};
use std::ffi::c_int;

/// The deepest nesting of documents and arrays accepted in either direction.
pub const MAX_DEPTH: u32 = 100;

/// How arrays map. The default is the standard mapping other languages' clients expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    /// STAGE's arrays: 0-based decode, `"#n"` keys, sequences encoded as `{"#1": ...}`.
    pub stage_arrays: bool,
}

/// Why a document could not be decoded (static texts: no destructor runs under longjmp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    pub what: &'static str,
    /// Byte offset of the problem in the outermost document.
    pub at: usize,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid bson at byte {}: {}", self.at, self.what)
    }
}

/// Decodes one BSON document (exactly `bytes`, length prefix included) into a Lua table.
pub fn decode(lua: &Lua, bytes: &[u8]) -> Result<Value, DecodeError> {
    decode_with(lua, bytes, Mode::default())
}

/// `decode` with a choice of array mapping.
pub fn decode_with(lua: &Lua, bytes: &[u8], mode: Mode) -> Result<Value, DecodeError> {
    let mut err: Option<DecodeError> = None;
    let res = unsafe {
        lua.exec_raw::<Value>((), |l| {
            if let Err(e) = push_doc(l, bytes, 0, false, 0, mode) {
                ffi::lua_settop(l, 0);
                err = Some(e);
                ffi::lua_pushnil(l);
            }
        })
    };
    match (res, err) {
        (_, Some(e)) => Err(e),
        (Ok(v), None) => Ok(v),
        (Err(_), None) => Err(DecodeError {
            what: "out of memory",
            at: 0,
        }),
    }
}

/// Decodes the frames `ranges` of `buf` into `t[1..n]` in ONE protected call: BSON documents
/// when `bson`, else strings (packet payloads, text lines). Returns n; on a bad document,
/// how many were decoded before it, and why it is bad.
pub fn decode_batch(
    lua: &Lua,
    t: &mlua::Table,
    buf: &[u8],
    ranges: &[(usize, usize)],
    bson: bool,
) -> Result<usize, (usize, DecodeError)> {
    decode_batch_with(lua, t, buf, ranges, bson, Mode::default())
}

/// `decode_batch` with a choice of array mapping.
pub fn decode_batch_with(
    lua: &Lua,
    t: &mlua::Table,
    buf: &[u8],
    ranges: &[(usize, usize)],
    bson: bool,
    mode: Mode,
) -> Result<usize, (usize, DecodeError)> {
    let mut done = 0usize;
    let mut err: Option<DecodeError> = None;
    let res = unsafe {
        lua.exec_raw::<()>(t, |l| {
            // Stack index 1 is `t`.
            for (i, &(a, b)) in ranges.iter().enumerate() {
                let bytes = &buf[a..b];
                if bson {
                    if let Err(e) = push_doc(l, bytes, 0, false, 0, mode) {
                        err = Some(e);
                        break;
                    }
                } else {
                    if ffi::lua_checkstack(l, 2) == 0 {
                        err = Some(bad("lua stack exhausted", 0));
                        break;
                    }
                    push_bytes(l, bytes);
                }
                ffi::lua_rawseti(l, 1, (i + 1) as ffi::lua_Integer);
                done = i + 1;
            }
            ffi::lua_settop(l, 0);
        })
    };
    match (res, err) {
        (_, Some(e)) => Err((done, e)),
        (Ok(()), None) => Ok(done),
        (Err(_), None) => Err((done, bad("out of memory", 0))),
    }
}

/// Why a value could not be encoded; `path` names where in the value it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    pub what: String,
    pub path: String,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "cannot encode bson: {}", self.what)
        } else {
            write!(f, "cannot encode bson: {} at {}", self.what, self.path)
        }
    }
}

/// Appends the BSON encoding of `v` (a table) to `out`. On error `out` is left as it was.
pub fn encode(lua: &Lua, v: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encode_with(lua, v, out, Mode::default())
}

/// `encode` with a choice of array mapping.
pub fn encode_with(lua: &Lua, v: &Value, out: &mut Vec<u8>, mode: Mode) -> Result<(), EncodeError> {
    if !matches!(v, Value::Table(_)) {
        return Err(EncodeError {
            what: format!("expected a table, got a {}", v.type_name()),
            path: String::new(),
        });
    }
    let start = out.len();
    let mut err: Option<EncodeError> = None;
    let res = unsafe {
        lua.exec_raw::<()>(v, |l| {
            let known = mode.stage_arrays.then_some(Shape::Document);
            let r = encode_table(l, 1, out, 0, &mut err, known, mode).map(|_| ());
            ffi::lua_settop(l, 0);
            if r.is_err() && err.is_none() {
                err = Some(EncodeError {
                    what: "unknown error".into(),
                    path: String::new(),
                });
            }
        })
    };
    if let Err(e) = res {
        err.get_or_insert(EncodeError {
            what: e.to_string(),
            path: String::new(),
        });
    }
    match err {
        Some(e) => {
            out.truncate(start);
            Err(e)
        }
        None => Ok(()),
    }
}

/// Encodes into a fresh buffer.
pub fn encode_vec(lua: &Lua, v: &Value) -> Result<Vec<u8>, EncodeError> {
    encode_vec_with(lua, v, Mode::default())
}

/// `encode_vec` with a choice of array mapping.
pub fn encode_vec_with(lua: &Lua, v: &Value, mode: Mode) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64);
    encode_with(lua, v, &mut out, mode)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Decoding

fn bad(what: &'static str, at: usize) -> DecodeError {
    DecodeError { what, at }
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_i64(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The cstring starting at `at`: (its bytes, the offset after its NUL).
fn cstr(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(at..)?;
    let n = rest.iter().position(|&c| c == 0)?;
    Some((&rest[..n], at + n + 1))
}

/// A BSON string (int32 length counting the NUL, bytes, NUL) at `at`: (bytes, offset after).
fn bstr(b: &[u8], at: usize, base: usize) -> Result<(&[u8], usize), DecodeError> {
    let len = read_i32(b, at).ok_or(bad("truncated string length", base + at))?;
    if len < 1 {
        return Err(bad("string length below 1", base + at));
    }
    let end = at + 4 + len as usize;
    if end > b.len() || b[end - 1] != 0 {
        return Err(bad("string overruns its document or lacks its NUL", base + at));
    }
    Ok((&b[at + 4..end - 1], end))
}

/// The document at the start of `b`, checked: (its bytes, exactly its declared length).
fn sub_doc(b: &[u8], at: usize, base: usize) -> Result<&[u8], DecodeError> {
    let len = read_i32(b, at).ok_or(bad("truncated document length", base + at))?;
    if len < 5 || at + len as usize > b.len() {
        return Err(bad("document length out of range", base + at));
    }
    Ok(&b[at..at + len as usize])
}

unsafe fn push_bytes(l: *mut ffi::lua_State, s: &[u8]) {
    unsafe { ffi::lua_pushlstring(l, s.as_ptr().cast(), s.len()) };
}

unsafe fn set_key_str(l: *mut ffi::lua_State, t: c_int, k: &str, v: &[u8]) {
    unsafe {
        push_bytes(l, k.as_bytes());
        push_bytes(l, v);
        ffi::lua_rawset(l, t);
    }
}

/// Pushes the document `doc` (length-checked by the caller, or the whole input) as a table.
/// `base` is `doc`'s offset in the outermost document, for error messages.
unsafe fn push_doc(
    l: *mut ffi::lua_State,
    doc: &[u8],
    base: usize,
    array: bool,
    depth: u32,
    mode: Mode,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(bad("nested deeper than 100 levels", base));
    }
    let len = read_i32(doc, 0).ok_or(bad("shorter than 5 bytes", base))?;
    if len < 5 || len as usize != doc.len() {
        return Err(bad("length field does not match the document", base));
    }
    if doc[doc.len() - 1] != 0 {
        return Err(bad("document does not end with NUL", base + doc.len() - 1));
    }
    // SAFETY: see the module comment; only Copy data lives in this frame.
    unsafe {
        if ffi::lua_checkstack(l, 4) == 0 {
            return Err(bad("lua stack exhausted", base));
        }
        // Sizing the table up front saves the rehashes of growing it field by field.
        let n = count_elements(doc).min(1 << 16) as c_int;
        if array {
            ffi::lua_createtable(l, n, 0);
        } else {
            ffi::lua_createtable(l, 0, n);
        }
        let t = ffi::lua_gettop(l);
        let end = doc.len() - 1;
        let mut at = 4;
        let mut index: ffi::lua_Integer = 0;
        while at < end {
            let ty = doc[at];
            let (key, next) = cstr(&doc[..end], at + 1).ok_or(bad("unterminated key", base + at + 1))?;
            at = next;
            // Push the key (arrays use their position, whatever the key text says; STAGE's
            // arrays their key text, and its `"#n"` keys the integer n).
            if mode.stage_arrays {
                match stage_index(key, array) {
                    Some(i) => ffi::lua_pushinteger(l, i),
                    None => push_bytes(l, key),
                }
            } else if array {
                index += 1;
            } else {
                push_bytes(l, key);
            }
            // Whether a key sits on the stack under the value (the table is set with rawset).
            let keyed = mode.stage_arrays || !array;
            let vat = base + at;
            match ty {
                0x01 => {
                    let v = read_i64(doc, at)
                        .filter(|_| at + 8 <= end)
                        .ok_or(bad("truncated double", vat))?;
                    ffi::lua_pushnumber(l, f64::from_bits(v as u64));
                    at += 8;
                }
                0x02 | 0x0D | 0x0E => {
                    let (s, next) = bstr(&doc[..end], at, base)?;
                    push_bytes(l, s);
                    at = next;
                }
                0x03 | 0x04 => {
                    let sub = sub_doc(&doc[..end], at, base)?;
                    push_doc(l, sub, vat, ty == 0x04, depth + 1, mode)?;
                    at += sub.len();
                }
                0x05 => {
                    let n = read_i32(doc, at).ok_or(bad("truncated binary length", vat))?;
                    let start = at + 5;
                    if n < 0 || start + n as usize > end {
                        return Err(bad("binary overruns its document", vat));
                    }
                    push_bytes(l, &doc[start..start + n as usize]);
                    at = start + n as usize;
                }
                0x06 | 0x0A | 0x7F | 0xFF => {
                    // undefined, null (STAGE: nil), min key, max key: no Lua value; the field
                    // is absent (an array keeps the hole).
                    if keyed {
                        ffi::lua_settop(l, -2);
                    }
                    continue;
                }
                0x07 => {
                    let oid = doc
                        .get(at..at + 12)
                        .filter(|_| at + 12 <= end)
                        .ok_or(bad("truncated objectid", vat))?;
                    let mut hex = [0u8; 24];
                    for (i, b) in oid.iter().enumerate() {
                        hex[2 * i] = HEX[(b >> 4) as usize];
                        hex[2 * i + 1] = HEX[(b & 15) as usize];
                    }
                    ffi::lua_createtable(l, 0, 1);
                    set_key_str(l, -3, "$oid", &hex);
                    at += 12;
                }
                0x08 => {
                    let v = *doc
                        .get(at)
                        .filter(|_| at < end)
                        .ok_or(bad("truncated boolean", vat))?;
                    if v > 1 {
                        return Err(bad("boolean is neither 0 nor 1", vat));
                    }
                    ffi::lua_pushboolean(l, v as c_int);
                    at += 1;
                }
                0x09 => {
                    let ms = read_i64(doc, at)
                        .filter(|_| at + 8 <= end)
                        .ok_or(bad("truncated datetime", vat))?;
                    // Seconds, as STAGE (time_t).
                    ffi::lua_pushinteger(l, ms.div_euclid(1000));
                    at += 8;
                }
                0x0B => {
                    let (pat, next) = cstr(&doc[..end], at).ok_or(bad("unterminated regex", vat))?;
                    let (opts, next) =
                        cstr(&doc[..end], next).ok_or(bad("unterminated regex options", vat))?;
                    ffi::lua_createtable(l, 0, 2);
                    set_key_str(l, -3, "$regex", pat);
                    set_key_str(l, -3, "$options", opts);
                    at = next;
                }
                0x10 => {
                    let v = read_i32(doc, at)
                        .filter(|_| at + 4 <= end)
                        .ok_or(bad("truncated int32", vat))?;
                    ffi::lua_pushinteger(l, v as ffi::lua_Integer);
                    at += 4;
                }
                0x11 | 0x12 => {
                    let v = read_i64(doc, at)
                        .filter(|_| at + 8 <= end)
                        .ok_or(bad("truncated int64", vat))?;
                    ffi::lua_pushinteger(l, v);
                    at += 8;
                }
                0x13 => {
                    let d = doc
                        .get(at..at + 16)
                        .filter(|_| at + 16 <= end)
                        .ok_or(bad("truncated decimal128", vat))?;
                    push_bytes(l, d);
                    at += 16;
                }
                _ => return Err(bad("unknown element type", base + at - key.len() - 2)),
            }
            if keyed {
                ffi::lua_rawset(l, t);
            } else {
                ffi::lua_rawseti(l, t, index);
            }
        }
        if at != end {
            return Err(bad("element overruns its document", base + at));
        }
    }
    Ok(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// STAGE's integer key of an element: an array's key text, or `#n` in a document.
fn stage_index(key: &[u8], array: bool) -> Option<ffi::lua_Integer> {
    let digits = if array { key } else { key.strip_prefix(b"#")? };
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A key's type hint (`name@X`): the key without it and the letter.
fn split_hint(key: &[u8]) -> (&[u8], Option<u8>) {
    match key {
        [name @ .., b'@', x] if b"ilbDfdAOSCB".contains(x) => (name, Some(*x)),
        _ => (key, None),
    }
}

/// How many elements `doc` holds, by skipping over them without building anything. Only a
/// size hint: on bytes it does not understand it returns the count so far (the decoder,
/// which validates, reports the problem).
fn count_elements(doc: &[u8]) -> usize {
    let end = doc.len().saturating_sub(1);
    let (mut at, mut n) = (4, 0);
    let len_at = |at: usize| read_i32(doc, at).map(|v| v.max(0) as usize);
    while at < end {
        let ty = doc[at];
        let Some((_, next)) = cstr(&doc[..end], at + 1) else {
            break;
        };
        at = next;
        let size = match ty {
            0x01 | 0x09 | 0x11 | 0x12 => Some(8),
            0x02 | 0x0D | 0x0E => len_at(at).map(|l| 4 + l),
            0x03 | 0x04 => len_at(at),
            0x05 => len_at(at).map(|l| 5 + l),
            0x06 | 0x0A | 0x7F | 0xFF => Some(0),
            0x07 => Some(12),
            0x08 => Some(1),
            0x10 => Some(4),
            0x13 => Some(16),
            _ => None,
        };
        match size {
            Some(sz) => at += sz,
            None => break,
        }
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------
// Encoding

fn enc_err(err: &mut Option<EncodeError>, what: String) -> Result<(), ()> {
    *err = Some(EncodeError {
        what,
        path: String::new(),
    });
    Err(())
}

/// Prefixes the error's path with `key` while the error unwinds through the levels.
fn add_path(err: &mut Option<EncodeError>, key: &[u8]) {
    if let Some(e) = err {
        let k = String::from_utf8_lossy(key);
        e.path = if e.path.is_empty() {
            k.into_owned()
        } else {
            format!("{k}.{}", e.path)
        };
    }
}

unsafe fn to_bytes<'a>(l: *mut ffi::lua_State, idx: c_int) -> &'a [u8] {
    let mut len = 0usize;
    // SAFETY: the caller checked that the value is a string, so no conversion happens, and
    // the string stays alive on the stack while the slice is used.
    unsafe {
        let p = ffi::lua_tolstring(l, idx, &mut len);
        std::slice::from_raw_parts(p.cast(), len)
    }
}

/// How the table at `t` is shaped, from one `lua_next` pass.
enum Shape {
    /// Keys exactly 1..n (n > 0).
    Array(i64),
    Document,
}

unsafe fn shape(l: *mut ffi::lua_State, t: c_int) -> Shape {
    let (mut count, mut max, mut all_int) = (0i64, 0i64, true);
    unsafe {
        // No `t[1]` means it cannot be a sequence: skip the counting pass (the common case
        // of a document with string keys costs one traversal, not two).
        if ffi::lua_rawlen(l, t) == 0 {
            return Shape::Document;
        }
        ffi::lua_pushnil(l);
        while ffi::lua_next(l, t) != 0 {
            count += 1;
            if all_int {
                if ffi::lua_type(l, -2) == ffi::LUA_TNUMBER && ffi::lua_isinteger(l, -2) != 0 {
                    let k = ffi::lua_tointegerx(l, -2, std::ptr::null_mut());
                    if k < 1 {
                        all_int = false;
                    }
                    max = max.max(k);
                } else {
                    all_int = false;
                }
            }
            ffi::lua_settop(l, -2);
        }
    }
    if all_int && count > 0 && max == count {
        Shape::Array(count)
    } else {
        Shape::Document
    }
}

/// A document `{["$date"] = integer}` or `{["$oid"] = 24 hex digits}` was just written as
/// element `key` starting at `elem` (type byte) in `out`, with its body at `body`; rewrites it
/// as a datetime or an ObjectId element. Checking the written bytes (rare, single-field
/// documents only) costs less than a separate pass over every table.
fn rewrite_special(out: &mut Vec<u8>, elem: usize, body: usize, key: &[u8]) {
    let inner = &out[body + 4..];
    let (ty, rest) = match inner.split_first() {
        Some(x) => x,
        None => return,
    };
    let special = if let Some(v) = rest.strip_prefix(b"$date\0") {
        match *ty {
            // The bytes were written just now by `encode_element`, so the value is complete.
            0x10 => Some((
                0x09,
                (i32::from_le_bytes([v[0], v[1], v[2], v[3]]) as i64)
                    .to_le_bytes()
                    .to_vec(),
            )),
            0x12 => Some((0x09, v[..8].to_vec())),
            _ => None,
        }
    } else if let Some(v) = rest.strip_prefix(b"$oid\0") {
        // int32 length 25, 24 hex digits, NUL.
        (*ty == 0x02 && v.len() >= 29 && v[..4] == 25i32.to_le_bytes())
            .then(|| parse_oid(&v[4..28]))
            .flatten()
            .map(|oid| (0x07, oid.to_vec()))
    } else {
        None
    };
    if let Some((t, value)) = special {
        out.truncate(elem);
        out.push(t);
        put_key(out, key);
        out.extend_from_slice(&value);
    }
}

fn parse_oid(hex: &[u8]) -> Option<[u8; 12]> {
    if hex.len() != 24 {
        return None;
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut oid = [0u8; 12];
    for (i, b) in oid.iter_mut().enumerate() {
        *b = nib(hex[2 * i])? << 4 | nib(hex[2 * i + 1])?;
    }
    Some(oid)
}

fn put_key(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(key);
    out.push(0);
}

/// Writes the table at absolute index `t` as a document body (length, elements, NUL).
unsafe fn encode_table(
    l: *mut ffi::lua_State,
    t: c_int,
    out: &mut Vec<u8>,
    depth: u32,
    err: &mut Option<EncodeError>,
    known: Option<Shape>,
    mode: Mode,
) -> Result<u32, ()> {
    if depth > MAX_DEPTH {
        return enc_err(err, "tables nested deeper than 100 levels (a cycle?)".into()).map(|_| 0);
    }
    let mut count = 0u32;
    // SAFETY: see the module comment.
    unsafe {
        if ffi::lua_checkstack(l, 6) == 0 {
            return enc_err(err, "lua stack exhausted".into()).map(|_| 0);
        }
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let shape = match known {
            Some(s) => s,
            None => shape(l, t),
        };
        match shape {
            Shape::Array(n) => {
                let mut buf = itoa_buf();
                for i in 1..=n {
                    ffi::lua_rawgeti(l, t, i);
                    let key = itoa(&mut buf, i - 1);
                    let r = encode_element(l, key, out, depth, err, mode);
                    ffi::lua_settop(l, -2);
                    if r.is_err() {
                        add_path(err, itoa(&mut itoa_buf(), i));
                        return Err(());
                    }
                }
            }
            Shape::Document => {
                let mut buf = itoa_buf();
                let mut hashed = [0u8; 25];
                ffi::lua_pushnil(l);
                while ffi::lua_next(l, t) != 0 {
                    let key: &[u8] = match ffi::lua_type(l, -2) {
                        ffi::LUA_TSTRING => to_bytes(l, -2),
                        ffi::LUA_TNUMBER if ffi::lua_isinteger(l, -2) != 0 => {
                            let n = itoa(&mut buf, ffi::lua_tointegerx(l, -2, std::ptr::null_mut()));
                            if mode.stage_arrays {
                                // STAGE writes integer keys as "#n".
                                hashed[0] = b'#';
                                hashed[1..=n.len()].copy_from_slice(n);
                                &hashed[..=n.len()]
                            } else {
                                n
                            }
                        }
                        _ => {
                            let tn = type_name(ffi::lua_type(l, -2));
                            return enc_err(err, format!("a {tn} key (keys must be strings)")).map(|_| 0);
                        }
                    };
                    if key.contains(&0) {
                        enc_err(err, "a key containing NUL".into())?;
                    }
                    if encode_element(l, key, out, depth, err, mode).is_err() {
                        add_path(err, key);
                        return Err(());
                    }
                    count += 1;
                    ffi::lua_settop(l, -2);
                }
            }
        }
        out.push(0);
        let len = (out.len() - start) as i32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }
    Ok(count)
}

fn type_name(t: c_int) -> &'static str {
    match t {
        ffi::LUA_TNIL => "nil",
        ffi::LUA_TBOOLEAN => "boolean",
        ffi::LUA_TLIGHTUSERDATA => "light userdata",
        ffi::LUA_TNUMBER => "number",
        ffi::LUA_TSTRING => "string",
        ffi::LUA_TTABLE => "table",
        ffi::LUA_TFUNCTION => "function",
        ffi::LUA_TUSERDATA => "userdata",
        ffi::LUA_TTHREAD => "thread",
        _ => "value",
    }
}

/// Writes the value on top of the stack as element `key` (a `name@X` key: as element `name`
/// of the type `X` asks for).
unsafe fn encode_element(
    l: *mut ffi::lua_State,
    key: &[u8],
    out: &mut Vec<u8>,
    depth: u32,
    err: &mut Option<EncodeError>,
    mode: Mode,
) -> Result<(), ()> {
    let (key, hint) = split_hint(key);
    // SAFETY: see the module comment.
    unsafe {
        match ffi::lua_type(l, -1) {
            ffi::LUA_TBOOLEAN => {
                out.push(0x08);
                put_key(out, key);
                out.push((ffi::lua_toboolean(l, -1) != 0) as u8);
            }
            ffi::LUA_TNUMBER => {
                let int = ffi::lua_isinteger(l, -1) != 0;
                let i = if int {
                    ffi::lua_tointegerx(l, -1, std::ptr::null_mut())
                } else {
                    ffi::lua_tonumberx(l, -1, std::ptr::null_mut()) as i64
                };
                let f = || ffi::lua_tonumberx(l, -1, std::ptr::null_mut());
                match hint {
                    Some(b'i') => {
                        out.push(0x10);
                        put_key(out, key);
                        out.extend_from_slice(&(i as i32).to_le_bytes());
                    }
                    Some(b'l') => {
                        out.push(0x12);
                        put_key(out, key);
                        out.extend_from_slice(&i.to_le_bytes());
                    }
                    Some(b'b') => {
                        out.push(0x08);
                        put_key(out, key);
                        out.push((f() > 0.0) as u8);
                    }
                    Some(b'D') => {
                        out.push(0x09);
                        put_key(out, key);
                        out.extend_from_slice(&i.saturating_mul(1000).to_le_bytes());
                    }
                    Some(b'f' | b'd') => {
                        out.push(0x01);
                        put_key(out, key);
                        out.extend_from_slice(&f().to_le_bytes());
                    }
                    _ if int => {
                        if let Ok(small) = i32::try_from(i) {
                            out.push(0x10);
                            put_key(out, key);
                            out.extend_from_slice(&small.to_le_bytes());
                        } else {
                            out.push(0x12);
                            put_key(out, key);
                            out.extend_from_slice(&i.to_le_bytes());
                        }
                    }
                    _ => {
                        out.push(0x01);
                        put_key(out, key);
                        out.extend_from_slice(&f().to_le_bytes());
                    }
                }
            }
            ffi::LUA_TSTRING => {
                let s = to_bytes(l, -1);
                let utf8 = std::str::from_utf8(s).is_ok();
                match hint {
                    Some(h @ (b'S' | b'C')) if utf8 => {
                        out.push(if h == b'S' { 0x0E } else { 0x0D });
                        put_key(out, key);
                        out.extend_from_slice(&((s.len() + 1) as i32).to_le_bytes());
                        out.extend_from_slice(s);
                        out.push(0);
                    }
                    Some(b'B') => {
                        out.push(0x05);
                        put_key(out, key);
                        out.extend_from_slice(&(s.len() as i32).to_le_bytes());
                        out.push(0);
                        out.extend_from_slice(s);
                    }
                    _ if utf8 => {
                        out.push(0x02);
                        put_key(out, key);
                        out.extend_from_slice(&((s.len() + 1) as i32).to_le_bytes());
                        out.extend_from_slice(s);
                        out.push(0);
                    }
                    _ => {
                        out.push(0x05);
                        put_key(out, key);
                        out.extend_from_slice(&(s.len() as i32).to_le_bytes());
                        out.push(0);
                        out.extend_from_slice(s);
                    }
                }
            }
            ffi::LUA_TLIGHTUSERDATA if ffi::lua_touserdata(l, -1).is_null() => {
                out.push(0x0A);
                put_key(out, key);
            }
            ffi::LUA_TTABLE => {
                let t = ffi::lua_gettop(l);
                let s = match hint {
                    // `@A`: the sequence part as an array, whatever else the table holds.
                    Some(b'A') => Shape::Array(ffi::lua_rawlen(l, t) as i64),
                    Some(b'O') => Shape::Document,
                    _ if mode.stage_arrays => Shape::Document,
                    _ => shape(l, t),
                };
                let array = matches!(s, Shape::Array(_));
                let elem = out.len();
                out.push(if array { 0x04 } else { 0x03 });
                put_key(out, key);
                let body = out.len();
                let fields = encode_table(l, t, out, depth + 1, err, Some(s), mode)?;
                if !array && fields == 1 {
                    rewrite_special(out, elem, body, key);
                }
            }
            other => {
                return enc_err(err, format!("a {} value", type_name(other)));
            }
        }
    }
    Ok(())
}

type ItoaBuf = [u8; 24];

fn itoa_buf() -> ItoaBuf {
    [0; 24]
}

/// Decimal text of `n` in `buf`, without allocating.
fn itoa(buf: &mut ItoaBuf, n: i64) -> &[u8] {
    let mut i = buf.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Table;

    fn roundtrip(lua: &Lua, src: &str) -> Value {
        let v: Value = lua.load(src).eval().unwrap();
        let bytes = encode_vec(lua, &v).unwrap();
        decode(lua, &bytes).unwrap()
    }

    #[test]
    fn known_bytes() {
        let lua = Lua::new();
        // {"a": 1} as int32
        let v: Value = lua.load("return {a = 1}").eval().unwrap();
        assert_eq!(
            encode_vec(&lua, &v).unwrap(),
            vec![12, 0, 0, 0, 0x10, b'a', 0, 1, 0, 0, 0, 0]
        );
        let t = decode(&lua, &[12, 0, 0, 0, 0x10, b'a', 0, 1, 0, 0, 0, 0]).unwrap();
        let t = t.as_table().unwrap();
        assert_eq!(t.get::<i64>("a").unwrap(), 1);
    }

    #[test]
    fn types_round_trip() {
        let lua = Lua::new();
        lua.globals().set("null", Value::NULL).unwrap();
        let v = roundtrip(
            &lua,
            r#"return {i = 7, big = 1 << 40, f = 1.5, s = "héllo", b = "\0\255", t = true,
                       n = null, arr = {1, "two", {x = 3}}, d = {["$date"] = 1700000000000},
                       o = {["$oid"] = "0123456789abcdef01234567"}, e = {}, neg = -5}"#,
        );
        let t: Table = v.as_table().unwrap().clone();
        lua.globals().set("r", t).unwrap();
        let ok: bool = lua
            .load(
                r#"return math.type(r.i) == "integer" and r.i == 7 and r.big == 1 << 40
                and math.type(r.f) == "float" and r.f == 1.5 and r.s == "héllo" and r.b == "\0\255"
                and r.t == true and r.n == nil and r.arr[1] == 1 and r.arr[2] == "two"
                and r.arr[3].x == 3 and #r.arr == 3 and r.d == 1700000000
                and r.o["$oid"] == "0123456789abcdef01234567" and next(r.e) == nil and r.neg == -5"#,
            )
            .eval()
            .unwrap();
        assert!(ok);
    }

    #[test]
    fn special_documents_become_bson_types() {
        let lua = Lua::new();
        let v: Value = lua
            .load(
                r#"return {kd = {["$date"] = 5}, ko = {["$oid"] = "0123456789abcdef01234567"},
                             knd = {["$date"] = "x"}, kno = {["$oid"] = "xyz"}}"#,
            )
            .eval()
            .unwrap();
        let b = encode_vec(&lua, &v).unwrap();
        // Find each element's type byte by its key.
        let ty = |key: &[u8]| {
            let k = [key, b"\0"].concat();
            let at = b.windows(k.len()).position(|w| w == k.as_slice()).unwrap();
            b[at - 1]
        };
        assert_eq!(ty(b"kd"), 0x09);
        assert_eq!(ty(b"ko"), 0x07);
        assert_eq!(ty(b"knd"), 0x03);
        assert_eq!(ty(b"kno"), 0x03);
        let d: Value = decode(&lua, &b).unwrap();
        let t = d.as_table().unwrap();
        // 5 ms is second 0 (dates decode as seconds, as STAGE).
        assert_eq!(t.get::<i64>("kd").unwrap(), 0);
        assert_eq!(
            t.get::<Table>("knd").unwrap().get::<String>("$date").unwrap(),
            "x"
        );
    }

    #[test]
    fn null_date_and_key_hints_as_stage() {
        let lua = Lua::new();
        lua.globals().set("null", Value::NULL).unwrap();
        let v: Value = lua
            .load(
                r#"return {n = null, ["at@D"] = 1700000000, ["i@i"] = 1 << 40, ["l@l"] = 3,
                   ["f@d"] = 2, ["yes@b"] = 1, ["nope@b"] = 0, ["s@S"] = "sym", ["c@C"] = "x = 1",
                   ["raw@B"] = "bin", ["a@A"] = {1, 2, k = 9}, ["obj@O"] = {7, 8}, ["plain@z"] = 1,
                   list = {10, null, 30}}"#,
            )
            .eval()
            .unwrap();
        let b = encode_vec(&lua, &v).unwrap();
        // The type byte of each top-level element, by key (a walk, not a byte search).
        let mut types = std::collections::HashMap::new();
        let mut at = 4;
        while b[at] != 0 {
            let t = b[at];
            let (k, next) = cstr(&b, at + 1).unwrap();
            let size = match t {
                0x01 | 0x09 | 0x12 => 8,
                0x10 => 4,
                0x08 => 1,
                0x0A => 0,
                0x02 | 0x0D | 0x0E => 4 + read_i32(&b, next).unwrap() as usize,
                0x05 => 5 + read_i32(&b, next).unwrap() as usize,
                0x03 | 0x04 => read_i32(&b, next).unwrap() as usize,
                other => panic!("type {other}"),
            };
            types.insert(k.to_vec(), t);
            at = next + size;
        }
        let ty = |key: &[u8]| *types.get(key).unwrap_or_else(|| panic!("{key:?}"));
        assert_eq!(ty(b"n"), 0x0A, "bundle.null encodes as null");
        assert_eq!(ty(b"at"), 0x09, "@D: datetime");
        assert_eq!(ty(b"i"), 0x10, "@i: int32");
        assert_eq!(ty(b"l"), 0x12, "@l: int64");
        assert_eq!(ty(b"f"), 0x01, "@d: double");
        assert_eq!(ty(b"yes"), 0x08, "@b: bool");
        assert_eq!(ty(b"s"), 0x0E, "@S: symbol");
        assert_eq!(ty(b"c"), 0x0D, "@C: code");
        assert_eq!(ty(b"raw"), 0x05, "@B: binary");
        assert_eq!(ty(b"a"), 0x04, "@A: array");
        assert_eq!(ty(b"obj"), 0x03, "@O: document");
        assert_eq!(ty(b"plain@z"), 0x10, "an unknown letter is part of the key");
        let d: Table = decode(&lua, &b).unwrap().as_table().unwrap().clone();
        lua.globals().set("r", d).unwrap();
        let ok: bool = lua
            .load(
                r#"return r.n == nil and r.at == 1700000000 and r.i == 0 and r.l == 3
                and math.type(r.f) == "float" and r.yes == true and r.nope == false and r.s == "sym"
                and r.c == "x = 1" and r.raw == "bin" and #r.a == 2 and r.a.k == nil
                and r.obj["1"] == 7 and r.list[1] == 10 and r.list[2] == nil and r.list[3] == 30"#,
            )
            .eval()
            .unwrap();
        assert!(ok);
    }

    #[test]
    fn stage_arrays_are_opt_in() {
        let lua = Lua::new();
        let stage = Mode { stage_arrays: true };
        let v: Value = lua
            .load(r#"return {list = {"a", "b"}, [5] = "five", ["x@A"] = {1}}"#)
            .eval()
            .unwrap();
        let b = encode_vec_with(&lua, &v, stage).unwrap();
        assert!(b.windows(3).any(|w| w == b"#1\0"), "sequences as {{\"#1\": ...}}");
        assert!(b.windows(3).any(|w| w == b"#5\0"), "integer keys as #n");
        let back: Table = decode_with(&lua, &b, stage).unwrap().as_table().unwrap().clone();
        assert_eq!(back.get::<Table>("list").unwrap().get::<String>(1).unwrap(), "a");
        assert_eq!(back.get::<String>(5).unwrap(), "five");
        // @A still writes an array, which STAGE's mapping decodes 0-based.
        assert_eq!(back.get::<Table>("x").unwrap().get::<i64>(0).unwrap(), 1);
        // The standard mapping reads the same bytes with string keys and 1-based arrays.
        let std: Table = decode(&lua, &b).unwrap().as_table().unwrap().clone();
        assert_eq!(
            std.get::<Table>("list").unwrap().get::<String>("#1").unwrap(),
            "a"
        );
        assert_eq!(std.get::<Table>("x").unwrap().get::<i64>(1).unwrap(), 1);
    }

    #[test]
    fn encode_errors_name_the_path() {
        let lua = Lua::new();
        let v: Value = lua.load("return {a = {b = {print}}}").eval().unwrap();
        let e = encode_vec(&lua, &v).unwrap_err();
        assert_eq!(e.to_string(), "cannot encode bson: a function value at a.b.1");
        let v: Value = lua.load("local t = {} t.t = t return t").eval().unwrap();
        assert!(encode_vec(&lua, &v).unwrap_err().what.contains("deeper than 100"));
        let v: Value = lua.load("return {[true] = 1}").eval().unwrap();
        assert!(encode_vec(&lua, &v).unwrap_err().what.contains("boolean key"));
        assert!(encode_vec(&lua, &Value::Integer(1)).is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        let lua = Lua::new();
        for bad in [
            &[][..],
            &[5, 0, 0, 0][..],
            &[4, 0, 0, 0, 0][..],
            &[5, 0, 0, 0, 1][..],
            &[12, 0, 0, 0, 0x10, b'a', 0, 1, 0, 0, 0, 1][..],
            &[12, 0, 0, 0, 0x42, b'a', 0, 1, 0, 0, 0, 0][..],
            &[10, 0, 0, 0, 0x02, b'a', 0, 200, 0, 0][..],
            &[11, 0, 0, 0, 0x03, b'a', 0, 1, 0, 0, 0][..],
        ] {
            assert!(decode(&lua, bad).is_err(), "{bad:?}");
        }
    }

    /// Random tables round-trip, and random mutations of valid documents never crash.
    #[test]
    fn fuzz_round_trip_and_mutations() {
        let lua = Lua::new();
        let gen: mlua::Function = lua
            .load(
                r#"
                local function gen(depth)
                    local t, n = {}, math.random(0, 6)
                    local arr = math.random() < 0.3
                    for i = 1, n do
                        local r = math.random(1, 7)
                        local v
                        if r == 1 then v = math.random(-1 << 40, 1 << 40)
                        elseif r == 2 then v = math.random() * 1e6
                        elseif r == 3 then v = string.rep("x", math.random(0, 20))
                        elseif r == 4 then v = string.char(math.random(128, 255), 0)
                        elseif r == 5 then v = math.random() < 0.5
                        elseif depth < 4 then v = gen(depth + 1) else v = 1 end
                        if arr then t[i] = v else t["k" .. i] = v end
                    end
                    return t
                end
                local function same(a, b)
                    if type(a) ~= type(b) then return false end
                    if type(a) ~= "table" then return a == b and math.type(a) == math.type(b) end
                    for k, v in pairs(a) do if not same(v, b[k]) then return false end end
                    for k in pairs(b) do if a[k] == nil then return false end end
                    return true
                end
                return function(seed) math.randomseed(seed) return {root = gen(0)} end, same
                "#,
            )
            .eval::<(mlua::Function, mlua::Function)>()
            .map(|(g, s)| {
                lua.globals().set("same", s).unwrap();
                g
            })
            .unwrap();
        let same: mlua::Function = lua.globals().get("same").unwrap();
        let mut rng = crate::random::Well512::from_seed(42);
        for seed in 0..500 {
            let v: Value = gen.call(seed).unwrap();
            let bytes = encode_vec(&lua, &v).unwrap();
            let back = decode(&lua, &bytes).unwrap();
            assert!(same.call::<bool>((v, back)).unwrap(), "seed {seed}");
            for _ in 0..20 {
                let mut m = bytes.clone();
                let i = rng.range(0, m.len() as i64 - 1) as usize;
                m[i] = rng.range(0, 255) as u8;
                let _ = decode(&lua, &m);
                let cut = rng.range(0, m.len() as i64) as usize;
                let _ = decode(&lua, &m[..cut]);
            }
        }
    }

    #[test]
    fn decode_batch_fills_slots_and_stops_at_a_bad_document() {
        let lua = Lua::new();
        let good = [12u8, 0, 0, 0, 0x10, b'a', 0, 1, 0, 0, 0, 0];
        let bad = [12u8, 0, 0, 0, 0x42, b'a', 0, 1, 0, 0, 0, 0];
        let buf = [&good[..], &good[..], &bad[..]].concat();
        let t = lua.create_table().unwrap();
        let r = decode_batch(&lua, &t, &buf, &[(0, 12), (12, 24), (24, 36)], true);
        assert_eq!(r.unwrap_err().0, 2);
        assert_eq!(t.get::<Table>(2).unwrap().get::<i64>("a").unwrap(), 1);
        let r = decode_batch(&lua, &t, b"xyhello", &[(0, 2), (2, 7)], false);
        assert_eq!(r, Ok(2));
        assert_eq!(t.get::<String>(2).unwrap(), "hello");
    }

    #[test]
    fn itoa_works() {
        let mut b = itoa_buf();
        assert_eq!(itoa(&mut b, 0), b"0");
        assert_eq!(itoa(&mut b, -120), b"-120");
        assert_eq!(itoa(&mut b, i64::MIN), b"-9223372036854775808");
    }
}
