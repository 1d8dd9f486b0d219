//! Fuzz target: see `loraxfer::fuzzing::gguf_header` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::gguf_header(data));
