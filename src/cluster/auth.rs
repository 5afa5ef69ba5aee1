//! Every cluster datagram in one envelope: magic, version, key id, the sender's session (a
//! random number per process start), a per-session sequence number, the send time, the frame
//! type, the body and an HMAC-SHA256 tag (truncated to 128 bits) over all of it. The receiver
//! checks, in order: length, magic, key id, tag, time (±`MAX_SKEW`), and a 1024-entry
//! sliding replay window per session. Without a key (`#cluster-insecure`) the key id is 0
//! and there is no tag; the replay window still applies. The tag also covers the receiver's
//! address (not sent: each side puts it in), so a datagram captured on its way to one node
//! is refused by every other node.

use ring::hmac;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 2] = b"SC";
const VERSION: u8 = 1;
/// magic, version, key id, session, sequence, time, frame type.
pub const HEADER: usize = 2 + 1 + 1 + 8 + 8 + 8 + 1;
pub const TAG: usize = 16;
/// A datagram sent longer ago (or later) than this is refused, so that a captured one cannot
/// be replayed to a node that has forgotten its sender's session.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
const WINDOW: u64 = 1024;
/// Sessions remembered for replay checks; the least recently seen go first.
const MAX_SESSIONS: usize = 4096;

/// Why a datagram was refused (counted per reason by the receiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Shorter than an envelope, or not ours (magic, version).
    Truncated,
    /// Signed with another key (or none, or one when we have none).
    WrongKey,
    /// The tag does not match: forged or altered.
    BadTag,
    /// Sent too long ago (or in the future).
    Stale,
    /// Seen already, or older than the replay window.
    Replayed,
    /// Authentic, but its body does not decode.
    Malformed,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::Truncated,
        Reject::WrongKey,
        Reject::BadTag,
        Reject::Stale,
        Reject::Replayed,
        Reject::Malformed,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::WrongKey => "wrong key",
            Reject::BadTag => "bad tag",
            Reject::Stale => "stale",
            Reject::Replayed => "replayed",
            Reject::Malformed => "malformed",
        }
    }
}

/// An opened datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened<'a> {
    pub session: u64,
    pub seq: u64,
    pub frame: u8,
    pub body: &'a [u8],
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key id of a secret: one non-zero byte derived from it, so a node tells "another key"
/// from "forged" and a key ring can pick the right key during a rotation.
pub fn key_id(secret: &[u8]) -> u8 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"stage cluster key id\0", secret].concat(),
    );
    d.as_ref()[0] | 1
}

/// Seals datagrams of this process and opens those of others.
pub struct Envelope {
    /// The key this process signs with.
    key: Option<(u8, hmac::Key)>,
    /// Keys still accepted on receipt (a rotation in progress), by key id.
    accept: Vec<(u8, hmac::Key)>,
    session: u64,
    seq: AtomicU64,
    windows: std::sync::Mutex<HashMap<u64, Window>>,
}

#[derive(Clone)]
struct Window {
    top: u64,
    seen: [u64; (WINDOW / 64) as usize],
    last_use: u64,
}

impl Window {
    /// Marks `seq` seen; false when it was seen already or is older than the window.
    fn accept(&mut self, seq: u64) -> bool {
        if seq > self.top {
            let shift = seq - self.top;
            if shift >= WINDOW {
                self.seen = [0; (WINDOW / 64) as usize];
            } else {
                for _ in 0..shift {
                    // Clear the slot the window moves onto.
                    self.top += 1;
                    let i = (self.top % WINDOW) as usize;
                    self.seen[i / 64] &= !(1 << (i % 64));
                }
            }
            self.top = seq;
        } else if self.top - seq >= WINDOW {
            return false;
        }
        let i = (seq % WINDOW) as usize;
        let bit = 1u64 << (i % 64);
        if self.seen[i / 64] & bit != 0 {
            return false;
        }
        self.seen[i / 64] |= bit;
        true
    }
}

