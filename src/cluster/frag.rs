//! Messages larger than one datagram: the sender cuts an application payload into numbered
//! fragments of one message sequence number (per sender → receiver pair); the receiver puts
//! them back together in a bounded buffer and delivers whole messages at most once and in
//! sequence order: a message older than one already delivered from the same sender is
//! dropped (a gap is a loss, never a wait, so nothing blocks behind a lost datagram).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The largest message a node accepts (values of 1 MiB and more cross nodes).
pub const MAX_MESSAGE: usize = 8 << 20;
/// All incomplete messages together never hold more than this.
pub const MAX_BUFFERED: usize = 32 << 20;
/// An incomplete message is dropped this long after its first fragment.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a fragment frame before its chunk: sequence, index, count.
pub const FRAG_HEADER: usize = 16;

/// Cuts `payload` into fragment bodies of at most `chunk` payload bytes each.
pub fn split(msg_seq: u64, payload: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let chunk = chunk.max(1);
    let count = payload.len().div_ceil(chunk).max(1);
    (0..count)
        .map(|i| {
            let part = &payload[(i * chunk).min(payload.len())..((i + 1) * chunk).min(payload.len())];
            let mut b = Vec::with_capacity(FRAG_HEADER + part.len());
            b.extend_from_slice(&msg_seq.to_le_bytes());
            b.extend_from_slice(&(i as u32).to_le_bytes());
            b.extend_from_slice(&(count as u32).to_le_bytes());
            b.extend_from_slice(part);
            b
        })
        .collect()
}

/// Why fragments were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// The fragment header does not make sense.
    Malformed,
    /// The message would exceed `MAX_MESSAGE`.
    TooLarge,
    /// Older than (or equal to) a message already delivered from the sender.
    Late,
}

struct Partial {
    parts: Vec<Option<Vec<u8>>>,
    have: usize,
    bytes: usize,
    started: Instant,
}

/// Incomplete messages of every sender, bounded in bytes and time.
#[derive(Default)]
pub struct Reassembler {
    partial: HashMap<(u64, u64), Partial>,
    /// Per sender session: the last delivered message sequence number.
    delivered: HashMap<u64, (u64, Instant)>,
    bytes: usize,
    /// Incomplete messages dropped for the buffer bound or the timeout.
    pub evicted: u64,
}

impl Reassembler {
    /// Takes one fragment from `session`; returns a whole message when this completes one.
    pub fn push(&mut self, session: u64, body: &[u8], now: Instant) -> Result<Option<Vec<u8>>, Drop> {
        if body.len() < FRAG_HEADER {
            return Err(Drop::Malformed);
        }
        let seq = u64::from_le_bytes(body[..8].try_into().expect("8"));
        let index = u32::from_le_bytes(body[8..12].try_into().expect("4")) as usize;
        let count = u32::from_le_bytes(body[12..16].try_into().expect("4")) as usize;
        let chunk = &body[FRAG_HEADER..];
        if count == 0 || index >= count {
            return Err(Drop::Malformed);
        }
        if let Some((last, _)) = self.delivered.get(&session) {
            if seq <= *last {
                return Err(Drop::Late);
            }
        }
        if count == 1 {
            self.mark(session, seq, now);
            return Ok(Some(chunk.to_vec()));
        }
        // Every fragment but the last is full, so count fragments cannot be below count-1
        // times this one's size.
        if count.saturating_sub(1).saturating_mul(chunk.len().max(1)) > MAX_MESSAGE {
            return Err(Drop::TooLarge);
        }
        let key = (session, seq);
        let p = self.partial.entry(key).or_insert_with(|| Partial {
            parts: vec![None; count],
            have: 0,
            bytes: 0,
            started: now,
        });
        if p.parts.len() != count {
            return Err(Drop::Malformed);
        }
        if p.parts[index].is_none() {
            if p.bytes + chunk.len() > MAX_MESSAGE {
                self.remove(key);
                return Err(Drop::TooLarge);
            }
            p.parts[index] = Some(chunk.to_vec());
            p.have += 1;
            p.bytes += chunk.len();
            self.bytes += chunk.len();
        }
        if p.have == count {
            let p = self.partial.remove(&key).expect("present");
            self.bytes -= p.bytes;
            let mut out = Vec::with_capacity(p.bytes);
            for part in p.parts.into_iter().flatten() {
                out.extend_from_slice(&part);
            }
            self.mark(session, seq, now);
            return Ok(Some(out));
        }
        while self.bytes > MAX_BUFFERED {
            let Some(oldest) = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.remove(oldest);
            self.evicted += 1;
        }
        Ok(None)
    }

