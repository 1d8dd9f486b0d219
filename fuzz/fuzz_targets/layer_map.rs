//! Fuzz target: see `loraxfer::fuzzing::layer_map` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::layer_map(data));