impl Envelope {
    /// `secret`: `#cluster-key` (None: insecure). `session`: random per process start.
    pub fn new(secret: Option<&[u8]>, session: u64) -> Envelope {
        Envelope {
            key: secret.map(|s| (key_id(s), hmac::Key::new(hmac::HMAC_SHA256, s))),
            accept: vec![],
            session,
            seq: AtomicU64::new(0),
            windows: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Also opens datagrams signed with one of `older` keys: during a rotation every node
    /// first accepts the new key, then signs with it, then drops the old one.
    pub fn accepting(mut self, older: &[Vec<u8>]) -> Envelope {
        if self.key.is_some() {
            self.accept = older
                .iter()
                .map(|s| (key_id(s), hmac::Key::new(hmac::HMAC_SHA256, s)))
                .collect();
        }
        self
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn secure(&self) -> bool {
        self.key.is_some()
    }

    /// One datagram for `to` carrying `body` as frame type `frame`.
    pub fn seal(&self, to: SocketAddr, frame: u8, body: &[u8]) -> Vec<u8> {
        self.seal_at(to, frame, body, now_ms())
    }

    fn seal_at(&self, to: SocketAddr, frame: u8, body: &[u8], time: u64) -> Vec<u8> {
        let mut d = Vec::with_capacity(HEADER + body.len() + TAG);
        d.resize(HEADER, 0);
        d.extend_from_slice(body);
        self.seal_in_place_at(to, frame, &mut d, time);
        d
    }

    /// Seals a datagram built in place: `d` starts with `HEADER` bytes of room for the
    /// envelope (overwritten here), then the body; the tag is appended. Saves a copy of the
    /// body (a batch of messages is encoded straight into its datagram).
    pub fn seal_in_place(&self, to: SocketAddr, frame: u8, d: &mut Vec<u8>) {
        self.seal_in_place_at(to, frame, d, now_ms())
    }

    fn seal_in_place_at(&self, to: SocketAddr, frame: u8, d: &mut Vec<u8>, time: u64) {
        assert!(d.len() >= HEADER, "no room for the envelope");
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        d[..2].copy_from_slice(MAGIC);
        d[2] = VERSION;
        d[3] = self.key.as_ref().map_or(0, |k| k.0);
        d[4..12].copy_from_slice(&self.session.to_le_bytes());
        d[12..20].copy_from_slice(&seq.to_le_bytes());
        d[20..28].copy_from_slice(&time.to_le_bytes());
        d[28] = frame;
        if let Some((_, key)) = &self.key {
            let tag = sign(key, to, d);
            d.extend_from_slice(&tag[..TAG]);
        }
    }

    /// Checks a datagram that arrived at `me` and returns what it carries, or why it is refused.
    pub fn open<'a>(&self, me: SocketAddr, d: &'a [u8]) -> Result<Opened<'a>, Reject> {
        self.open_at(me, d, now_ms())
    }

    fn open_at<'a>(&self, me: SocketAddr, d: &'a [u8], now: u64) -> Result<Opened<'a>, Reject> {
        let tag_len = if self.key.is_some() { TAG } else { 0 };
        if d.len() < 4 || &d[..2] != MAGIC || d[2] != VERSION {
            return Err(Reject::Truncated);
        }
        let mine = self.key.as_ref().map_or(0, |k| k.0);
        if d[3] != mine && !self.accept.iter().any(|k| k.0 == d[3]) {
            return Err(Reject::WrongKey);
        }
        if d.len() < HEADER + tag_len {
            return Err(Reject::Truncated);
        }
        let (signed, tag) = d.split_at(d.len() - tag_len);
        if self.key.is_some() {
            // Every key of the ring with this id is tried (ids are one byte: two keys may share one).
            let ok = self
                .key
                .iter()
                .chain(&self.accept)
                .filter(|k| k.0 == d[3])
                .any(|(_, key)| constant_eq(&sign(key, me, signed)[..TAG], tag));
            if !ok {
                return Err(Reject::BadTag);
            }
        }
        let u64_at = |i: usize| u64::from_le_bytes(signed[i..i + 8].try_into().expect("8 bytes"));
        let (session, seq, time) = (u64_at(4), u64_at(12), u64_at(20));
        if now.abs_diff(time) > MAX_SKEW.as_millis() as u64 {
            return Err(Reject::Stale);
        }
        if !self.accept(session, seq, now) {
            return Err(Reject::Replayed);
        }
        Ok(Opened {
            session,
            seq,
            frame: signed[28],
            body: &signed[HEADER..],
        })
    }

    fn accept(&self, session: u64, seq: u64, now: u64) -> bool {
        let mut w = self.windows.lock().expect("replay windows");
        if !w.contains_key(&session) && w.len() >= MAX_SESSIONS {
            // Forget the session seen least recently (its datagrams are stale by now or soon).
            if let Some(old) = w.iter().min_by_key(|(_, v)| v.last_use).map(|(k, _)| *k) {
                w.remove(&old);
            }
        }
        let win = w.entry(session).or_insert(Window {
            top: 0,
            seen: [0; (WINDOW / 64) as usize],
            last_use: now,
        });
        win.last_use = now;
        win.accept(seq)
    }
}

