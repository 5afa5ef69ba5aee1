//! The `index` built-in stage (STAGE's `index.so+rank`): ranked score tables ("scoreboards").
//! Each named table keeps, per id, a value and up to four tiers of scores; every tier is a
//! ranking (integers: larger first; strings: byte order, before every integer; ties: the
//! score set first ranks first). Protocol (docs/stages.md, STAGE's docs/api/stage.md):
//! * `"rank:cmd?table/tier=callback", arg`: one command; the result comes back as message
//!   `callback` (no `=callback`: no answer). STAGE's older spelling
//!   `"rank:callback=cmd?table"` is read too.
//! * `"rank:callback", {["cmd?table/tier"] = arg, ...}`: several commands (keys `#N.cmd…`
//!   run in the order of N, then the others); the answer, message `callback` (or its `=cb`),
//!   is a table of the results under the same keys.
//!
//! Commands (`cmd` or its first letter): `set` `{id = {i = score | {score...}, v = value,
//! I = {[tier] = score...}}}` → `{id = rank of the new score | 0 unchanged | -1 tier not
//! set}`; `del` `{id...}` → `{id = bool}` (a tier's scores; `table/` deletes the id);
//! `get` `{id...}` → `{id = {v = value, I = {{i = score, d = rank}...}}}`; `range`
//! `{score, count}` or `{id, delta, count}` and `forEach` `{rank, count}` →
//! `{[rank] = {k = id, v = value, i = score, d = rank}...}`; `total` → how many scores.
//!
//! Everything is held in memory, bounded by the stage's settings (`memory`, the longest id
//! `key`, the largest value `value`): a `set` that would pass the bound is refused for that
//! id, and the answer carries the reason as a second value.

use super::{Builtin, Out};
use crate::router::{Kind, Message};
use crate::value::Value;
use serde_json::Value as Json;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tiers (score slots) per id, as STAGE's `MAX_TIER`.
pub const TIERS: usize = 4;
/// Default memory bound of one index stage, bytes.
pub const MEMORY: usize = 64 << 20;
/// Default longest id, bytes (STAGE's `KEY_SIZE`).
pub const KEY: usize = 128;
/// Default largest value (`v`) of one id, bytes once encoded.
pub const VALUE: usize = 64 << 10;

/// Accounted bytes of one id beyond its name and value, of one score, of one table.
const RECORD_COST: usize = 160;
const SCORE_COST: usize = 64;
const TABLE_COST: usize = 512;
/// Most entries one `range` / `forEach` answers with.
pub const MAX_COUNT: usize = 1 << 20;

/// One score: STAGE ranks integers larger first, strings in byte order, strings first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Score {
    Str(Vec<u8>),
    Int(i64),
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Score::Int(a), Score::Int(b)) => b.cmp(a),
            (Score::Str(a), Score::Str(b)) => a.cmp(b),
            (Score::Str(_), Score::Int(_)) => Ordering::Less,
            (Score::Int(_), Score::Str(_)) => Ordering::Greater,
        }
    }
}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Score {
    fn from_value(v: &Value) -> Result<Score, String> {
        match v {
            Value::Int(i) => Ok(Score::Int(*i)),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(Score::Int(*f as i64)),
            Value::Str(s) => Ok(Score::Str(s.clone())),
            other => Err(format!(
                "a score is an integer or a string, not {}",
                describe(other)
            )),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Score::Int(i) => Value::Int(*i),
            Score::Str(s) => Value::Str(s.clone()),
        }
    }

    fn cost(&self) -> usize {
        SCORE_COST
            + match self {
                Score::Str(s) => s.len(),
                Score::Int(_) => 0,
            }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Int(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the number {f}"),
        Value::Str(s) => format!("the string \"{}\"", String::from_utf8_lossy(s)),
        Value::Table(_) => "a table".into(),
        Value::Function(_) => "a function".into(),
    }
}

/// One ranked entry: a score, the order it was set in (ties), and whose it is.
#[derive(Debug, Clone)]
struct Entry {
    score: Score,
    seq: u64,
    id: Arc<str>,
}

impl Entry {
    fn key(&self) -> (&Score, u64) {
        (&self.score, self.seq)
    }
}

/// A ranking with positions: a sorted list kept in chunks, so that inserting, removing,
/// finding the rank of an entry and the entry at a rank stay cheap at millions of entries.
#[derive(Debug, Default)]
pub struct RankList {
    chunks: Vec<Vec<Entry>>,
    len: usize,
}

const CHUNK: usize = 512;

impl RankList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk where `key` is or would go.
    fn chunk_of(&self, key: (&Score, u64)) -> usize {
        let i = self
            .chunks
            .partition_point(|c| c.last().is_some_and(|e| e.key() < key));
        i.min(self.chunks.len().saturating_sub(1))
    }

    fn before(&self, chunk: usize) -> usize {
        self.chunks[..chunk].iter().map(Vec::len).sum()
    }

    /// Inserts; returns the entry's rank (1-based).
    fn insert(&mut self, e: Entry) -> usize {
        if self.chunks.is_empty() {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let c = self.chunk_of(e.key());
        let chunk = &mut self.chunks[c];
        let at = chunk.partition_point(|x| x.key() < e.key());
        chunk.insert(at, e);
        self.len += 1;
        if chunk.len() >= 2 * CHUNK {
            let tail = chunk.split_off(CHUNK);
            self.chunks.insert(c + 1, tail);
        }
        self.before(c) + at + 1
    }

    /// Where `key` is: (chunk, index in chunk).
    fn find(&self, key: (&Score, u64)) -> Option<(usize, usize)> {
        if self.chunks.is_empty() {
            return None;
        }
        let c = self.chunk_of(key);
        let at = self.chunks[c].partition_point(|x| x.key() < key);
        (self.chunks[c].get(at).is_some_and(|x| x.key() == key)).then_some((c, at))
    }

    fn remove(&mut self, key: (&Score, u64)) -> bool {
        let Some((c, at)) = self.find(key) else {
            return false;
        };
        self.chunks[c].remove(at);
        self.len -= 1;
        if self.chunks[c].is_empty() {
            self.chunks.remove(c);
        } else if c + 1 < self.chunks.len() && self.chunks[c].len() + self.chunks[c + 1].len() < CHUNK {
            let next = self.chunks.remove(c + 1);
            self.chunks[c].extend(next);
        }
        true
    }

    /// The rank (1-based) of the entry with `key`.
    fn rank(&self, key: (&Score, u64)) -> Option<usize> {
        self.find(key).map(|(c, at)| self.before(c) + at + 1)
    }

    /// The rank of the first entry whose score ranks at or after `score` (for integers: the
    /// first score <= `score`).
    fn lower_bound(&self, score: &Score) -> Option<usize> {
        if self.chunks.is_empty() {
            return None;
        }
        let key = (score, 0);
        let c = self.chunk_of(key);
        let at = self.chunks[c].partition_point(|x| x.key() < key);
        let rank = self.before(c) + at + 1;
        (rank <= self.len).then_some(rank)
    }

    /// Up to `count` entries from rank `from` (1-based), with their ranks.
    fn walk(&self, from: usize, count: usize) -> Vec<(usize, &Entry)> {
        let mut out = Vec::with_capacity(count.min(self.len));
        if from == 0 || from > self.len {
            return out;
        }
        let mut skip = from - 1;
        let mut rank = from;
        for chunk in &self.chunks {
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            for e in &chunk[skip..] {
                if out.len() == count {
                    return out;
                }
                out.push((rank, e));
                rank += 1;
            }
            skip = 0;
        }
        out
    }
}

/// One id of a table.
#[derive(Debug, Default)]
struct Record {
    value: Option<Value>,
    value_cost: usize,
    /// Its scores in each tier: (score, seq) keys of the tier's ranking.
    scores: [Vec<(Score, u64)>; TIERS],
}

/// One named table (STAGE's index file).
#[derive(Debug, Default)]
struct Table {
    records: HashMap<Arc<str>, Record>,
    tiers: [RankList; TIERS],
}

/// Which tier a command works on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tier {
    One(usize),
    /// `table/`: every tier (get: all scores; del: the id itself).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Set,
    Del,
    Get,
    Range,
    ForEach,
    Total,
}

