//! The fuzz targets of fuzz/ (cargo-fuzz, nightly) run on the stable toolchain as tests: a
//! small generator feeds each target random bytes and mutations of valid inputs. Bounded by
//! `STAGE_FUZZ_SECONDS` per target (`scripts/fuzz NAME SECONDS` without nightly), else by a
//! fixed number of inputs, so the suite stays quick.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::time::{Duration, Instant};

/// xorshift64*: deterministic, so a failure reproduces with the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Flips, overwrites, truncates, duplicates or rewrites a length field of `seed`.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            let n = 1 + rng.below(16);
            v = rng.bytes(n);
        }
        let at = rng.below(v.len());
        match rng.below(6) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = rng.next() as u8,
            2 => v.truncate(at),
            3 => {
                let tail = v[at..].to_vec();
                v.extend_from_slice(&tail);
            }
            4 if v.len() >= at + 4 => {
                let n = [
                    0i32,
                    -1,
                    4,
                    5,
                    i32::MAX,
                    i32::MIN,
                    (v.len() - at) as i32,
                    rng.next() as i32,
                ][rng.below(8)];
                v[at..at + 4].copy_from_slice(&n.to_le_bytes());
            }
            _ => v.insert(at, rng.next() as u8),
        }
    }
    v
}

fn budget() -> (Duration, usize) {
    match std::env::var("STAGE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(s) => (Duration::from_secs(s), usize::MAX),
        None => (Duration::from_secs(60), 3000),
    }
}

fn run(name: &str, seeds: &[Vec<u8>], target: fn(&[u8])) {
    let (time, count) = budget();
    let mut rng = Rng(0x5EED_0000_0000_0001 ^ name.len() as u64);
    let started = Instant::now();
    let mut n = 0;
    while n < count && started.elapsed() < time {
        let input = match rng.below(3) {
            0 => {
                let n = rng.below(64);
                rng.bytes(n)
            }
            _ => {
                let i = rng.below(seeds.len());
                mutate(&mut rng, &seeds[i])
            }
        };
        target(&input);
        n += 1;
    }
    eprintln!("{name}: {n} inputs in {:.1} s", started.elapsed().as_secs_f64());
}

fn bson_seeds() -> Vec<Vec<u8>> {
    let lua = mlua::Lua::new();
    [
        "return {}",
        "return {a = 1, b = 'x', c = true, d = 1.5}",
        "return {list = {1, 2, 3}, nested = {deep = {deeper = {x = 'y'}}}}",
        "return {s = string.rep('z', 300), n = -7, f = 0.25, t = {}}",
    ]
    .iter()
    .map(|code| {
        let v: mlua::Value = lua.load(*code).eval().unwrap();
        stage::lua::bson::encode_vec(&lua, &v).unwrap()
    })
    .collect()
}

#[test]
fn frame_cutter() {
    let mut seeds = vec![];
    for head in 0u8..15 {
        let mut s = vec![head];
        for doc in bson_seeds() {
            s.extend_from_slice(&doc);
        }
        s.extend_from_slice(b"line one\nline two\r\n");
        seeds.push(s);
    }
    run("frame_cutter", &seeds, targets::frame_cutter);
}

#[test]
fn bson_decode() {
    run("bson_decode", &bson_seeds(), targets::bson_decode);
}
