//! The cluster's byte formats: values and messages (as they cross instances, plus the
//! sender's address and the message kind) and the frames a node sends inside an
//! authenticated datagram. Decoding never trusts lengths: every read is bounded by the input,
//! tables nest at most `value::MAX_DEPTH` deep.

use crate::router::{Kind, LockOp, Message, SenderInfo};
use crate::value::{Value, MAX_DEPTH};
use std::sync::Arc;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cluster frame: {0}")]
pub struct WireError(pub &'static str);

/// Appends little-endian numbers and length-prefixed bytes.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

/// Reads what `Writer` wrote; every read checks the remaining length.
pub struct Reader<'a> {
    pub rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader { rest: b }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError("truncated"));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| WireError("string is not UTF-8"))
    }
}

/// Writes `v`; `Err` names the first function when `functions` is false (an insecure
/// cluster never carries bytecode).
pub fn put_value(w: &mut Writer, v: &Value, functions: bool) -> Result<(), &'static str> {
    match v {
        Value::Nil => w.u8(0),
        Value::Bool(false) => w.u8(1),
        Value::Bool(true) => w.u8(2),
        Value::Int(i) => {
            w.u8(3);
            w.u64(*i as u64);
        }
        Value::Float(f) => {
            w.u8(4);
            w.u64(f.to_bits());
        }
        Value::Str(s) => {
            w.u8(5);
            w.bytes(s);
        }
        Value::Table(pairs) => {
            w.u8(6);
            w.u32(pairs.len() as u32);
            for (k, v) in pairs {
                put_value(w, k, functions)?;
                put_value(w, v, functions)?;
            }
        }
        Value::Function(code) => {
            if !functions {
                return Err("functions cross only between nodes that share #cluster-key");
            }
            w.u8(7);
            w.bytes(code);
        }
    }
    Ok(())
}

pub fn get_value(r: &mut Reader, depth: usize, functions: bool) -> Result<Value, WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError("tables nested too deep"));
    }
    Ok(match r.u8()? {
        0 => Value::Nil,
        1 => Value::Bool(false),
        2 => Value::Bool(true),
        3 => Value::Int(r.u64()? as i64),
        4 => Value::Float(f64::from_bits(r.u64()?)),
        5 => Value::Str(r.bytes()?.to_vec()),
        6 => {
            let n = r.u32()? as usize;
            // Each pair takes at least two bytes: a count larger than that is a lie.
            if n > r.rest.len() / 2 {
                return Err(WireError("table length exceeds the frame"));
            }
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                let k = get_value(r, depth + 1, functions)?;
                let v = get_value(r, depth + 1, functions)?;
                pairs.push((k, v));
            }
            Value::Table(pairs)
        }
        7 if functions => Value::Function(r.bytes()?.to_vec()),
        7 => return Err(WireError("function from an unauthenticated node")),
        _ => return Err(WireError("unknown value tag")),
    })
}

pub fn put_sender(w: &mut Writer, s: &SenderInfo) {
    w.str(&s.node);
    w.str(&s.stage);
    w.u64(s.instance as u64);
}

pub fn get_sender(r: &mut Reader) -> Result<SenderInfo, WireError> {
    Ok(SenderInfo {
        node: r.str()?,
        stage: r.str()?,
        instance: r.u64()? as usize,
    })
}

fn put_values(w: &mut Writer, values: &[Value], functions: bool) -> Result<(), &'static str> {
    w.u32(values.len() as u32);
    values.iter().try_for_each(|v| put_value(w, v, functions))
}

fn get_values(r: &mut Reader, functions: bool) -> Result<Vec<Value>, WireError> {
    let n = r.u32()? as usize;
    if n > r.rest.len() {
        return Err(WireError("value count exceeds the frame"));
    }
    (0..n).map(|_| get_value(r, 0, functions)).collect()
}

