//! cargo-fuzz target: BSON bytes decoded straight into Lua values (see fuzz/src/lib.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stage_fuzz::bson_decode(data));
