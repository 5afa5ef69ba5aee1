//! A connection's byte buffers, free of Lua and of sockets: `FrameReader` (the read buffer:
//! fill, cut frames in batches, compact, grow and shrink) and `OutBuf` (framed output, the
//! `OUT` limit, flushing, shrinking after a large reply). The broker's connection task
//! (`lua/broker.rs`) drives them with a `TcpStream`; the tests here drive them by hand.
//!
//! Memory follows the bytes actually received: a `FrameReader` allocates nothing until the
//! first read, reads at most `READ_CHUNK` bytes into a fresh buffer, and grows by doubling
//! (never beyond `max(IN, READ_CHUNK)`) only when a frame does not fit. A frame's declared
//! length never allocates by itself, so a peer announcing a frame of `IN` bytes and sending
//! 16 of them costs 16 KiB, not `IN`. After a large frame both buffers return to their
//! small size.

use super::framing::{next_frame, put_frame, FrameError, Framing};
use std::io;
use thiserror::Error;

/// The first allocation of a read buffer, and the size it shrinks back to.
pub const READ_CHUNK: usize = 16 * 1024;
/// A read buffer larger than this is shrunk back to `READ_CHUNK` once what remains in it fits.
pub const READ_SHRINK_ABOVE: usize = 64 * 1024;
/// An empty output buffer larger than this is shrunk back to `OUT_KEEP`.
pub const OUT_SHRINK_ABOVE: usize = 256 * 1024;
pub const OUT_KEEP: usize = 16 * 1024;

/// The read side of a connection: bytes in, complete frames out.
///
/// `buf[..pos]` is handled, `buf[pos..]` waits to be cut; `buf.len()` is what was read.
/// `cut` fills `frames` with the payload ranges of up to `max` complete frames (for `text`,
/// the line with its `\n`, as STAGE hands it; for `raw`, what was read, at most IN bytes),
/// which stay valid until the next `compact` or `fill`.
#[derive(Debug)]
pub struct FrameReader {
    framing: Framing,
    limit: usize,
    buf: Vec<u8>,
    pos: usize,
    frames: Vec<(usize, usize)>,
}

impl FrameReader {
    /// A reader for frames of at most `limit` bytes (IN). Allocates nothing yet.
    pub fn new(framing: Framing, limit: usize) -> FrameReader {
        FrameReader {
            framing,
            limit,
            buf: Vec::new(),
            pos: 0,
            frames: Vec::new(),
        }
    }

    /// The largest the buffer may grow: one frame of IN, or one read chunk.
    fn cap(&self) -> usize {
        self.limit.max(READ_CHUNK)
    }

    /// Makes room (see the module doc) and appends one read: `read` gets the buffer and must
    /// append at most its spare capacity (`TcpStream::try_read_buf` does exactly that).
    /// Returns what `read` returned; `Ok(0)` is the end of the stream.
    pub fn fill(&mut self, read: impl FnOnce(&mut Vec<u8>) -> io::Result<usize>) -> io::Result<usize> {
        if self.buf.capacity() == self.buf.len() {
            self.compact();
        }
        let cap = self.buf.capacity();
        if cap == self.buf.len() {
            // Full of one partial frame (within IN, or `next_frame` would have refused it).
            let want = (cap * 2).max(READ_CHUNK).min(self.cap());
            self.buf.reserve_exact(want - self.buf.len());
        }
        if self.buf.capacity() == self.buf.len() {
            // Cannot happen while `cut` is run until it finds nothing: a full buffer of IN
            // bytes holds a complete frame or was refused. Refuse rather than grow past IN.
            return Err(io::Error::other("read buffer full at the IN limit"));
        }
        let before = self.buf.capacity();
        let r = read(&mut self.buf);
        debug_assert_eq!(self.buf.capacity(), before, "a read must not grow the buffer");
        r
    }

