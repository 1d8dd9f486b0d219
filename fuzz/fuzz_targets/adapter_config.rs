//! Fuzz target: see `loraxfer::fuzzing::adapter_config` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::adapter_config(data));
