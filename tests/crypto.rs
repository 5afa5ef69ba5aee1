//! STAGE's frame encryption (`stage::net::crypto`) against a client we did not write: Python's
//! `cryptography` (AES-256-CBC, PKCS#7) and `bson` (pymongo), applying STAGE's key and IV rules
//! on their own. Each side seals a frame the other opens.

use stage::net::crypto::Cipher;
use std::io::Write;
use std::process::{Command, Stdio};

/// The Python side: STAGE's rules written independently of the Rust code.
const PY: &str = r#"
import sys, struct, bson
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives import padding

key = sys.argv[1].encode()
key = (key + b"\0" * 32)[:32]          # zero-padded or cut to 32 bytes: AES-256
iv = b" " * 16                          # STAGE's fixed IV

def seal(doc):
    body = doc[4:]
    p = padding.PKCS7(128).padder()
    body = p.update(body) + p.finalize()
    e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = e.update(body) + e.finalize()
    return struct.pack("<I", (len(ct) + 4) | 0x80000000) + ct

def open_(frame):
    (n,) = struct.unpack("<I", frame[:4])
    assert n & 0x80000000, "high bit not set"
    assert n & 0x7FFFFFFF == len(frame), "length"
    d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    body = d.update(frame[4:]) + d.finalize()
    u = padding.PKCS7(128).unpadder()
    body = u.update(body) + u.finalize()
    return struct.pack("<i", len(body) + 4) + body

mode = sys.argv[2]
if mode == "seal":
    doc = bson.encode({"name": "kim", "level": 12, "tags": ["a", "b"], "long": "x" * 100})
    sys.stdout.buffer.write(seal(doc))
else:
    doc = bson.decode(open_(sys.stdin.buffer.read()))
    print(repr(sorted(doc.items())))
"#;

fn python(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup installs it with pymongo and cryptography)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A small BSON document built by hand: `{"a": "hi", "n": int32 7}`.
fn doc() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(b"\x02a\x00\x03\x00\x00\x00hi\x00");
    body.extend_from_slice(b"\x10n\x00\x07\x00\x00\x00");
    body.push(0);
    let mut d = ((body.len() + 4) as u32).to_le_bytes().to_vec();
    d.extend_from_slice(&body);
    d
}

#[test]
fn python_opens_what_stage_seals() {
    for key in ["secret", "a key longer than thirty-two bytes, cut"] {
        let mut frame = Vec::new();
        Cipher::new(key.as_bytes()).seal_frame(&doc(), &mut frame);
        let out = String::from_utf8(python(&[key, "open"], &frame)).unwrap();
        assert_eq!(out.trim(), "[('a', 'hi'), ('n', 7)]", "key {key:?}");
    }
}

#[test]
fn stage_opens_what_python_seals() {
    let frame = python(&["secret", "seal"], b"");
    let c = Cipher::new(b"secret");
    let doc = c.open_frame(&frame).expect("the frame opens");
    let want = {
        // The same document, encoded by Python without encryption, for comparison.
        let out = Command::new("python3")
            .args([
                "-c",
                "import bson,sys; sys.stdout.buffer.write(bson.encode({'name': 'kim', 'level': 12, 'tags': ['a', 'b'], 'long': 'x' * 100}))",
            ])
            .output()
            .unwrap();
        out.stdout
    };
    assert_eq!(doc, want);
    assert!(
        Cipher::new(b"wrong").open_frame(&frame).is_err(),
        "a wrong key does not open it"
    );
}