/// `#1.set?table/2` → (op, table, tier).
fn parse_command(cmd: &str) -> Result<(Op, &str, Tier), String> {
    let body = match cmd.strip_prefix('#').and_then(|r| r.split_once('.')) {
        Some((n, rest)) if n.bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => cmd,
    };
    let Some(split) = body.find(['?', ':']) else {
        return Err(format!(
            "\"{cmd}\" is not an index command (expected \"cmd?table/tier\")"
        ));
    };
    let (op, path) = (&body[..split], &body[split + 1..]);
    let op = match op {
        "s" | "set" => Op::Set,
        "d" | "del" | "delete" => Op::Del,
        "g" | "get" => Op::Get,
        "r" | "range" => Op::Range,
        "f" | "forEach" => Op::ForEach,
        "t" | "total" => Op::Total,
        other => {
            return Err(format!(
                "unknown index command \"{other}\" in \"{cmd}\" (expected s/set, d/del, g/get, r/range, f/forEach or t/total)"
            ))
        }
    };
    let (name, tier) = match path.rsplit_once('/') {
        Some((name, "")) => (name, Tier::All),
        Some((name, t)) if t.bytes().all(|b| b.is_ascii_digit()) => match t.parse::<usize>() {
            Ok(n) if (1..=TIERS).contains(&n) => (name, Tier::One(n - 1)),
            _ => return Err(format!("\"{cmd}\": the tier is 1 to {TIERS}, not {t}")),
        },
        _ => (path, Tier::One(0)),
    };
    if name.is_empty() {
        return Err(format!(
            "\"{cmd}\": no table name after '{}'",
            &body[split..=split]
        ));
    }
    Ok((op, name, tier))
}

/// Bytes a value takes, roughly (for the memory bound and the value size limit).
fn value_cost(v: &Value) -> usize {
    match v {
        Value::Str(s) | Value::Function(s) => 24 + s.len(),
        Value::Table(kv) => {
            24 + kv
                .iter()
                .map(|(k, v)| value_cost(k) + value_cost(v))
                .sum::<usize>()
        }
        _ => 16,
    }
}

fn s(x: &str) -> Value {
    Value::Str(x.as_bytes().to_vec())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn field<'v>(t: &'v [(Value, Value)], name: &str) -> Option<&'v Value> {
    t.iter()
        .find(|(k, _)| matches!(k, Value::Str(b) if b == name.as_bytes()))
        .map(|(_, v)| v)
}

/// The elements of a list argument in order (`{a, b}`, STAGE's `{"#1": a}` too), or the
/// argument itself when it is not a table.
fn list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Table(kv) => {
            let mut items: Vec<(i64, &Value)> = kv
                .iter()
                .enumerate()
                .map(|(n, (k, v))| (position(k).unwrap_or(i64::MAX / 2 + n as i64), v))
                .collect();
            items.sort_by_key(|(p, _)| *p);
            items.into_iter().map(|(_, v)| v).collect()
        }
        Value::Nil => vec![],
        other => vec![other],
    }
}

/// `3` or `"#3"` → 3.
fn position(k: &Value) -> Option<i64> {
    match k {
        Value::Int(i) => Some(*i),
        Value::Float(f) if f.fract() == 0.0 => Some(*f as i64),
        Value::Str(b) => std::str::from_utf8(b.strip_prefix(b"#")?).ok()?.parse().ok(),
        _ => None,
    }
}

fn int(v: Option<&&Value>) -> Option<i64> {
    match v? {
        Value::Int(i) => Some(*i),
        Value::Float(f) if f.is_finite() => Some(*f as i64),
        _ => None,
    }
}

/// The state of one `index` stage: its tables and the memory they take.
pub struct Index {
    stage: String,
    memory: usize,
    key: usize,
    value: usize,
    used: usize,
    tables: HashMap<String, Table>,
    seq: u64,
    /// When "full" was last logged (once a minute).
    full_logged: Option<Instant>,
}

impl Index {
    pub fn new(stage: &str, memory: usize, key: usize, value: usize) -> Index {
        Index {
            stage: stage.to_string(),
            memory,
            key,
            value,
            used: 0,
            tables: HashMap::new(),
            seq: 0,
            full_logged: None,
        }
    }

