//! Quantized checkpoints, each weight presented under its Hugging Face name as the f32 values it
//! stands for and built from the rows read: FP8 weights times their scales ([`fp8`]), and
//! integers packed into words beside their scales and zero points ([`packed`]: GPTQ, AWQ,
//! compressed-tensors).

pub mod fp8;
pub mod packed;
mod packed_layouts;
