//! Several messages for one node in one datagram. A batch body is the number of its first
//! message (per sender → receiver pair, the numbering fragments use too), then each message
//! as a 32-bit little-endian length and its application payload (`wire::put_app`); the
//! messages are numbered consecutively from the first. The envelope (`auth`) authenticates
//! the whole datagram once. A receiver checks the whole structure before it delivers any
//! message, so a batch is taken whole or refused whole.

use super::wire::WireError;

/// Bytes before the first entry: the first message's number.
pub const BATCH_HEADER: usize = 8;
/// Bytes before each entry's payload: its length.
pub const ENTRY_HEADER: usize = 4;

/// Appends `first` (the first message's number) to an empty batch body in `buf`.
pub fn start(buf: &mut Vec<u8>, first: u64) {
    buf.extend_from_slice(&first.to_le_bytes());
}

/// Reserves an entry's length in `buf`; returns where the entry starts, for `finish_entry`.
pub fn begin_entry(buf: &mut Vec<u8>) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0; ENTRY_HEADER]);
    at
}

/// Writes the length of the entry begun at `at` (everything appended since).
pub fn finish_entry(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at - ENTRY_HEADER) as u32;
    buf[at..at + ENTRY_HEADER].copy_from_slice(&len.to_le_bytes());
}

/// The messages of a batch body, checked whole: the first message's number and an iterator
/// over the payloads in order. `Err` when any length runs past the body, when it has no
/// message, or when the numbers would overflow.
pub fn parse(body: &[u8]) -> Result<(u64, Entries<'_>), WireError> {
    if body.len() < BATCH_HEADER {
        return Err(WireError("batch shorter than its header"));
    }
    let first = u64::from_le_bytes(body[..BATCH_HEADER].try_into().expect("8 bytes"));
    let rest = &body[BATCH_HEADER..];
    let mut n = 0u64;
    let mut r = rest;
    while !r.is_empty() {
        if r.len() < ENTRY_HEADER {
            return Err(WireError("batch entry length truncated"));
        }
        let len = u32::from_le_bytes(r[..ENTRY_HEADER].try_into().expect("4 bytes")) as usize;
        if r.len() - ENTRY_HEADER < len {
            return Err(WireError("batch entry runs past the datagram"));
        }
        r = &r[ENTRY_HEADER + len..];
        n += 1;
    }
    if n == 0 {
        return Err(WireError("empty batch"));
    }
    if first == 0 || first.checked_add(n - 1).is_none() {
        return Err(WireError("batch message numbers out of range"));
    }
    Ok((first, Entries { rest }))
}

/// The payloads of a checked batch, in order.
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Entries<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.len() < ENTRY_HEADER {
            return None;
        }
        let len = u32::from_le_bytes(self.rest[..ENTRY_HEADER].try_into().expect("4 bytes")) as usize;
        let (e, rest) = self.rest[ENTRY_HEADER..].split_at(len);
        self.rest = rest;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first: u64, entries: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![];
        start(&mut b, first);
        for e in entries {
            let at = begin_entry(&mut b);
            b.extend_from_slice(e);
            finish_entry(&mut b, at);
        }
        b
    }

    #[test]
    fn entries_come_back_in_order_with_their_numbers() {
        let big = vec![7u8; 70_000];
        let b = batch(41, &[b"a", b"", &big, b"last"]);
        let (first, it) = parse(&b).unwrap();
        assert_eq!(first, 41);
        let got: Vec<&[u8]> = it.collect();
        assert_eq!(got, vec![&b"a"[..], b"", &big[..], b"last"]);
    }

    #[test]
    fn every_truncation_and_a_lying_length_are_refused_whole() {
        let b = batch(1, &[b"one", b"two", b"three"]);
        assert!(parse(&b).is_ok());
        // Every prefix that does not end on an entry boundary is refused; a prefix that does
        // is a shorter, still well-formed batch (the envelope's tag covers the length).
        let bounds = [8usize, 8 + 4 + 3, 8 + 4 + 3 + 4 + 3, b.len()];
        for n in 0..b.len() {
            let r = parse(&b[..n]);
            if bounds.contains(&n) && n > 8 {
                assert!(r.is_ok(), "boundary prefix of {n} bytes refused");
            } else {
                assert!(r.is_err(), "prefix of {n} bytes accepted");
            }
        }
        let mut lie = b.clone();
        lie[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse(&lie).unwrap_err(),
            WireError("batch entry runs past the datagram")
        );
        assert_eq!(
            parse(&batch(0, &[b"x"])).unwrap_err(),
            WireError("batch message numbers out of range")
        );
        assert_eq!(
            parse(&batch(u64::MAX, &[b"x", b"y"])).unwrap_err(),
            WireError("batch message numbers out of range")
        );
        assert_eq!(parse(&batch(3, &[])).unwrap_err(), WireError("empty batch"));
    }
}
