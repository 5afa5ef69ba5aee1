//! Frame boundaries on a byte stream, as STAGE's broker cuts them: `bson` and `packet` (the
//! same thing in STAGE: a BSON document, cut by its own int32 length, whose high bit marks an
//! encrypted frame), `text` (bytes up to and including `\n`) and `raw` (no framing: the bytes
//! as they arrive, in chunks of at most `IN`), with the `IN` limit enforced while reading and
//! the framing applied while writing.

use thiserror::Error;

/// How a stream is cut into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Bson,
    /// STAGE's `packet`: the same frames as `bson` (a BSON document, or an encrypted one).
    Packet,
    Text,
    /// No framing: a byte stream handed over in chunks as read.
    Raw,
}

impl Framing {
    pub fn name(self) -> &'static str {
        match self {
            Framing::Bson => "bson",
            Framing::Packet => "packet",
            Framing::Text => "text",
            Framing::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Framing> {
        match s {
            "bson" => Some(Framing::Bson),
            "packet" => Some(Framing::Packet),
            "text" => Some(Framing::Text),
            "raw" => Some(Framing::Raw),
            _ => None,
        }
    }

    /// Frames are BSON documents (`bson` and `packet`, as in STAGE).
    pub fn is_bson(self) -> bool {
        matches!(self, Framing::Bson | Framing::Packet)
    }
}

/// The flag in a BSON frame's length that marks it encrypted (`net::crypto`).
pub const ENCRYPTED: u32 = 0x8000_0000;

/// True when the BSON frame starting with `frame` has the encrypted flag in its length.
pub fn is_encrypted(frame: &[u8]) -> bool {
    frame.len() >= 4 && frame[3] & 0x80 != 0
}

/// A frame that cannot be accepted; the connection it came from is closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds {framing} IN limit {limit}")]
    TooLarge {
        framing: &'static str,
        len: u64,
        limit: usize,
    },
    #[error("{framing} length field {len} is below the minimum {min}")]
    TooSmall {
        framing: &'static str,
        len: i64,
        min: usize,
    },
    #[error("datagram of {len} bytes is not exactly one {framing} frame")]
    NotOneFrame { framing: &'static str, len: usize },
}

/// A complete frame found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The payload's byte range in the buffer (the whole document, length included, for
    /// `bson` and `packet`; the line including `\n` for `text`; the chunk for `raw`).
    pub start: usize,
    pub end: usize,
    /// Bytes to drop from the buffer once the frame is handled.
    pub consumed: usize,
}