    /// Settings: `{"memory": "64m", "key": 128, "value": "64k"}`; STAGE's own forms (a
    /// directory string, `[directory, key_size, page_items]`) are accepted: tables live in
    /// memory here, so the directory and the page size are not used.
    pub fn from_settings(stage: &str, settings: &Json) -> Result<Index, String> {
        let mut x = Index::new(stage, MEMORY, KEY, VALUE);
        let bad = |what: String| format!("\"index+{stage}\": {what}");
        let size = |k: &str, v: &Json, lo: usize| -> Result<usize, String> {
            let n = match v {
                Json::Number(n) => n.as_u64().map(|n| n as usize),
                Json::String(t) => crate::net::framing::parse_size(t),
                _ => None,
            };
            n.filter(|n| *n >= lo).ok_or_else(|| {
                bad(format!(
                    "{k}: expected a size of at least {lo} (bytes, or a string such as \"64m\"), found {v}"
                ))
            })
        };
        match settings {
            Json::Null | Json::String(_) => {}
            Json::Array(a) => {
                let mut ints = 0;
                for v in a {
                    match v {
                        Json::String(_) => {}
                        Json::Number(_) if ints == 0 => {
                            x.key = size("key size", v, 1)?;
                            ints += 1;
                        }
                        Json::Number(_) => ints += 1,
                        other => {
                            return Err(bad(format!(
                                "unexpected {other} (expected [directory, key_size, page_items])"
                            )))
                        }
                    }
                }
            }
            Json::Object(o) => {
                for (k, v) in o {
                    match k.as_str() {
                        "memory" => x.memory = size(k, v, 1 << 16)?,
                        "key" => x.key = size(k, v, 1)?,
                        "value" => x.value = size(k, v, 16)?,
                        _ => {
                            return Err(bad(format!(
                                "unknown key \"{k}\" (expected memory, key or value)"
                            )))
                        }
                    }
                }
            }
            other => {
                return Err(bad(format!(
                    "expected {{\"memory\": \"64m\", \"key\": 128, \"value\": \"64k\"}}, found {other}"
                )))
            }
        }
        Ok(x)
    }

