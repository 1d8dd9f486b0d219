//! Fuzz target: see `loraxfer::fuzzing::arch_table` for what it checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| loraxfer::fuzzing::arch_table(data));
