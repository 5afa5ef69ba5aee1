//! Frame boundaries on a byte stream: `bson` (the document's own int32 length), `packet`
//! (int32 length counting itself, then payload) and `text` (bytes up to and including `\n`),
//! with the `IN` limit enforced while reading and the framing applied while writing.

use thiserror::Error;

/// How a stream is cut into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Bson,
    Packet,
    Text,
}

impl Framing {
    pub fn name(self) -> &'static str {
        match self {
            Framing::Bson => "bson",
            Framing::Packet => "packet",
            Framing::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<Framing> {
        match s {
            "bson" => Some(Framing::Bson),
            "packet" => Some(Framing::Packet),
            "text" => Some(Framing::Text),
            _ => None,
        }
    }
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
    /// The payload's byte range in the buffer (the whole document for `bson`, the bytes after
    /// the length for `packet`, the line including `\n` for `text`).
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
            let len = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
            let min = if framing == Framing::Bson { 5 } else { 4 };
            if len < min as i64 {
                return Err(FrameError::TooSmall {
                    framing: framing.name(),
                    len,
                    min,
                });
            }
            if len as u64 > limit as u64 {
                return Err(FrameError::TooLarge {
                    framing: framing.name(),
                    len: len as u64,
                    limit,
                });
            }
            let len = len as usize;
            if buf.len() < len {
                return Ok(None);
            }
            let start = if framing == Framing::Bson { 0 } else { 4 };
            Ok(Some(Frame {
                start,
                end: len,
                consumed: len,
            }))
        }
        Framing::Text => {
            let window = &buf[..buf.len().min(limit)];
            match window.iter().position(|&b| b == b'\n') {
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
    }
}

/// Checks that a datagram is exactly one frame: for `text` the whole datagram is the line
/// (a trailing newline is optional, and stays in the range); for `bson` and `packet` the
/// length field must match the datagram's size.
pub fn datagram_frame(framing: Framing, buf: &[u8], limit: usize) -> Result<Frame, FrameError> {
    let n = buf.len();
    let frame = match framing {
        Framing::Text if n > limit => {
            return Err(FrameError::TooLarge {
                framing: "text",
                len: n as u64,
                limit,
            })
        }
        Framing::Text => Some(Frame {
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

/// Appends `payload` to `out` framed for the wire. A `bson` payload must already be a
/// document; `packet` gets its length prefix; `text` gets a `\n` unless it ends with one.
pub fn put_frame(framing: Framing, payload: &[u8], out: &mut Vec<u8>) {
    match framing {
        Framing::Bson => out.extend_from_slice(payload),
        Framing::Packet => {
            out.extend_from_slice(&((payload.len() + 4) as i32).to_le_bytes());
            out.extend_from_slice(payload);
        }
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
        assert!(matches!(
            next_frame(Framing::Bson, &[0xff, 0xff, 0xff, 0xff], 100),
            Err(FrameError::TooSmall { len: -1, .. })
        ));
        assert_eq!(next_frame(Framing::Bson, &[0, 0, 1, 0], 65536), Ok(None));
        let e = next_frame(Framing::Bson, &[1, 0, 1, 0], 65536).unwrap_err();
        assert_eq!(e.to_string(), "frame of 65537 bytes exceeds bson IN limit 65536");
    }

    #[test]
    fn packet_round_trip() {
        let mut out = vec![];
        put_frame(Framing::Packet, b"\0\x01binary\xff", &mut out);
        put_frame(Framing::Packet, b"", &mut out);
        let f = next_frame(Framing::Packet, &out, 100).unwrap().unwrap();
        assert_eq!(&out[f.start..f.end], b"\0\x01binary\xff");
        let rest = &out[f.consumed..];
        let f = next_frame(Framing::Packet, rest, 100).unwrap().unwrap();
        assert_eq!((f.start, f.end), (4, 4));
        assert!(next_frame(Framing::Packet, &[3, 0, 0, 0], 100).is_err());
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
        let f = datagram_frame(Framing::Packet, &[5, 0, 0, 0, 1], 100).unwrap();
        assert_eq!((f.start, f.end), (4, 5));
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
