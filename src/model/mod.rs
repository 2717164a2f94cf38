//! The model: weights (safetensors, GGUF), the Llama graph, LoRA adapters and RoPE tables.

pub mod gguf;
pub mod llama;
pub mod lora;
pub mod merge;
pub mod random;
pub mod rope;
pub mod weights;