    /// Takes the whole messages `first .. first + n` of `session` (a batch); returns how many
    /// of the first ones are late (at or below a message already delivered from the sender),
    /// which the caller drops; the others are delivered in order.
    pub fn take_run(&mut self, session: u64, first: u64, n: u64, now: Instant) -> u64 {
        let late = match self.delivered.get(&session) {
            Some((last, _)) if *last >= first => (*last - first + 1).min(n),
            _ => 0,
        };
        if late < n {
            self.mark(session, first + n - 1, now);
        }
        late
    }

    fn mark(&mut self, session: u64, seq: u64, now: Instant) {
        self.delivered.insert(session, (seq, now));
        // Older incomplete messages of this sender can no longer be delivered.
        let stale: Vec<_> = self
            .partial
            .keys()
            .filter(|(s, q)| *s == session && *q < seq)
            .copied()
            .collect();
        for k in stale {
            self.remove(k);
            self.evicted += 1;
        }
    }

    fn remove(&mut self, key: (u64, u64)) {
        if let Some(p) = self.partial.remove(&key) {
            self.bytes -= p.bytes;
        }
    }

    /// Drops incomplete messages past the timeout and senders silent for long.
    pub fn expire(&mut self, now: Instant) {
        let old: Vec<_> = self
            .partial
            .iter()
            .filter(|(_, p)| now.duration_since(p.started) > REASSEMBLY_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.remove(k);
            self.evicted += 1;
        }
        self.delivered
            .retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(600));
    }

    /// Bytes held by incomplete messages.
    pub fn buffered(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_mebibyte_in_any_order_comes_back_whole_once() {
        let p = payload(1 << 20);
        let mut frags = split(1, &p, 1200);
        assert_eq!(frags.len(), (1usize << 20).div_ceil(1200));
        frags.reverse();
        frags.swap(3, 100);
        let mut r = Reassembler::default();
        let now = Instant::now();
        let mut out = None;
        for f in &frags {
            if let Some(m) = r.push(9, f, now).unwrap() {
                assert!(out.is_none());
                out = Some(m);
            }
        }
        assert_eq!(out.unwrap(), p);
        assert_eq!(r.buffered(), 0);
        // A duplicate fragment after delivery is late, not a second message.
        assert_eq!(r.push(9, &frags[0], now), Err(Drop::Late));
    }

    #[test]
    fn order_per_sender_is_kept_by_dropping_late_messages() {
        let mut r = Reassembler::default();
        let now = Instant::now();
        assert!(r.push(1, &split(2, b"two", 100)[0], now).unwrap().is_some());
        assert_eq!(r.push(1, &split(1, b"one", 100)[0], now), Err(Drop::Late));
        // Another sender has its own order.
        assert!(r.push(2, &split(1, b"one", 100)[0], now).unwrap().is_some());
    }

    #[test]
    fn a_batch_delivers_only_the_messages_newer_than_the_last_delivered() {
        let mut r = Reassembler::default();
        let now = Instant::now();
        assert_eq!(r.take_run(1, 1, 3, now), 0);
        // 2..=4 overlaps 1..=3: two late, one new.
        assert_eq!(r.take_run(1, 2, 3, now), 2);
        // Entirely old: all late, and the mark does not move back.
        assert_eq!(r.take_run(1, 1, 4, now), 4);
        assert_eq!(r.take_run(1, 5, 1, now), 0);
        // A single fragment message numbered below the last batch is late too.
        assert_eq!(r.push(1, &split(5, b"x", 100)[0], now), Err(Drop::Late));
        assert!(r.push(1, &split(6, b"x", 100)[0], now).unwrap().is_some());
        assert_eq!(r.take_run(1, 6, 2, now), 1);
        // Another sender has its own numbers.
        assert_eq!(r.take_run(2, 1, 1, now), 0);
    }

    #[test]
    fn the_buffer_is_bounded_and_incomplete_messages_expire() {
        let mut r = Reassembler::default();
        let now = Instant::now();
        // 40 incomplete 1 MiB messages: all but the last fragment of each.
        for seq in 1..=40u64 {
            let frags = split(seq, &payload(1 << 20), 60_000);
            for f in &frags[..frags.len() - 1] {
                assert!(r.push(seq + 100, f, now).unwrap().is_none());
            }
            assert!(r.buffered() <= MAX_BUFFERED);
        }
        assert!(r.evicted > 0);
        r.expire(now + REASSEMBLY_TIMEOUT + Duration::from_secs(1));
        assert_eq!(r.buffered(), 0);
        // A claimed size beyond the limit is refused at once.
        let mut big = split(1, &payload(1000), 1000).remove(0);
        big[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        assert_eq!(r.push(5, &big, now), Err(Drop::TooLarge));
        assert_eq!(r.push(5, &big[..10], now), Err(Drop::Malformed));
    }
}
