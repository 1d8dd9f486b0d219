//! Reading and writing the files the engine works on: safetensors (mapped), Hugging Face
//! checkpoints (single file or sharded) and PEFT adapters; atomic output directories.

pub mod adapter;
pub mod checkpoint;
pub mod output;
pub mod safetensors;
