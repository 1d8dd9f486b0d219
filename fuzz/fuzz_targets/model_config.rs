//! Fuzz target: see `loraxfer::fuzzing::model_config` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::model_config(data));
