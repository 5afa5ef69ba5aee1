//! STAGE's socket encryption (`socket.crypto`, `broker.encrypt`/`broker.decrypt`), with the
//! RustCrypto `aes` and `cbc` crates.
//!
//! The rules, as STAGE's broker applies them (datumflux/platform `stage/lua/lbrokerlib.cpp`,
//! `CIPHER_CryptoAdapter` and `commit`):
//! * the cipher is AES in CBC mode with PKCS#7 padding ("PKCS5Padding"); the key is the given
//!   bytes cut or padded with zero bytes to 32, so every key is an AES-256 key;
//! * the IV is fixed: 16 space characters (0x20);
//! * an encrypted frame is a BSON document whose first 4 bytes (its length) are replaced: the
//!   rest of the document (`doc[4..]`) is encrypted, and the frame is the little-endian u32
//!   `frame length | 0x8000_0000` followed by the ciphertext. The high bit of the length is
//!   what tells an encrypted frame from a plain one.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};

type Enc = cbc::Encryptor<aes::Aes256>;
type Dec = cbc::Decryptor<aes::Aes256>;

/// The flag in a frame's length that marks it encrypted.
pub const ENCRYPTED: u32 = 0x8000_0000;

/// STAGE's fixed IV.
const IV: [u8; 16] = [b' '; 16];

/// Why a cipher could not be made or a frame could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("unsupported cipher {0:?} (supported: \"AES\", \"AES/CBC\", \"AES/CBC/PKCS5Padding\")")]
    Unsupported(String),
    #[error("encrypted frame: {0}")]
    Frame(&'static str),
    #[error("cannot decrypt: wrong key or damaged data")]
    Decrypt,
}

/// An AES-256-CBC cipher with STAGE's key and IV rules. The key never appears in `Debug`.
#[derive(Clone)]
pub struct Cipher {
    key: [u8; 32],
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(AES/CBC/PKCS5Padding)")
    }
}

impl Cipher {
    /// The cipher of `socket.crypto = key`: the key cut or zero-padded to 32 bytes.
    pub fn new(key: &[u8]) -> Cipher {
        let mut k = [0u8; 32];
        let n = key.len().min(32);
        k[..n].copy_from_slice(&key[..n]);
        Cipher { key: k }
    }

    /// The cipher of `socket.crypto = {["AES/CBC/PKCS5Padding"] = key}`. The name is
    /// `ALGORITHM[/MODE[/PADDING]]`, case-insensitive; AES (alias RIJNDAEL), CBC and PKCS#5/#7
    /// padding are what this build speaks.
    pub fn from_spec(spec: &str, key: &[u8]) -> Result<Cipher, CryptoError> {
        let parts: Vec<String> = spec.split('/').map(|p| p.trim().to_ascii_uppercase()).collect();
        let ok = match parts.as_slice() {
            [a] => is_aes(a),
            [a, m] => is_aes(a) && m == "CBC",
            [a, m, p] => is_aes(a) && m == "CBC" && matches!(p.as_str(), "PKCS5PADDING" | "PKCS7PADDING"),
            _ => false,
        };
        if !ok {
            return Err(CryptoError::Unsupported(spec.to_string()));
        }
        Ok(Cipher::new(key))
    }

