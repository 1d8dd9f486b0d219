//! Fuzz target: see `loraxfer::fuzzing::checkpoint_index` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::checkpoint_index(data));