pub fn put_message(w: &mut Writer, m: &Message, functions: bool) -> Result<(), &'static str> {
    w.str(&m.id);
    put_sender(w, &m.from);
    match &m.kind {
        Kind::Signal { cb, implicit } => {
            w.u8(if *implicit { 1 } else { 0 });
            match cb {
                Some(cb) => {
                    w.u8(1);
                    w.str(cb);
                }
                None => w.u8(0),
            }
        }
        Kind::Request { cb, .. } => {
            w.u8(2);
            w.str(cb);
        }
        Kind::Reply => w.u8(3),
        Kind::Failed(why) => {
            w.u8(4);
            w.str(why);
        }
    }
    put_values(w, &m.values, functions)
}

pub fn get_message(r: &mut Reader, functions: bool) -> Result<Message, WireError> {
    let id = r.str()?;
    let from = Arc::new(get_sender(r)?);
    let kind = match r.u8()? {
        k @ (0 | 1) => {
            let cb = match r.u8()? {
                0 => None,
                _ => Some(r.str()?),
            };
            Kind::Signal { cb, implicit: k == 1 }
        }
        2 => Kind::Request {
            cb: r.str()?,
            direct: crate::router::Direct::none(),
        },
        3 => Kind::Reply,
        4 => Kind::Failed(r.str()?),
        _ => return Err(WireError("unknown message kind")),
    };
    let values = get_values(r, functions)?;
    Ok(Message {
        id,
        from,
        values,
        kind,
    })
}

/// What one reassembled application payload asks the receiving node to do.
#[derive(Debug, Clone)]
pub enum App {
    /// Deliver to one local instance of `stage` (round-robin); answer a request that cannot be.
    One { stage: String, msg: Message },
    /// No live node of the sender had `stage`: this fail-over node delivers it, or passes it
    /// down its own fail-over chain (`hops` so far, bounded).
    Failover { stage: String, msg: Message, hops: u8 },
    /// Deliver to every local instance of `stage`.
    All { stage: String, msg: Message },
    /// Deliver to instance `instance` of this node (an answer, a lock grant, an event).
    To { instance: usize, msg: Message },
    /// An ordered-lock operation for the lock table this node owns.
    Lock {
        op: LockOp,
        name: String,
        cb: String,
        from: SenderInfo,
        values: Vec<Value>,
    },
}

pub fn encode_app(app: &App, functions: bool) -> Result<Vec<u8>, &'static str> {
    let mut w = Writer::default();
    put_app(&mut w, app, functions)?;
    Ok(w.buf)
}

/// Appends `app` to `w` (straight into a batch being filled); on `Err`, `w` may hold a part
/// of it, which the caller cuts off.
pub fn put_app(w: &mut Writer, app: &App, functions: bool) -> Result<(), &'static str> {
    match app {
        App::One { stage, msg } | App::All { stage, msg } => {
            w.u8(if matches!(app, App::One { .. }) { 1 } else { 2 });
            w.str(stage);
            put_message(w, msg, functions)?;
        }
        App::Failover { stage, msg, hops } => {
            w.u8(5);
            w.u8(*hops);
            w.str(stage);
            put_message(w, msg, functions)?;
        }
        App::To { instance, msg } => {
            w.u8(3);
            w.u64(*instance as u64);
            put_message(w, msg, functions)?;
        }
        App::Lock {
            op,
            name,
            cb,
            from,
            values,
        } => {
            w.u8(4);
            w.u8(match op {
                LockOp::Acquire => 0,
                LockOp::Extend => 1,
                LockOp::Release => 2,
            });
            w.str(name);
            w.str(cb);
            put_sender(w, from);
            put_values(w, values, functions)?;
        }
    }
    Ok(())
}