    /// Encrypts `plain` (PKCS#7 padded to whole blocks).
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        Enc::new(&self.key.into(), &IV.into()).encrypt_padded_vec_mut::<Pkcs7>(plain)
    }

    /// Decrypts `data`; fails on a length that is not whole blocks or on bad padding.
    pub fn decrypt(&self, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Dec::new(&self.key.into(), &IV.into())
            .decrypt_padded_vec_mut::<Pkcs7>(data)
            .map_err(|_| CryptoError::Decrypt)
    }

    /// Appends the encrypted frame of the BSON document `doc` to `out`.
    pub fn seal_frame(&self, doc: &[u8], out: &mut Vec<u8>) {
        let body = self.encrypt(doc.get(4..).unwrap_or_default());
        let len = (body.len() + 4) as u32 | ENCRYPTED;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
    }

    /// The BSON document inside the encrypted frame `frame` (its 4-byte header included).
    pub fn open_frame(&self, frame: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if frame.len() < 4 {
            return Err(CryptoError::Frame("shorter than its 4-byte length"));
        }
        let header = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        if header & ENCRYPTED == 0 {
            return Err(CryptoError::Frame("the length's high bit is not set"));
        }
        if (header & !ENCRYPTED) as usize != frame.len() {
            return Err(CryptoError::Frame("the length does not match the frame"));
        }
        let plain = self.decrypt(&frame[4..])?;
        let mut doc = Vec::with_capacity(plain.len() + 4);
        doc.extend_from_slice(&((plain.len() + 4) as u32).to_le_bytes());
        doc.extend_from_slice(&plain);
        Ok(doc)
    }
}

fn is_aes(a: &str) -> bool {
    a == "AES" || a == "RIJNDAEL"
}

/// Whether a frame's length field marks it encrypted.
pub fn is_encrypted(header: u32) -> bool {
    header & ENCRYPTED != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"a": "hi"}` as BSON.
    const DOC: &[u8] = b"\x0f\x00\x00\x00\x02a\x00\x03\x00\x00\x00hi\x00\x00";

    #[test]
    fn a_sealed_frame_opens_to_the_same_document() {
        let c = Cipher::new(b"secret");
        let mut frame = Vec::new();
        c.seal_frame(DOC, &mut frame);
        let header = u32::from_le_bytes(frame[..4].try_into().unwrap());
        assert!(is_encrypted(header));
        assert_eq!((header & !ENCRYPTED) as usize, frame.len());
        // 11 bytes of body pad to one block.
        assert_eq!(frame.len(), 4 + 16);
        assert_eq!(c.open_frame(&frame).unwrap(), DOC);
        assert_eq!(
            Cipher::new(b"other").open_frame(&frame).err(),
            Some(CryptoError::Decrypt),
            "another key fails (padding check)"
        );
    }

    #[test]
    fn keys_are_zero_padded_or_cut_to_32_bytes() {
        let a = Cipher::new(b"k");
        let mut padded = b"k".to_vec();
        padded.resize(32, 0);
        assert_eq!(a.encrypt(b"x"), Cipher::new(&padded).encrypt(b"x"));
        let long = [7u8; 40];
        assert_eq!(
            Cipher::new(&long).encrypt(b"x"),
            Cipher::new(&long[..32]).encrypt(b"x")
        );
    }

    #[test]
    fn names_the_ciphers_it_speaks() {
        for ok in [
            "AES",
            "aes/cbc",
            "AES/CBC/PKCS5Padding",
            "Rijndael/CBC/PKCS7Padding",
        ] {
            assert!(Cipher::from_spec(ok, b"k").is_ok(), "{ok}");
        }
        let e = Cipher::from_spec("DES/CBC/PKCS5Padding", b"k").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported cipher \"DES/CBC/PKCS5Padding\" (supported: \"AES\", \"AES/CBC\", \"AES/CBC/PKCS5Padding\")"
        );
        assert!(Cipher::from_spec("AES/CFB", b"k").is_err());
        assert!(Cipher::from_spec("AES/CBC/NoPadding", b"k").is_err());
    }

    #[test]
    fn rejects_bad_frames() {
        let c = Cipher::new(b"k");
        assert!(c.open_frame(b"\x01").is_err());
        assert!(c.open_frame(DOC).is_err(), "a plain frame");
        let mut f = Vec::new();
        c.seal_frame(DOC, &mut f);
        f.push(0);
        assert_eq!(
            c.open_frame(&f).err(),
            Some(CryptoError::Frame("the length does not match the frame"))
        );
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(
            format!("{:?}", Cipher::new(b"topsecret")),
            "Cipher(AES/CBC/PKCS5Padding)"
        );
    }
}