    /// Bytes accounted to the tables.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Runs one command; failures (of the command or of some of its ids) go to `errors`.
    pub fn run(&mut self, cmd: &str, arg: &Value, errors: &mut Vec<String>) -> Value {
        let (op, name, tier) = match parse_command(cmd) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e);
                return Value::Nil;
            }
        };
        if op == Op::Set && !self.tables.contains_key(name) {
            if self.used + TABLE_COST + name.len() > self.memory {
                errors.push(self.full(name));
                return Value::Nil;
            }
            self.used += TABLE_COST + name.len();
            self.tables.insert(name.to_string(), Table::default());
        }
        let empty = Table::default();
        match op {
            Op::Set => self.set(name, tier, arg, errors),
            Op::Del => self.del(name, tier, arg),
            _ => {
                let t = self.tables.get(name).unwrap_or(&empty);
                match op {
                    Op::Get => get(t, tier, arg),
                    Op::Range => range(t, tier, arg, errors),
                    Op::ForEach => for_each(t, tier, arg, errors),
                    _ => Value::Int(match tier {
                        Tier::One(n) => t.tiers[n].len() as i64,
                        Tier::All => t.records.len() as i64,
                    }),
                }
            }
        }
    }

    fn full(&mut self, name: &str) -> String {
        let msg = format!(
            "{}: index \"{name}\" cannot grow: the stage's memory bound of {} bytes is reached \
             (raise \"memory\" in the settings of its #startup entry, or delete ids)",
            self.stage, self.memory
        );
        if self
            .full_logged
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            self.full_logged = Some(Instant::now());
            log::warn!("{msg}");
        }
        msg
    }

    fn set(&mut self, name: &str, tier: Tier, arg: &Value, errors: &mut Vec<String>) -> Value {
        let Value::Table(ids) = arg else {
            errors.push(format!(
                "{}: set expects {{id = {{i = score, v = value}}, ...}}, not {}",
                self.stage,
                describe(arg)
            ));
            return Value::Nil;
        };
        let mut out = Vec::with_capacity(ids.len());
        for (k, spec) in ids {
            let Some(id) = text(k) else {
                errors.push(format!(
                    "{}: set: an id is a string, not {}",
                    self.stage,
                    describe(k)
                ));
                continue;
            };
            match self.set_one(name, tier, &id, spec) {
                Ok(d) => out.push((s(&id), Value::Int(d))),
                Err(e) => errors.push(format!("{}: set \"{id}\": {e}", self.stage)),
            }
        }
        Value::Table(out)
    }

    /// Sets one id; returns STAGE's distance: the rank of the last new score of `tier`, 0
    /// when its scores did not change, -1 when the request did not set that tier.
    fn set_one(&mut self, name: &str, tier: Tier, id: &str, spec: &Value) -> Result<i64, String> {
        if id.len() > self.key {
            return Err(format!(
                "the id is {} bytes, longer than the stage's key limit {}",
                id.len(),
                self.key
            ));
        }
        let Value::Table(spec) = spec else {
            return Err(format!(
                "expected {{i = score, v = value, I = {{...}}}}, not {}",
                describe(spec)
            ));
        };
        // What the request asks for, checked before anything changes.
        let mut wanted: [Option<Vec<Score>>; TIERS] = Default::default();
        let scores = |v: &Value| -> Result<Vec<Score>, String> {
            match v {
                Value::Nil => Ok(vec![]),
                Value::Table(_) => list(v).into_iter().map(Score::from_value).collect(),
                one => Ok(vec![Score::from_value(one)?]),
            }
        };
        if let Some(i) = field(spec, "i") {
            let Tier::One(t) = tier else {
                return Err(
                    "\"i\" needs a tier (\"table/1\" .. \"table/4\"); give \"I\" for every tier".into(),
                );
            };
            wanted[t] = Some(scores(i)?);
        }
        if let Some(all) = field(spec, "I") {
            let Value::Table(kv) = all else {
                return Err(format!("\"I\" is {{[tier] = score, ...}}, not {}", describe(all)));
            };
            for (n, (k, v)) in kv.iter().enumerate() {
                let t = position(k).unwrap_or(n as i64 + 1);
                if !(1..=TIERS as i64).contains(&t) {
                    return Err(format!("\"I\": the tier is 1 to {TIERS}, not {}", describe(k)));
                }
                wanted[t as usize - 1] = Some(scores(v)?);
            }
        }
        let value = field(spec, "v");
        let new_value_cost = value.map(value_cost);
        if let Some(c) = new_value_cost.filter(|c| *c > self.value) {
            return Err(format!(
                "the value takes {c} bytes, more than the stage's value limit {}",
                self.value
            ));
        }
        // The memory it would take at most (as if no score were kept).
        let table = self.tables.get(name).expect("created by run");
        let old = table.records.get(id);
        let mut grow =
            new_value_cost.unwrap_or(0) + wanted.iter().flatten().flatten().map(Score::cost).sum::<usize>();
        if old.is_none() {
            grow += RECORD_COST + 2 * id.len();
        }
        let shrink = old.map_or(0, |r| {
            (if value.is_some() { r.value_cost } else { 0 })
                + wanted
                    .iter()
                    .zip(&r.scores)
                    .filter(|(w, _)| w.is_some())
                    .map(|(_, s)| s.iter().map(|(x, _)| x.cost()).sum::<usize>())
                    .sum::<usize>()
        });
        if self.used + grow > self.memory + shrink {
            return Err(self.full(name));
        }
        self.used = self.used + grow - shrink;
        let table = self.tables.get_mut(name).expect("created by run");
        let key: Arc<str> = match table.records.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(id);
                table.records.insert(k.clone(), Record::default());
                k
            }
        };
        let record = table.records.get_mut(id).expect("just made");
        if let (Some(v), Some(c)) = (value, new_value_cost) {
            record.value = Some(v.clone());
            record.value_cost = c;
        }
        let mut result = -1;
        for (t, want) in wanted.into_iter().enumerate() {
            let Some(mut want) = want else { continue };
            let mut distance = 0;
            // Keep the scores asked for again (their rank among ties stays), drop the others.
            let mut kept = vec![];
            for (score, seq) in std::mem::take(&mut record.scores[t]) {
                if let Some(i) = want.iter().position(|w| *w == score) {
                    want.remove(i);
                    // a kept score was counted in `grow` and `shrink` alike
                    kept.push((score, seq));
                } else {
                    table.tiers[t].remove((&score, seq));
                }
            }
            record.scores[t] = kept;
            let mut added = vec![];
            for score in want {
                self.seq += 1;
                table.tiers[t].insert(Entry {
                    score: score.clone(),
                    seq: self.seq,
                    id: key.clone(),
                });
                added.push((score.clone(), self.seq));
                record.scores[t].push((score, self.seq));
            }
            if let Some((score, seq)) = added.last() {
                distance = table.tiers[t].rank((score, *seq)).unwrap_or(0) as i64;
            }
            if tier == Tier::One(t) {
                result = distance;
            }
        }
        if tier == Tier::All {
            result = 0;
        }
        Ok(result)
    }

    fn del(&mut self, name: &str, tier: Tier, arg: &Value) -> Value {
        let mut out = vec![];
        for k in list(arg) {
            let Some(id) = text(k) else { continue };
            let done = self.del_one(name, tier, &id);
            out.push((s(&id), Value::Bool(done)));
        }
        Value::Table(out)
    }

    fn del_one(&mut self, name: &str, tier: Tier, id: &str) -> bool {
        let Some(table) = self.tables.get_mut(name) else {
            return false;
        };
        let Some(record) = table.records.get_mut(id) else {
            return false;
        };
        let tiers: Vec<usize> = match tier {
            Tier::One(t) => vec![t],
            Tier::All => (0..TIERS).collect(),
        };
        let mut had = false;
        for t in tiers {
            for (score, seq) in std::mem::take(&mut record.scores[t]) {
                self.used -= score.cost();
                table.tiers[t].remove((&score, seq));
                had = true;
            }
        }
        if tier == Tier::All {
            let r = table.records.remove(id).expect("found above");
            self.used -= RECORD_COST + 2 * id.len() + r.value_cost;
            return true;
        }
        had
    }
}

fn get(t: &Table, tier: Tier, arg: &Value) -> Value {
    let mut out = vec![];
    for k in list(arg) {
        let Some(id) = text(k) else { continue };
        let mut fields = vec![];
        if let Some(r) = t.records.get(id.as_str()) {
            if let Some(v) = &r.value {
                fields.push((s("v"), v.clone()));
            }
            match tier {
                Tier::One(n) if !r.scores[n].is_empty() => {
                    let items = r.scores[n]
                        .iter()
                        .enumerate()
                        .map(|(i, (score, seq))| {
                            let d = t.tiers[n].rank((score, *seq)).unwrap_or(0) as i64;
                            let e = vec![(s("i"), score.to_value()), (s("d"), Value::Int(d))];
                            (Value::Int(i as i64 + 1), Value::Table(e))
                        })
                        .collect();
                    fields.push((s("I"), Value::Table(items)));
                }
                Tier::One(_) => {}
                Tier::All => {
                    let tiers = (0..TIERS)
                        .filter(|n| !r.scores[*n].is_empty())
                        .map(|n| {
                            let scores = r.scores[n]
                                .iter()
                                .enumerate()
                                .map(|(i, (score, _))| (Value::Int(i as i64 + 1), score.to_value()))
                                .collect();
                            (Value::Int(n as i64 + 1), Value::Table(scores))
                        })
                        .collect();
                    fields.push((s("I"), Value::Table(tiers)));
                }
            }
        }
        out.push((s(&id), Value::Table(fields)));
    }
    Value::Table(out)
}

/// `{[rank] = {i, k, v, d}}` for `count` entries of tier `n` from rank `from`.
fn entries(t: &Table, n: usize, from: usize, count: i64) -> Value {
    // As STAGE: a count of 0 (or none) still gives the entry at `from`.
    let count = (count.max(1) as usize).min(MAX_COUNT);
    let items = t.tiers[n]
        .walk(from, count)
        .into_iter()
        .map(|(rank, e)| {
            let mut f = vec![(s("i"), e.score.to_value()), (s("k"), s(&e.id))];
            if let Some(v) = t.records.get(&e.id).and_then(|r| r.value.clone()) {
                f.push((s("v"), v));
            }
            f.push((s("d"), Value::Int(rank as i64)));
            (Value::Int(rank as i64), Value::Table(f))
        })
        .collect();
    Value::Table(items)
}