pub fn decode_app(b: &[u8], functions: bool) -> Result<App, WireError> {
    let mut r = Reader::new(b);
    let app = match r.u8()? {
        1 => App::One {
            stage: r.str()?,
            msg: get_message(&mut r, functions)?,
        },
        2 => App::All {
            stage: r.str()?,
            msg: get_message(&mut r, functions)?,
        },
        5 => App::Failover {
            hops: r.u8()?,
            stage: r.str()?,
            msg: get_message(&mut r, functions)?,
        },
        3 => App::To {
            instance: r.u64()? as usize,
            msg: get_message(&mut r, functions)?,
        },
        4 => {
            let op = match r.u8()? {
                0 => LockOp::Acquire,
                1 => LockOp::Extend,
                2 => LockOp::Release,
                _ => return Err(WireError("unknown lock operation")),
            };
            App::Lock {
                op,
                name: r.str()?,
                cb: r.str()?,
                from: get_sender(&mut r)?,
                values: get_values(&mut r, functions)?,
            }
        }
        _ => return Err(WireError("unknown application frame")),
    };
    if !r.rest.is_empty() {
        return Err(WireError("trailing bytes"));
    }
    Ok(app)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(values: Vec<Value>, kind: Kind) -> Message {
        Message {
            id: "load_user".into(),
            from: Arc::new(SenderInfo {
                node: "127.0.0.1:9801".into(),
                stage: "web".into(),
                instance: 3,
            }),
            values,
            kind,
        }
    }

    fn all_values() -> Vec<Value> {
        vec![
            Value::Nil,
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(-42),
            Value::Int(i64::MAX),
            Value::Float(3.0),
            Value::Str(b"\0bin\xff".to_vec()),
            Value::Table(vec![
                (Value::Int(1), Value::Str(b"a".to_vec())),
                (Value::Str(b"k".to_vec()), Value::Table(vec![])),
            ]),
            Value::Function(vec![0x1b, b'L', b'u', b'a']),
        ]
    }

    #[test]
    fn messages_round_trip_with_every_kind_and_value() {
        for kind in [
            Kind::Signal {
                cb: Some("cb".into()),
                implicit: true,
            },
            Kind::Signal {
                cb: None,
                implicit: false,
            },
            Kind::Request {
                cb: "r#7".into(),
                direct: crate::router::Direct::none(),
            },
            Kind::Reply,
            Kind::Failed("timeout".into()),
        ] {
            let m = msg(all_values(), kind.clone());
            let app = App::One {
                stage: "db".into(),
                msg: m,
            };
            let b = encode_app(&app, true).unwrap();
            let App::One { stage, msg: got } = decode_app(&b, true).unwrap() else {
                panic!("kind changed")
            };
            assert_eq!(stage, "db");
            assert_eq!(got.values, all_values());
            assert_eq!(got.kind, kind);
            assert_eq!(
                *got.from,
                SenderInfo {
                    node: "127.0.0.1:9801".into(),
                    stage: "web".into(),
                    instance: 3
                }
            );
        }
    }

    #[test]
    fn functions_need_an_authenticated_cluster() {
        let app = App::To {
            instance: 0,
            msg: msg(all_values(), Kind::Reply),
        };
        assert!(encode_app(&app, false).is_err());
        let b = encode_app(&app, true).unwrap();
        assert_eq!(
            decode_app(&b, false).unwrap_err(),
            WireError("function from an unauthenticated node")
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let app = App::Lock {
            op: LockOp::Extend,
            name: "L".into(),
            cb: "x".into(),
            from: SenderInfo {
                node: "n".into(),
                stage: "s".into(),
                instance: 1,
            },
            values: all_values(),
        };
        let b = encode_app(&app, true).unwrap();
        assert!(decode_app(&b, true).is_ok());
        for n in 0..b.len() {
            assert!(decode_app(&b[..n], true).is_err(), "prefix of {n} bytes accepted");
        }
        // A huge claimed table length does not allocate.
        let mut w = Writer::default();
        w.u8(6);
        w.u32(u32::MAX);
        assert!(get_value(&mut Reader::new(&w.buf), 0, true).is_err());
    }
}
