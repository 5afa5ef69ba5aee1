//! cargo-fuzz target: the broker's frame cutter over arbitrary bytes (see fuzz/src/lib.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stage_fuzz::frame_cutter(data));
