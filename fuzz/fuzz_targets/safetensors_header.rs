//! Fuzz target: see `loraxfer::fuzzing::safetensors_header` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::safetensors_header(data));