    /// Cuts up to `max` complete frames after the ones already handed out. The error, if any,
    /// comes after the frames cut before it (serve those, then close the connection).
    pub fn cut(&mut self, max: usize) -> Option<FrameError> {
        self.frames.clear();
        while self.frames.len() < max {
            match next_frame(self.framing, &self.buf[self.pos..], self.limit) {
                Ok(Some(f)) => {
                    self.frames.push((self.pos + f.start, self.pos + f.end));
                    self.pos += f.consumed;
                }
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
        None
    }

    /// The payload ranges of the last `cut`, into `bytes()`.
    pub fn frames(&self) -> &[(usize, usize)] {
        &self.frames
    }

    /// The buffer the ranges of `frames()` point into.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The payload of frame `i` of the last `cut`.
    pub fn frame(&self, i: usize) -> &[u8] {
        let (a, b) = self.frames[i];
        &self.buf[a..b]
    }

    /// Bytes read but not yet cut into a frame (a partial frame).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True when a `cut` since the last `compact` handed out frames.
    pub fn consumed_any(&self) -> bool {
        self.pos > 0
    }

    /// Drops the handled bytes (moving a partial frame to the front), and returns memory
    /// after a large frame. Invalidates `frames()`.
    pub fn compact(&mut self) {
        self.frames.clear();
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() > READ_SHRINK_ABOVE && self.buf.len() <= READ_CHUNK {
            self.buf.shrink_to(READ_CHUNK);
        }
    }

    /// The bytes allocated now (for tests and accounting).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Why output could not be kept or written; either closes the connection.
#[derive(Debug, Error)]
pub enum OutError {
    #[error("unsent output of {len} bytes exceeds {framing} OUT limit {limit}")]
    Overflow {
        framing: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("write failed: {0}")]
    Write(io::Error),
}

/// The write side of a connection: framed, unsent output, bounded by OUT.
#[derive(Debug)]
pub struct OutBuf {
    framing: Framing,
    limit: usize,
    buf: Vec<u8>,
    /// A queue of whole messages (WebSocket): each is stored behind its 4-byte length, so
    /// that the writer can send each as one message, whatever the framing.
    messages: bool,
}

/// The first message of a queue made by [`OutBuf::messages`]: `(start, end, consumed)`.
pub fn next_message(buf: &[u8]) -> Option<(usize, usize, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    (buf.len() >= 4 + len).then_some((4, 4 + len, 4 + len))
}

impl OutBuf {
    /// An output buffer holding at most `limit` unsent bytes (OUT). Allocates nothing yet.
    pub fn new(framing: Framing, limit: usize) -> OutBuf {
        OutBuf {
            framing,
            limit,
            buf: Vec::new(),
            messages: false,
        }
    }

    /// A queue of whole messages (see [`next_message`]), at most `limit` unsent bytes.
    pub fn messages(limit: usize) -> OutBuf {
        OutBuf {
            messages: true,
            ..OutBuf::new(Framing::Raw, limit)
        }
    }

    /// Appends `payload` framed for the wire (`framing::put_frame`); returns the bytes queued.
    pub fn put_frame(&mut self, payload: &[u8]) -> usize {
        let start = self.buf.len();
        if self.messages {
            self.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(payload);
            return self.buf.len() - start;
        }
        put_frame(self.framing, payload, &mut self.buf);
        self.buf.len() - start
    }

    /// Appends one frame whose payload `write` encodes straight into the buffer (no copy):
    /// `text` gets its `\n` after it; the other framings take it as it is. On error nothing
    /// of the frame stays. Returns the bytes queued.
    pub fn put_with<E>(&mut self, write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<usize, E> {
        let start = self.buf.len();
        if self.messages {
            self.buf.extend_from_slice(&[0; 4]);
        }
        if let Err(e) = write(&mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        if self.messages {
            let len = (self.buf.len() - start - 4) as u32;
            self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            return Ok(self.buf.len() - start);
        }
        match self.framing {
            Framing::Bson | Framing::Packet | Framing::Raw => {}
            Framing::Text => {
                if self.buf.len() == start || self.buf.last() != Some(&b'\n') {
                    self.buf.push(b'\n');
                }
            }
        }
        Ok(self.buf.len() - start)
    }

    /// The unsent output (a datagram, for a UDP socket's one frame).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes allocated now (for tests and accounting).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// More than half of OUT waits: time to write what the socket takes, not at the end of
    /// the batch.
    pub fn wants_flush(&self) -> bool {
        self.buf.len() > self.limit / 2
    }

    /// The OUT limit is exceeded: the peer does not read fast enough (or the script sends too
    /// much at once). Drops the output (the connection closes) and says why.
    pub fn overflow(&mut self) -> Option<OutError> {
        if self.buf.len() <= self.limit {
            return None;
        }
        let e = OutError::Overflow {
            framing: self.framing.name(),
            len: self.buf.len(),
            limit: self.limit,
        };
        self.buf.clear();
        Some(e)
    }

    /// Writes what `write` takes without waiting (it returns `WouldBlock` when the socket is
    /// full, as `TcpStream::try_write` does). A write error, or unsent output over OUT
    /// afterwards, is a reason to close. An emptied large buffer shrinks back.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8]) -> io::Result<usize>) -> Result<(), OutError> {
        let mut sent = 0;
        while sent < self.buf.len() {
            match write(&self.buf[sent..]) {
                Ok(0) => {
                    return Err(OutError::Write(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.buf.drain(..sent);
                    return Err(OutError::Write(e));
                }
            }
        }
        self.buf.drain(..sent);
        if let Some(e) = self.overflow() {
            return Err(e);
        }
        if self.buf.is_empty() && self.buf.capacity() > OUT_SHRINK_ABOVE {
            self.buf.shrink_to(OUT_KEEP);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `data` into the reader as a socket would: at most the spare capacity per read.
    fn feed(r: &mut FrameReader, mut data: &[u8]) {
        while !data.is_empty() {
            let n = r
                .fill(|b| {
                    let n = (b.capacity() - b.len()).min(data.len());
                    b.extend_from_slice(&data[..n]);
                    Ok(n)
                })
                .unwrap();
            assert!(n > 0, "no room for {} more bytes", data.len());
            data = &data[n..];
        }
    }

    fn bson_doc(len: usize) -> Vec<u8> {
        // A document with one binary field padding it to `len` bytes.
        let mut d = (len as i32).to_le_bytes().to_vec();
        d.resize(len - 1, 7);
        d.push(0);
        d
    }

    fn cut_all(r: &mut FrameReader) -> Vec<Vec<u8>> {
        assert!(r.cut(usize::MAX).is_none());
        (0..r.frames().len()).map(|i| r.frame(i).to_vec()).collect()
    }

    #[test]
    fn a_new_reader_allocates_nothing_until_bytes_arrive() {
        let mut r = FrameReader::new(Framing::Bson, 256 << 20);
        assert_eq!(r.capacity(), 0);
        assert!(r.cut(64).is_none());
        assert_eq!(r.frames().len(), 0);
        feed(&mut r, &[1]);
        assert_eq!(r.capacity(), READ_CHUNK);
    }

    #[test]
    fn partial_frames_wait_for_their_rest() {
        let doc = bson_doc(10);
        let mut r = FrameReader::new(Framing::Bson, 100);
        feed(&mut r, &doc[..3]);
        assert!(r.cut(64).is_none());
        assert!(r.frames().is_empty());
        assert_eq!(r.pending(), 3);
        feed(&mut r, &doc[3..]);
        feed(&mut r, &doc[..6]);
        assert_eq!(cut_all(&mut r), vec![doc.clone()]);
        assert_eq!(r.pending(), 6);
        r.compact();
        assert!(!r.consumed_any());
        feed(&mut r, &doc[6..]);
        assert_eq!(cut_all(&mut r), vec![doc]);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn frames_are_cut_in_batches_of_at_most_max() {
        let mut wire = vec![];
        for i in 0..5u8 {
            put_frame(Framing::Text, &[b'a' + i; 3], &mut wire);
        }
        let mut r = FrameReader::new(Framing::Text, 100);
        feed(&mut r, &wire);
        assert!(r.cut(2).is_none());
        assert_eq!((r.frame(0), r.frame(1)), (&b"aaa\n"[..], &b"bbb\n"[..]));
        assert!(r.cut(2).is_none());
        assert_eq!(r.frame(1), b"ddd\n");
        assert!(r.cut(2).is_none());
        assert_eq!(r.frames().len(), 1);
        assert_eq!(r.frame(0), b"eee\n");
        assert!(r.cut(2).is_none());
        assert!(r.frames().is_empty());
    }

    #[test]
    fn a_bad_frame_comes_after_the_good_ones_before_it() {
        let mut wire = bson_doc(5);
        wire.extend_from_slice(&[1, 0, 1, 0]); // announces 65537 bytes
        let mut r = FrameReader::new(Framing::Bson, 64 * 1024);
        feed(&mut r, &wire);
        let e = r.cut(64).expect("oversize frame refused");
        assert_eq!(r.frames().len(), 1);
        assert_eq!(e.to_string(), "frame of 65537 bytes exceeds bson IN limit 65536");
        let e = r.cut(64).expect("still refused");
        assert!(r.frames().is_empty());
        assert!(matches!(e, FrameError::TooLarge { len: 65537, .. }));
    }

    #[test]
    fn an_oversize_frame_is_refused_before_its_bytes_are_buffered() {
        // A 16-byte start of a frame announcing 256 MiB (IN is 256 MiB): the buffer holds
        // what arrived, not what was announced; one byte more than IN is refused at once.
        let mut r = FrameReader::new(Framing::Bson, 256 << 20);
        let mut head = (256i32 << 20).to_le_bytes().to_vec();
        head.resize(16, 0);
        feed(&mut r, &head);
        assert!(r.cut(64).is_none());
        assert_eq!(r.capacity(), READ_CHUNK);
        let mut r = FrameReader::new(Framing::Bson, 256 << 20);
        feed(&mut r, &((256i32 << 20) + 1).to_le_bytes());
        assert!(matches!(r.cut(64), Some(FrameError::TooLarge { .. })));
    }

    #[test]
    fn text_lines_keep_their_newline() {
        let mut r = FrameReader::new(Framing::Text, 16);
        feed(&mut r, b"one\r\ntwo\n\r\n\nthr");
        assert_eq!(
            cut_all(&mut r),
            vec![
                b"one\r\n".to_vec(),
                b"two\n".to_vec(),
                b"\r\n".to_vec(),
                b"\n".to_vec()
            ]
        );
        assert_eq!(r.pending(), 3);
        r.compact();
        feed(&mut r, b"ee\r");
        assert!(cut_all(&mut r).is_empty());
        feed(&mut r, b"\n");
        assert_eq!(cut_all(&mut r), vec![b"three\r\n".to_vec()]);
        // A line of IN bytes without a newline is refused.
        r.compact();
        feed(&mut r, &[b'x'; 16]);
        assert!(matches!(r.cut(64), Some(FrameError::TooLarge { limit: 16, .. })));
    }

    #[test]
    fn the_buffer_grows_by_doubling_up_to_in_and_shrinks_after() {
        let big = bson_doc(200 * 1024);
        let mut r = FrameReader::new(Framing::Bson, 256 * 1024);
        let mut seen = vec![];
        let mut rest = &big[..];
        while !rest.is_empty() {
            let n = r
                .fill(|b| {
                    let n = (b.capacity() - b.len()).min(rest.len());
                    b.extend_from_slice(&rest[..n]);
                    Ok(n)
                })
                .unwrap();
            rest = &rest[n..];
            if seen.last() != Some(&r.capacity()) {
                seen.push(r.capacity());
            }
            assert!(r.cut(64).is_none());
        }
        // Grown with the bytes received, each step double the last, never past IN.
        assert_eq!(seen, vec![16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10]);
        assert_eq!(r.frames().len(), 1);
        assert_eq!(r.frame(0), &big[..]);
        r.compact();
        assert!(r.capacity() <= READ_CHUNK, "kept {} bytes", r.capacity());
        // Small frames keep the buffer small.
        for _ in 0..100 {
            feed(&mut r, &bson_doc(300));
            assert_eq!(cut_all(&mut r).len(), 1);
            r.compact();
        }
        assert_eq!(r.capacity(), READ_CHUNK);
    }

    #[test]
    fn a_small_in_still_reads_a_chunk_at_a_time() {
        let mut r = FrameReader::new(Framing::Bson, 100);
        let mut wire = vec![];
        for _ in 0..1000 {
            wire.extend_from_slice(&bson_doc(100));
        }
        let mut got = 0;
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let n = r
                .fill(|b| {
                    let n = (b.capacity() - b.len()).min(rest.len());
                    b.extend_from_slice(&rest[..n]);
                    Ok(n)
                })
                .unwrap();
            rest = &rest[n..];
            while {
                assert!(r.cut(64).is_none());
                !r.frames().is_empty()
            } {
                got += r.frames().len();
            }
            assert_eq!(r.capacity(), READ_CHUNK);
        }
        assert_eq!(got, 1000);
    }

    #[test]
    fn raw_chunks_are_what_was_read() {
        let mut r = FrameReader::new(Framing::Raw, 8);
        feed(&mut r, b"hello");
        assert_eq!(cut_all(&mut r), vec![b"hello".to_vec()]);
        r.compact();
        feed(&mut r, b"0123456789ab");
        assert_eq!(cut_all(&mut r), vec![b"01234567".to_vec(), b"89ab".to_vec()]);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn out_frames_by_framing() {
        let mut o = OutBuf::new(Framing::Packet, 100);
        assert_eq!(o.put_frame(b"ab"), 2, "a string goes as its bytes");
        assert_eq!(
            o.put_with(|b| -> Result<(), ()> {
                b.extend_from_slice(b"xyz");
                Ok(())
            }),
            Ok(3)
        );
        assert_eq!(
            o.put_with(|b| {
                b.push(1);
                Err("no")
            }),
            Err("no")
        );
        let mut wire = vec![];
        o.flush(|b| {
            wire.extend_from_slice(b);
            Ok(b.len())
        })
        .unwrap();
        assert_eq!(wire, b"abxyz");
        assert!(o.is_empty());

        let mut t = OutBuf::new(Framing::Text, 100);
        t.put_frame(b"hi");
        t.put_with(|b| -> Result<(), ()> {
            b.extend_from_slice(b"{}");
            Ok(())
        })
        .unwrap();
        t.put_with(|b| -> Result<(), ()> {
            b.extend_from_slice(b"ok\n");
            Ok(())
        })
        .unwrap();
        t.put_with(|_| -> Result<(), ()> { Ok(()) }).unwrap();
        let mut wire = vec![];
        t.flush(|b| {
            wire.extend_from_slice(b);
            Ok(b.len())
        })
        .unwrap();
        assert_eq!(wire, b"hi\n{}\nok\n\n");

        let mut b = OutBuf::new(Framing::Bson, 100);
        let doc = bson_doc(9);
        assert_eq!(
            b.put_with(|o| -> Result<(), ()> {
                o.extend_from_slice(&doc);
                Ok(())
            }),
            Ok(9)
        );
        assert_eq!(b.len(), 9);
    }

    #[test]
    fn a_slow_peer_keeps_the_rest_and_overflow_closes() {
        let mut o = OutBuf::new(Framing::Raw, 20);
        o.put_frame(&[1; 12]);
        assert!(o.wants_flush());
        // The socket takes 5 bytes, then would block.
        let mut wire = vec![];
        let mut room = 5;
        o.flush(|b| {
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(room);
            room -= n;
            wire.extend_from_slice(&b[..n]);
            Ok(n)
        })
        .unwrap();
        assert_eq!(o.len(), 7);
        assert!(o.overflow().is_none());
        o.put_frame(&[2; 12]); // 19 bytes waiting
        assert!(o.overflow().is_none());
        o.put_frame(&[0; 4]);
        let e = o.overflow().expect("over OUT");
        assert_eq!(
            e.to_string(),
            "unsent output of 23 bytes exceeds raw OUT limit 20"
        );
        assert!(o.is_empty(), "the output of a closing connection is dropped");
        // Over OUT after a flush that could not write: the same error from flush.
        o.put_frame(&[3; 34]);
        let e = o.flush(|_| Err(io::ErrorKind::WouldBlock.into())).unwrap_err();
        assert!(matches!(
            e,
            OutError::Overflow {
                len: 34,
                limit: 20,
                ..
            }
        ));
        // A write error names itself.
        o.put_frame(b"x");
        let e = o.flush(|_| Err(io::ErrorKind::BrokenPipe.into())).unwrap_err();
        assert!(e.to_string().starts_with("write failed: "), "{e}");
    }

    #[test]
    fn the_output_shrinks_after_a_large_reply() {
        let mut o = OutBuf::new(Framing::Packet, 4 << 20);
        o.put_frame(&vec![0; 1 << 20]);
        assert!(o.capacity() > OUT_SHRINK_ABOVE);
        // Written in parts; it keeps its memory while output waits.
        let mut calls = 0;
        o.flush(|b| {
            calls += 1;
            if calls > 3 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(b.len().min(64 * 1024))
        })
        .unwrap();
        assert!(o.capacity() > OUT_SHRINK_ABOVE);
        o.flush(|b| Ok(b.len())).unwrap();
        assert!(o.is_empty());
        assert!(o.capacity() <= OUT_KEEP, "kept {} bytes", o.capacity());
        // Small replies keep their buffer (no allocation per reply).
        o.put_frame(&[0; 100]);
        let cap = o.capacity();
        o.flush(|b| Ok(b.len())).unwrap();
        o.put_frame(&[0; 100]);
        assert_eq!(o.capacity(), cap);
    }
}