/// Finds the first complete frame in `buf`. `Ok(None)` = need more bytes. A length over
/// `limit` is refused as soon as the length field (or, for text, `limit` bytes without a
/// newline) is seen, so a peer cannot make the buffer grow past `IN`.
pub fn next_frame(framing: Framing, buf: &[u8], limit: usize) -> Result<Option<Frame>, FrameError> {
    match framing {
        Framing::Bson | Framing::Packet => {
            if buf.len() < 4 {
                return Ok(None);
            }
            // The high bit marks an encrypted frame; the rest is the frame's length.
            let len = (u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) & !ENCRYPTED) as usize;
            if len < 5 {
                return Err(FrameError::TooSmall {
                    framing: framing.name(),
                    len: len as i64,
                    min: 5,
                });
            }
            if len > limit {
                return Err(FrameError::TooLarge {
                    framing: framing.name(),
                    len: len as u64,
                    limit,
                });
            }
            if buf.len() < len {
                return Ok(None);
            }
            Ok(Some(Frame {
                start: 0,
                end: len,
                consumed: len,
            }))
        }
        Framing::Text => {
            let window = &buf[..buf.len().min(limit)];
            match memchr_nl(window) {
                Some(i) => Ok(Some(Frame {
                    start: 0,
                    end: i + 1,
                    consumed: i + 1,
                })),
                None if buf.len() >= limit => Err(FrameError::TooLarge {
                    framing: "text",
                    len: buf.len() as u64,
                    limit,
                }),
                None => Ok(None),
            }
        }
        Framing::Raw if buf.is_empty() => Ok(None),
        Framing::Raw => {
            let n = buf.len().min(limit.max(1));
            Ok(Some(Frame {
                start: 0,
                end: n,
                consumed: n,
            }))
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Checks that a datagram is exactly one frame: for `text` and `raw` the whole datagram is
/// the frame (for `text` a trailing newline is optional, and stays in the range); for `bson`
/// and `packet` the length field (without its encrypted flag) must match the datagram's size.
pub fn datagram_frame(framing: Framing, buf: &[u8], limit: usize) -> Result<Frame, FrameError> {
    let n = buf.len();
    let frame = match framing {
        Framing::Text | Framing::Raw if n > limit => {
            return Err(FrameError::TooLarge {
                framing: framing.name(),
                len: n as u64,
                limit,
            })
        }
        Framing::Text | Framing::Raw => Some(Frame {
            start: 0,
            end: n,
            consumed: n,
        }),
        f => next_frame(f, buf, limit)?,
    };
    match frame {
        Some(f) if f.consumed == n => Ok(f),
        _ => Err(FrameError::NotOneFrame {
            framing: framing.name(),
            len: n,
        }),
    }
}

/// Appends `payload` to `out` framed for the wire: as it is for `bson`, `packet` (a
/// document carries its own length; a string is sent as its bytes, as STAGE) and `raw`;
/// `text` gets a `\n` unless it ends with one.
pub fn put_frame(framing: Framing, payload: &[u8], out: &mut Vec<u8>) {
    match framing {
        Framing::Bson | Framing::Packet | Framing::Raw => out.extend_from_slice(payload),
        Framing::Text => {
            out.extend_from_slice(payload);
            if payload.last() != Some(&b'\n') {
                out.push(b'\n');
            }
        }
    }
}

/// Parses a size with an optional `k` or `m` suffix (`2k` = 2048).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bson_frames() {
        let doc = [5u8, 0, 0, 0, 0];
        assert_eq!(next_frame(Framing::Bson, &doc[..3], 100), Ok(None));
        assert_eq!(next_frame(Framing::Bson, &doc[..4], 100), Ok(None));
        let f = next_frame(Framing::Bson, &[&doc[..], &[9, 9]].concat(), 100)
            .unwrap()
            .unwrap();
        assert_eq!((f.start, f.end, f.consumed), (0, 5, 5));
        assert!(matches!(
            next_frame(Framing::Bson, &[4, 0, 0, 0], 100),
            Err(FrameError::TooSmall { len: 4, .. })
        ));
        // The high bit is the encrypted flag, not a sign: 0x7fffffff bytes are over IN.
        assert!(matches!(
            next_frame(Framing::Bson, &[0xff, 0xff, 0xff, 0xff], 100),
            Err(FrameError::TooLarge { len: 0x7fff_ffff, .. })
        ));
        assert_eq!(next_frame(Framing::Bson, &[0, 0, 1, 0], 65536), Ok(None));
        let e = next_frame(Framing::Bson, &[1, 0, 1, 0], 65536).unwrap_err();
        assert_eq!(e.to_string(), "frame of 65537 bytes exceeds bson IN limit 65536");
    }

    #[test]
    fn packet_frames_are_bson_documents_with_an_encrypted_flag() {
        let doc = [5u8, 0, 0, 0, 0];
        let f = next_frame(Framing::Packet, &doc, 100).unwrap().unwrap();
        assert_eq!(
            (f.start, f.end, f.consumed),
            (0, 5, 5),
            "the length counts itself"
        );
        // An encrypted frame: 20 bytes, flagged.
        let mut enc = (20u32 | ENCRYPTED).to_le_bytes().to_vec();
        enc.resize(20, 0xAA);
        assert!(is_encrypted(&enc) && !is_encrypted(&doc));
        assert_eq!(next_frame(Framing::Packet, &enc[..19], 100), Ok(None));
        let f = next_frame(Framing::Packet, &[&enc[..], &doc[..]].concat(), 100)
            .unwrap()
            .unwrap();
        assert_eq!((f.start, f.end), (0, 20));
        assert!(next_frame(Framing::Packet, &[3, 0, 0, 0], 100).is_err());
        // Strings go out as their bytes (no length prefix), as STAGE.
        let mut out = vec![];
        put_frame(Framing::Packet, b"GET / HTTP/1.0\r\n\r\n", &mut out);
        assert_eq!(out, b"GET / HTTP/1.0\r\n\r\n");
    }

    #[test]
    fn raw_chunks() {
        assert_eq!(next_frame(Framing::Raw, b"", 10), Ok(None));
        let f = next_frame(Framing::Raw, b"abc", 10).unwrap().unwrap();
        assert_eq!((f.start, f.end, f.consumed), (0, 3, 3));
        let f = next_frame(Framing::Raw, &[1; 25], 10).unwrap().unwrap();
        assert_eq!(f.end, 10, "a chunk is at most IN bytes");
        let mut out = vec![];
        put_frame(Framing::Raw, b"no newline", &mut out);
        assert_eq!(out, b"no newline");
        assert_eq!(datagram_frame(Framing::Raw, b"\0\x01", 10).unwrap().end, 2);
        assert!(datagram_frame(Framing::Raw, &[0; 11], 10).is_err());
    }

    #[test]
    fn text_lines() {
        assert_eq!(next_frame(Framing::Text, b"abc", 10), Ok(None));
        let f = next_frame(Framing::Text, b"ab\ncd\n", 10).unwrap().unwrap();
        assert_eq!(f.end, 3);
        assert!(next_frame(Framing::Text, b"0123456789", 10).is_err());
        let mut out = vec![];
        put_frame(Framing::Text, b"hi", &mut out);
        put_frame(Framing::Text, b"there\n", &mut out);
        assert_eq!(out, b"hi\nthere\n");
    }

    #[test]
    fn datagrams_are_one_frame() {
        let doc = [5u8, 0, 0, 0, 0];
        let f = datagram_frame(Framing::Bson, &doc, 100).unwrap();
        assert_eq!((f.start, f.end), (0, 5));
        let two = [&doc[..], &doc[..]].concat();
        let e = datagram_frame(Framing::Bson, &two, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "datagram of 10 bytes is not exactly one bson frame"
        );
        assert!(matches!(
            datagram_frame(Framing::Packet, &[9, 0, 0, 0, 1], 100),
            Err(FrameError::NotOneFrame { len: 5, .. })
        ));
        let f = datagram_frame(Framing::Packet, &[5, 0, 0, 0, 0], 100).unwrap();
        assert_eq!((f.start, f.end), (0, 5));
        let f = datagram_frame(Framing::Text, b"no newline", 100).unwrap();
        assert_eq!(f.end, 10);
        assert_eq!(datagram_frame(Framing::Text, b"a\nb\n", 100).unwrap().end, 4);
        assert!(matches!(
            datagram_frame(Framing::Text, b"0123456789", 9),
            Err(FrameError::TooLarge {
                len: 10,
                limit: 9,
                ..
            })
        ));
        assert!(datagram_frame(Framing::Text, b"0123456789", 10).is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2k"), Some(2048));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }
}