/// HMAC-SHA256 over the receiver's address and the datagram.
fn sign(key: &hmac::Key, to: SocketAddr, d: &[u8]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    match to.ip() {
        std::net::IpAddr::V4(ip) => ctx.update(&ip.to_ipv6_mapped().octets()),
        std::net::IpAddr::V6(ip) => ctx.update(&ip.octets()),
    }
    ctx.update(&to.port().to_le_bytes());
    ctx.update(d);
    ctx.sign().as_ref().try_into().expect("32 bytes")
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn a_datagram_for_one_node_is_refused_by_another() {
        let a = Envelope::new(Some(b"k1"), 7);
        let d = a.seal(at(2), 3, b"hello");
        assert_eq!(Envelope::new(Some(b"k1"), 9).open(at(3), &d), Err(Reject::BadTag));
        assert!(Envelope::new(Some(b"k1"), 9).open(at(2), &d).is_ok());
    }

    #[test]
    fn a_sealed_datagram_opens_once() {
        let a = Envelope::new(Some(b"k1"), 7);
        let b = Envelope::new(Some(b"k1"), 8);
        let d = a.seal(at(1), 3, b"hello");
        let o = b.open(at(1), &d).unwrap();
        assert_eq!((o.session, o.seq, o.frame, o.body), (7, 1, 3, &b"hello"[..]));
        assert_eq!(b.open(at(1), &d), Err(Reject::Replayed));
    }

    #[test]
    fn a_key_rotation_never_splits_the_cluster() {
        let (k1, k2) = (b"old-key".to_vec(), b"new-key".to_vec());
        let only = |k: &[u8], s| Envelope::new(Some(k), s);
        let ring = |sign: &[u8], also: &[u8], s| Envelope::new(Some(sign), s).accepting(&[also.to_vec()]);
        // Step 1: every node accepts k2 while still signing with k1; step 2: nodes switch to
        // signing with k2 one by one (still accepting k1); step 3: k1 is dropped.
        let step1 = ring(&k1, &k2, 1);
        let step2 = ring(&k2, &k1, 2);
        let step3 = only(&k2, 3);
        let old = only(&k1, 4);
        assert!(step2.open(at(1), &step1.seal(at(1), 1, b"a")).is_ok());
        assert!(step1.open(at(1), &step2.seal(at(1), 1, b"b")).is_ok());
        assert!(step2.open(at(1), &step3.seal(at(1), 1, b"c")).is_ok());
        assert!(step3.open(at(1), &step2.seal(at(1), 1, b"d")).is_ok());
        assert!(step1.open(at(1), &old.seal(at(1), 1, b"e")).is_ok());
        // Skipping a step is refused, by key id, not by a bad tag.
        assert_eq!(
            old.open(at(1), &step2.seal(at(1), 1, b"f")),
            Err(Reject::WrongKey)
        );
        assert_eq!(
            step3.open(at(1), &old.seal(at(1), 1, b"g")),
            Err(Reject::WrongKey)
        );
        // An accepted key still needs a true tag.
        let mut forged = step1.seal(at(1), 1, b"h");
        forged[HEADER] ^= 1;
        assert_eq!(step2.open(at(1), &forged), Err(Reject::BadTag));
        // An insecure node accepts nothing more by being given older keys.
        let open = Envelope::new(None, 9).accepting(std::slice::from_ref(&k1));
        assert_eq!(open.open(at(1), &old.seal(at(1), 1, b"i")), Err(Reject::WrongKey));
    }

    #[test]
    fn wrong_key_no_key_forged_truncated_stale_are_refused() {
        let good = Envelope::new(Some(b"right"), 1);
        let rx = Envelope::new(Some(b"right"), 2);
        assert_eq!(
            rx.open(at(1), &Envelope::new(Some(b"wrong"), 3).seal(at(1), 1, b"x")),
            Err(Reject::WrongKey)
        );
        assert_eq!(
            rx.open(at(1), &Envelope::new(None, 4).seal(at(1), 1, b"x")),
            Err(Reject::WrongKey)
        );
        // An insecure node refuses keyed datagrams too.
        assert_eq!(
            Envelope::new(None, 5).open(at(1), &good.seal(at(1), 1, b"x")),
            Err(Reject::WrongKey)
        );
        let mut forged = good.seal(at(1), 1, b"pay 10");
        let n = forged.len();
        forged[HEADER] ^= 1;
        assert_eq!(rx.open(at(1), &forged), Err(Reject::BadTag));
        forged[HEADER] ^= 1;
        forged[n - 1] ^= 0x80;
        assert_eq!(rx.open(at(1), &forged), Err(Reject::BadTag));
        let d = good.seal(at(1), 1, b"body");
        for cut in [0, 3, HEADER, d.len() - 1] {
            assert!(rx.open(at(1), &d[..cut]).is_err(), "cut at {cut} accepted");
        }
        assert_eq!(rx.open(at(1), &d[..10]), Err(Reject::Truncated));
        let old = good.seal_at(at(1), 1, b"x", now_ms() - 31_000);
        assert_eq!(rx.open(at(1), &old), Err(Reject::Stale));
        assert!(rx.open(at(1), &d).is_ok(), "the untouched datagram still opens");
    }

    #[test]
    fn the_replay_window_takes_reordering_and_refuses_repeats_and_ancient() {
        let mut w = Window {
            top: 0,
            seen: [0; 16],
            last_use: 0,
        };
        for s in [5, 3, 4, 1, 2] {
            assert!(w.accept(s));
        }
        for s in 1..=5 {
            assert!(!w.accept(s));
        }
        assert!(w.accept(2000));
        assert!(!w.accept(900), "older than the window");
        assert!(w.accept(1500));
        assert!(!w.accept(1500));
        assert!(w.accept(1_000_000));
        assert!(w.accept(1_000_000 - 1023));
        assert!(!w.accept(1_000_000 - 1024));
    }

    #[test]
    fn sessions_are_bounded() {
        let rx = Envelope::new(None, 0);
        for s in 0..(MAX_SESSIONS as u64 + 10) {
            assert!(rx.accept(s, 1, s));
        }
        assert!(rx.windows.lock().unwrap().len() <= MAX_SESSIONS);
    }
}