fn one_tier(tier: Tier, what: &str, errors: &mut Vec<String>) -> Option<usize> {
    match tier {
        Tier::One(n) => Some(n),
        Tier::All => {
            errors.push(format!(
                "{what} works on one tier (\"table/1\" .. \"table/4\"), not \"table/\""
            ));
            None
        }
    }
}

fn range(t: &Table, tier: Tier, arg: &Value, errors: &mut Vec<String>) -> Value {
    let Some(n) = one_tier(tier, "range", errors) else {
        return Value::Nil;
    };
    let args = list(arg);
    match args.first() {
        Some(Value::Str(id)) => {
            // From `delta` ranks above the id's (first) score.
            let id = String::from_utf8_lossy(id);
            let Some((score, seq)) = t.records.get(id.as_ref()).and_then(|r| r.scores[n].first()) else {
                return Value::Table(vec![]);
            };
            let rank = t.tiers[n].rank((score, *seq)).unwrap_or(1) as i64;
            let delta = int(args.get(1)).unwrap_or(0);
            let from = (rank - delta).max(1) as usize;
            entries(t, n, from, int(args.get(2)).unwrap_or(0))
        }
        Some(v) => match Score::from_value(v) {
            Ok(score) => match t.tiers[n].lower_bound(&score) {
                Some(from) => entries(t, n, from, int(args.get(1)).unwrap_or(0)),
                None => Value::Table(vec![]),
            },
            Err(e) => {
                errors.push(format!("range: {e}"));
                Value::Nil
            }
        },
        None => {
            errors.push("range expects {score, count} or {id, delta, count}".into());
            Value::Nil
        }
    }
}

fn for_each(t: &Table, tier: Tier, arg: &Value, errors: &mut Vec<String>) -> Value {
    let Some(n) = one_tier(tier, "forEach", errors) else {
        return Value::Nil;
    };
    let args = list(arg);
    match int(args.first()) {
        Some(from) => entries(t, n, from.max(1) as usize, int(args.get(1)).unwrap_or(0)),
        None if args.is_empty() => Value::Table(vec![]),
        None => {
            errors.push("forEach expects {rank, count}".into());
            Value::Nil
        }
    }
}

/// STAGE's `#N.` order: keys `#N.…` by N first, then the others as given.
fn command_order(kv: &[(Value, Value)]) -> Vec<usize> {
    let seq = |k: &Value| -> i64 {
        match k {
            Value::Str(b) => b
                .strip_prefix(b"#")
                .and_then(|r| {
                    let end = r.iter().position(|c| !c.is_ascii_digit())?;
                    std::str::from_utf8(&r[..end]).ok()?.parse().ok()
                })
                .unwrap_or(i64::MAX),
            _ => i64::MAX,
        }
    };
    let mut order: Vec<usize> = (0..kv.len()).collect();
    order.sort_by_key(|&i| seq(&kv[i].0));
    order
}

impl Index {
    /// Handles one message: the answer's values (result, and the errors when there were).
    fn answer(&mut self, msg: &Message) -> (Option<String>, Vec<Value>) {
        let mut errors = vec![];
        let arg = msg.values.first().cloned().unwrap_or(Value::Nil);
        let cb = match &msg.kind {
            Kind::Signal { cb, .. } => cb.as_deref(),
            _ => None,
        };
        let result;
        let reply_to;
        if msg.id.contains('?') {
            // `cmd?table=callback`: one command, answered only with `=callback`.
            result = self.run(&msg.id, &arg, &mut errors);
            reply_to = cb.map(str::to_string);
        } else if let Some(cmd) = cb.filter(|c| c.contains('?')) {
            // STAGE's older `callback=cmd?table`.
            result = self.run(cmd, &arg, &mut errors);
            reply_to = Some(msg.id.clone());
        } else {
            // `callback`, {cmd = arg, ...}: several commands, answered under their keys.
            match &arg {
                Value::Table(kv) => {
                    let mut out = vec![];
                    for i in command_order(kv) {
                        let (k, v) = &kv[i];
                        let Some(cmd) = text(k) else { continue };
                        let r = self.run(&cmd, v, &mut errors);
                        out.push((k.clone(), r));
                    }
                    result = Value::Table(out);
                }
                other => {
                    errors.push(format!(
                        "{}: \"{}\" expects a table of commands {{[\"cmd?table\"] = argument}}, not {} \
                         (one command is \"cmd?table=callback\")",
                        self.stage,
                        msg.id,
                        describe(other)
                    ));
                    result = Value::Nil;
                }
            }
            reply_to = Some(cb.unwrap_or(&msg.id).to_string());
        }
        let mut values = vec![result];
        if !errors.is_empty() {
            values.push(s(&errors.join("; ")));
        }
        (reply_to, values)
    }
}

impl Builtin for Index {
    fn handle(&mut self, msg: Message, out: &Out, _now: Instant) {
        if matches!(msg.kind, Kind::Reply | Kind::Failed(_)) {
            return;
        }
        let (reply_to, values) = self.answer(&msg);
        if let Some(Value::Str(e)) = values.get(1) {
            log::debug!(
                "{}: \"{}\": {}",
                self.stage,
                msg.shown_id(),
                String::from_utf8_lossy(e)
            );
        }
        let sent = if matches!(msg.kind, Kind::Request { .. }) {
            out.router.answer(&msg, &out.me, Ok(values))
        } else if let Some(id) = reply_to {
            out.send(&msg.from, id, values, Kind::Reply)
        } else {
            true
        };
        if !sent {
            log::debug!(
                "{}: the answer to \"{}\" could not be delivered",
                self.stage,
                msg.id
            );
        }
    }

    fn expire(&mut self, _out: &Out, _now: Instant) {}

    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{NoRemote, Router};

    fn t(kv: Vec<(Value, Value)>) -> Value {
        Value::Table(kv)
    }

