//! Reading and writing the files the engine works on: safetensors (mapped), Hugging Face
//! checkpoints (single file or sharded), GGUF models (dequantized as they are read) and PEFT
//! adapters; atomic output directories; hub names resolved in the local Hugging Face cache.

pub mod adapter;
pub mod checkpoint;
pub mod gguf;
pub mod hub;
pub mod output;
pub mod safetensors;
