//! Fuzz target: see `loraxfer::fuzzing::tokenizer` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::tokenizer(data));
