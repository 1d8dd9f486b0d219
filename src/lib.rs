//! loraxfer: transfer a PEFT LoRA adapter from one base model to another without training, by
//! projecting it through the singular subspaces of the two models' weights (LoRA-X, Cross-LoRA
//! and relatives). docs/METHOD.md holds the math and every choice the papers leave open.
//!
//! The pipeline: [`plan`] (pure: pairs modules, maps layers) → [`transfer`] (loads weights one
//! module at a time, runs a [`backend::Backend`], writes atomically) → a PEFT adapter and a report.

pub mod arch;
pub mod args;
pub mod backend;
pub mod error;
pub mod fuzzing;
pub mod io;

/// Kernel images compiled by build.rs from `kernels/*.cu` (empty when built without nvcc).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub mod linalg;
pub mod map;
pub mod modes;
pub mod plan;
pub mod progress;
pub mod synth;
pub mod timing;
pub mod transfer;

pub use error::{Error, Result};
