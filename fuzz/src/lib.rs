//! The bodies of the fuzz targets, shared by cargo-fuzz (`fuzz/fuzz_targets/*.rs`, nightly)
//! and by the stable smoke runner `tests/fuzz.rs`, which feeds them generated and mutated
//! inputs for a bounded time. Each body asserts invariants; a panic is a finding.

use stage::net::framing::{next_frame, Framing};

/// The frame cutter: the first byte picks the framing and the IN limit, the rest is the
/// stream. Every frame found lies inside the buffer, consumes at least one byte and never
/// exceeds IN; cutting goes on until the cutter asks for more bytes or refuses the stream.
pub fn frame_cutter(data: &[u8]) {
    let Some((&head, mut buf)) = data.split_first() else {
        return;
    };
    let framing = match head % 3 {
        0 => Framing::Bson,
        1 => Framing::Packet,
        _ => Framing::Text,
    };
    let limit = [5usize, 16, 64, 1024, 65536][(head as usize / 3) % 5];
    loop {
        match next_frame(framing, buf, limit) {
            Ok(Some(f)) => {
                assert!(f.start <= f.end && f.end <= buf.len(), "{f:?} in {}", buf.len());
                assert!(f.consumed >= 1 && f.consumed <= buf.len(), "{f:?}");
                assert!(f.end - f.start <= limit, "{f:?} over {limit}");
                buf = &buf[f.consumed..];
            }
            Ok(None) => return,
            Err(_) => return,
        }
    }
}

thread_local! {
    static LUA: mlua::Lua = {
        let lua = mlua::Lua::new();
        let _ = lua.set_memory_limit(64 << 20);
        lua
    };
}

/// BSON → Lua: decoding arbitrary bytes never panics or crashes; a document that decodes
/// encodes again, and that encoding decodes to an equal encoding (a fixed point).
pub fn bson_decode(data: &[u8]) {
    LUA.with(|lua| {
        if let Ok(v) = stage::lua::bson::decode(lua, data) {
            if let Ok(again) = stage::lua::bson::encode_vec(lua, &v) {
                let v2 = stage::lua::bson::decode(lua, &again).expect("a re-encoded document decodes");
                let again2 = stage::lua::bson::encode_vec(lua, &v2).expect("and encodes");
                assert_eq!(again.len(), again2.len());
            }
        }
        let _ = lua.gc_collect();
    })
}