    fn seq(items: Vec<Value>) -> Value {
        t(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (Value::Int(i as i64 + 1), v))
            .collect())
    }

    fn entry(score: i64, v: &str) -> Value {
        t(vec![(s("i"), Value::Int(score)), (s("v"), s(v))])
    }

    fn get<'v>(v: &'v Value, k: &Value) -> &'v Value {
        match v {
            Value::Table(kv) => kv.iter().find(|(x, _)| x == k).map_or(&Value::Nil, |(_, v)| v),
            _ => &Value::Nil,
        }
    }

    fn at<'v>(v: &'v Value, path: &[Value]) -> &'v Value {
        path.iter().fold(v, |v, k| get(v, k))
    }

    fn run(x: &mut Index, cmd: &str, arg: Value) -> Value {
        let mut errors = vec![];
        let r = x.run(cmd, &arg, &mut errors);
        assert!(errors.is_empty(), "{cmd}: {errors:?}");
        r
    }

    /// (rank, id, score) of a range/forEach result, in rank order.
    fn rows(v: &Value) -> Vec<(i64, String, Value)> {
        let Value::Table(kv) = v else { panic!("{v:?}") };
        let mut out: Vec<_> = kv
            .iter()
            .map(|(k, e)| {
                let Value::Int(rank) = k else { panic!("{k:?}") };
                assert_eq!(get(e, &s("d")), &Value::Int(*rank));
                (*rank, text(get(e, &s("k"))).unwrap(), get(e, &s("i")).clone())
            })
            .collect();
        out.sort_by_key(|r| r.0);
        out
    }

    #[test]
    fn commands_parse_like_stage() {
        assert_eq!(
            parse_command("s?index").unwrap(),
            (Op::Set, "index", Tier::One(0))
        );
        assert_eq!(
            parse_command("#2.get:a/b/3").unwrap(),
            (Op::Get, "a/b", Tier::One(2))
        );
        assert_eq!(
            parse_command("del?index/").unwrap(),
            (Op::Del, "index", Tier::All)
        );
        assert_eq!(
            parse_command("forEach?x/4").unwrap(),
            (Op::ForEach, "x", Tier::One(3))
        );
        assert!(parse_command("x?index")
            .unwrap_err()
            .contains("unknown index command \"x\""));
        assert!(parse_command("s?index/5").unwrap_err().contains("tier is 1 to 4"));
        assert!(parse_command("s?").unwrap_err().contains("no table name"));
        assert!(parse_command("callback")
            .unwrap_err()
            .contains("not an index command"));
    }

    #[test]
    fn set_get_range_foreach_del_as_stage_documents() {
        let mut x = Index::new("rank", MEMORY, KEY, VALUE);
        let set = t(vec![
            (s("KR0001"), entry(10, "TEST1")),
            (s("KR0002"), entry(100, "TEST2")),
            (s("KR0003"), entry(200, "TEST3")),
        ]);
        let r = run(&mut x, "set?index", set);
        // each id's rank at the time it was set: 1, then 1 (100 > 10), then 1 (200 > 100)
        assert_eq!(get(&r, &s("KR0001")), &Value::Int(1));
        assert_eq!(get(&r, &s("KR0003")), &Value::Int(1));
        // the same score again: unchanged (0); a tier the request does not set: -1
        let r = run(&mut x, "s?index", t(vec![(s("KR0001"), entry(10, "TEST1"))]));
        assert_eq!(get(&r, &s("KR0001")), &Value::Int(0));
        let r = run(&mut x, "s?index/2", t(vec![(s("KR0001"), entry(10, "X"))]));
        assert_eq!(get(&r, &s("KR0001")), &Value::Int(1), "tier 2 now has it");
        let r = run(
            &mut x,
            "s?index",
            t(vec![(s("KR0001"), t(vec![(s("v"), s("Y"))]))]),
        );
        assert_eq!(get(&r, &s("KR0001")), &Value::Int(-1));

        let g = run(
            &mut x,
            "get?index",
            seq(vec![s("KR0001"), s("KR0002"), s("NONE")]),
        );
        assert_eq!(at(&g, &[s("KR0001"), s("v")]), &s("Y"));
        let one = at(&g, &[s("KR0002"), s("I"), Value::Int(1)]);
        assert_eq!(
            (get(one, &s("i")), get(one, &s("d"))),
            (&Value::Int(100), &Value::Int(2))
        );
        assert_eq!(
            at(&g, &[s("KR0001"), s("I"), Value::Int(1), s("d")]),
            &Value::Int(3)
        );
        assert_eq!(get(&g, &s("NONE")), &t(vec![]), "an unknown id: an empty table");
        // every tier at once: plain scores per tier
        let g = run(&mut x, "g?index/", s("KR0001"));
        assert_eq!(
            at(&g, &[s("KR0001"), s("I"), Value::Int(1), Value::Int(1)]),
            &Value::Int(10)
        );
        assert_eq!(
            at(&g, &[s("KR0001"), s("I"), Value::Int(2), Value::Int(1)]),
            &Value::Int(10)
        );

        // range by score: from the first score <= 100, two entries, keyed by rank
        let r = run(&mut x, "range?index", seq(vec![Value::Int(100), Value::Int(2)]));
        assert_eq!(
            rows(&r),
            [
                (2, "KR0002".into(), Value::Int(100)),
                (3, "KR0001".into(), Value::Int(10))
            ]
        );
        assert_eq!(at(&r, &[Value::Int(2), s("v")]), &s("TEST2"));
        // by id: one rank above KR0001's, three entries (only two exist from there)
        let r = run(
            &mut x,
            "r?index",
            seq(vec![s("KR0001"), Value::Int(1), Value::Int(3)]),
        );
        assert_eq!(rows(&r).iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3]);
        // above the top: clamps at rank 1
        let r = run(
            &mut x,
            "r?index",
            seq(vec![s("KR0002"), Value::Int(5), Value::Int(2)]),
        );
        assert_eq!(rows(&r).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
        // below every score: nothing
        assert_eq!(
            run(&mut x, "r?index", seq(vec![Value::Int(1), Value::Int(5)])),
            t(vec![])
        );
        let f = run(&mut x, "forEach?index", seq(vec![Value::Int(1), Value::Int(100)]));
        assert_eq!(
            rows(&f).iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
            ["KR0003", "KR0002", "KR0001"]
        );
        // a count of 0: the entry at the rank alone
        let f = run(&mut x, "f?index", seq(vec![Value::Int(2)]));
        assert_eq!(rows(&f).len(), 1);
        assert_eq!(run(&mut x, "t?index", Value::Nil), Value::Int(3));
        assert_eq!(run(&mut x, "t?index/2", Value::Nil), Value::Int(1));

        // del of a tier keeps the id and its value; "index/" deletes the id
        let d = run(&mut x, "d?index", seq(vec![s("KR0002"), s("NONE")]));
        assert_eq!(
            (get(&d, &s("KR0002")), get(&d, &s("NONE"))),
            (&Value::Bool(true), &Value::Bool(false))
        );
        assert_eq!(run(&mut x, "t?index", Value::Nil), Value::Int(2));
        assert_eq!(
            at(&run(&mut x, "g?index", s("KR0002")), &[s("KR0002"), s("v")]),
            &s("TEST2")
        );
        let d = run(&mut x, "d?index/", s("KR0002"));
        assert_eq!(get(&d, &s("KR0002")), &Value::Bool(true));
        assert_eq!(run(&mut x, "t?index/", Value::Nil), Value::Int(2));
        assert_eq!(
            run(&mut x, "g?index", s("KR0002")),
            t(vec![(s("KR0002"), t(vec![]))])
        );
    }

    #[test]
    fn several_scores_strings_ties_and_errors() {
        let mut x = Index::new("rank", MEMORY, KEY, VALUE);
        // a tier may hold several scores of one id; "I" sets tiers directly
        let spec = t(vec![(
            s("I"),
            t(vec![
                (Value::Int(1), seq(vec![Value::Int(5), Value::Int(50)])),
                (s("#3"), s("b")),
            ]),
        )]);
        run(&mut x, "s?t", t(vec![(s("a"), spec)]));
        run(
            &mut x,
            "s?t",
            t(vec![
                (s("b"), entry(50, "")),
                (s("c"), t(vec![(s("i"), Value::Float(50.0))])),
            ]),
        );
        let f = run(&mut x, "f?t", seq(vec![Value::Int(1), Value::Int(10)]));
        // ties: the score set first ranks first
        assert_eq!(
            rows(&f)
                .iter()
                .map(|r| (r.1.as_str(), r.2.clone()))
                .collect::<Vec<_>>(),
            [
                ("a", Value::Int(50)),
                ("b", Value::Int(50)),
                ("c", Value::Int(50)),
                ("a", Value::Int(5))
            ]
        );
        // replacing a's scores keeps the one asked again (and its place among the ties)
        let r = run(
            &mut x,
            "s?t",
            t(vec![(
                s("a"),
                t(vec![(s("i"), seq(vec![Value::Int(50), Value::Int(1)]))]),
            )]),
        );
        assert_eq!(get(&r, &s("a")), &Value::Int(4));
        let f = run(&mut x, "f?t", seq(vec![Value::Int(1), Value::Int(10)]));
        assert_eq!(rows(&f)[0].1, "a");
        assert_eq!(rows(&f)[3].2, Value::Int(1));
        // strings rank before integers, in byte order
        run(&mut x, "s?t", t(vec![(s("z"), t(vec![(s("i"), s("aaa"))]))]));
        assert_eq!(rows(&run(&mut x, "f?t", seq(vec![Value::Int(1)])))[0].1, "z");
        // clear errors, per id, the rest still done
        let mut errors = vec![];
        let r = x.run(
            "s?t",
            &t(vec![
                (s("ok"), entry(1, "")),
                (s("bad"), t(vec![(s("i"), Value::Float(1.5))])),
            ]),
            &mut errors,
        );
        assert_eq!(get(&r, &s("ok")), &Value::Int(6));
        assert_eq!(get(&r, &s("bad")), &Value::Nil);
        assert!(
            errors[0].contains("set \"bad\": a score is an integer or a string, not the number 1.5"),
            "{errors:?}"
        );
        errors.clear();
        x.run("s?t/", &t(vec![(s("q"), entry(1, ""))]), &mut errors);
        assert!(errors[0].contains("\"i\" needs a tier"), "{errors:?}");
        errors.clear();
        assert_eq!(x.run("f?t/", &seq(vec![Value::Int(1)]), &mut errors), Value::Nil);
        assert!(errors[0].contains("forEach works on one tier"), "{errors:?}");
        errors.clear();
        x.run("s?t", &t(vec![(s(&"k".repeat(200)), entry(1, ""))]), &mut errors);
        assert!(
            errors[0].contains("longer than the stage's key limit 128"),
            "{errors:?}"
        );
    }

    #[test]
    fn memory_is_bounded_and_given_back() {
        let mut x = Index::new("rank", 20_000, KEY, VALUE);
        let mut errors = vec![];
        let mut stored = 0;
        for i in 0..1000 {
            let r = x.run(
                "s?m",
                &t(vec![(s(&format!("id{i}")), entry(i, "value"))]),
                &mut errors,
            );
            if get(&r, &s(&format!("id{i}"))) != &Value::Nil {
                stored += 1;
            }
        }
        assert!(stored > 20 && stored < 200, "{stored} stored");
        assert!(x.used() <= 20_000);
        assert_eq!(errors.len(), 1000 - stored);
        assert!(
            errors[0].contains("memory bound of 20000 bytes is reached"),
            "{}",
            errors[0]
        );
        // deleting ids makes room again
        let ids: Vec<Value> = (0..10).map(|i| s(&format!("id{i}"))).collect();
        x.run("d?m/", &seq(ids), &mut errors);
        errors.clear();
        let r = x.run("s?m", &t(vec![(s("again"), entry(1, "v"))]), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(get(&r, &s("again")), &Value::Int(stored as i64 - 10 + 1));
        // a value over the value limit is refused
        let mut y = Index::new("rank", MEMORY, KEY, 100);
        y.run(
            "s?m",
            &t(vec![(s("big"), entry(1, &"x".repeat(200)))]),
            &mut errors,
        );
        assert!(
            errors[0].contains("more than the stage's value limit 100"),
            "{errors:?}"
        );
        // settings
        let z = Index::from_settings("rank", &serde_json::json!({"memory": "1m", "key": 16})).unwrap();
        assert_eq!((z.memory, z.key, z.value), (1 << 20, 16, VALUE));
        let z = Index::from_settings("rank", &serde_json::json!(["/var/index/", 64, 512])).unwrap();
        assert_eq!(z.key, 64);
        let e = Index::from_settings("rank", &serde_json::json!({"memroy": 1}))
            .err()
            .unwrap();
        assert!(e.contains("unknown key \"memroy\""), "{e}");
        let e = Index::from_settings("rank", &serde_json::json!({"memory": "lots"}))
            .err()
            .unwrap();
        assert!(e.contains("memory: expected a size"), "{e}");
    }

    #[test]
    fn ranks_100k_scores_like_a_sort() {
        let mut x = Index::new("rank", 256 << 20, KEY, VALUE);
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut want: Vec<(i64, usize)> = vec![];
        for batch in 0..100 {
            let kv = (0..1000)
                .map(|j| {
                    let i = batch * 1000 + j;
                    let score = (next() % 50_000) as i64;
                    want.push((score, i));
                    (s(&format!("u{i}")), t(vec![(s("i"), Value::Int(score))]))
                })
                .collect();
            run(&mut x, "s?big", t(kv));
        }
        // some ids move: their new score ranks after the ties already there
        for i in (0..100_000).step_by(97) {
            let score = (next() % 50_000) as i64;
            run(&mut x, "s?big", t(vec![(s(&format!("u{i}")), entry(score, ""))]));
            want.retain(|w| w.1 != i);
            want.push((score, i));
        }
        // larger first; ties in the order set
        let mut sorted: Vec<(usize, (i64, usize))> = want.iter().copied().enumerate().collect();
        sorted.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
        let f = run(&mut x, "f?big", seq(vec![Value::Int(1), Value::Int(200_000)]));
        let got = rows(&f);
        assert_eq!(got.len(), 100_000);
        for (n, ((rank, id, score), (_, (ws, wi)))) in got.iter().zip(&sorted).enumerate() {
            assert_eq!(*rank, n as i64 + 1);
            assert_eq!(
                (id.as_str(), score),
                (format!("u{wi}").as_str(), &Value::Int(*ws)),
                "rank {rank}"
            );
        }
        // get's rank of every 1000th agrees
        for (n, (_, (_, wi))) in sorted.iter().enumerate().step_by(1000) {
            let id = format!("u{wi}");
            let g = run(&mut x, "g?big", s(&id));
            assert_eq!(
                at(&g, &[s(&id), s("I"), Value::Int(1), s("d")]),
                &Value::Int(n as i64 + 1)
            );
        }
        assert_eq!(run(&mut x, "t?big", Value::Nil), Value::Int(100_000));
    }

    #[test]
    fn messages_are_answered_as_stage_does() {
        let stages: Vec<String> = ["a", "rank"].iter().map(|s| s.to_string()).collect();
        let r = Arc::new(Router::new("n", &stages, 64, Box::new(NoRemote)));
        let mut inbox = r.take_inbox(0).unwrap();
        let out = Out {
            router: r.clone(),
            me: Arc::new(r.sender(1)),
        };
        let mut x = Index::new("rank", MEMORY, KEY, VALUE);
        let from = Arc::new(r.sender(0));
        let msg = |id: &str, cb: Option<&str>, v: Value| Message {
            id: id.into(),
            from: from.clone(),
            values: vec![v],
            kind: Kind::Signal {
                cb: cb.map(str::to_string),
                implicit: true,
            },
        };
        let now = Instant::now();
        // "rank:s?index" without a callback: done, not answered
        x.handle(msg("s?index", None, t(vec![(s("A"), entry(5, "a"))])), &out, now);
        assert!(inbox.try_recv().is_err());
        // "rank:g?index=got": answered as "got" with the result
        x.handle(msg("g?index", Some("got"), s("A")), &out, now);
        let m = inbox.try_recv().unwrap();
        assert_eq!((m.id.as_str(), &m.kind, m.values.len()), ("got", &Kind::Reply, 1));
        assert_eq!(at(&m.values[0], &[s("A"), s("v")]), &s("a"));
        assert_eq!(m.from.stage, "rank");
        // STAGE's older "rank:got=g?index"
        x.handle(msg("got", Some("g?index"), s("A")), &out, now);
        assert_eq!(inbox.try_recv().unwrap().id, "got");
        // "rank:callback", {commands}: one answer keyed like the request, #N. first
        let cmds = t(vec![
            (s("get:index"), seq(vec![s("A")])),
            (s("#1.set?index"), t(vec![(s("B"), entry(9, "b"))])),
            (s("forEach:index"), seq(vec![Value::Int(1), Value::Int(10)])),
        ]);
        x.handle(msg("callback", None, cmds), &out, now);
        let m = inbox.try_recv().unwrap();
        assert_eq!(m.id, "callback");
        let Value::Table(kv) = &m.values[0] else { panic!() };
        assert_eq!(kv[0].0, s("#1.set?index"), "#1. runs first");
        assert_eq!(
            rows(get(&m.values[0], &s("forEach:index"))).len(),
            2,
            "after the set"
        );
        // a failure: the answer carries the reason as its second value
        x.handle(msg("x?index", Some("got"), Value::Nil), &out, now);
        let m = inbox.try_recv().unwrap();
        assert_eq!(m.values[0], Value::Nil);
        assert!(
            matches!(&m.values[1], Value::Str(e) if String::from_utf8_lossy(e).contains("unknown index command"))
        );
        // a request is answered to its pending id
        let req = Message {
            id: "t?index".into(),
            from: from.clone(),
            values: vec![],
            kind: Kind::Request {
                cb: "~request.1".into(),
                direct: crate::router::Direct::none(),
            },
        };
        x.handle(req, &out, now);
        let m = inbox.try_recv().unwrap();
        assert_eq!(
            (m.id.as_str(), &m.values[..]),
            ("~request.1", &[Value::Int(2)][..])
        );
    }
}
