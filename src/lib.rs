//! llamatune: QLoRA fine-tuning of Llama-family models.
//!
//! The pieces, in the order data flows through them: [`model::weights`] / [`model::gguf`] read a
//! checkpoint; [`quant`] stores frozen projections in bitsandbytes' NF4/FP4 layout;
//! [`model::llama`] runs the graph on a [`backend::Backend`], recording a [`tape::Tape`];
//! [`tape::Tape::backward`] produces gradients for the [`model::lora`] adapters only;
//! [`optim`] updates them; [`generate`] decodes with a KV cache.

pub mod assets;
pub mod backend;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod io;
pub mod load;
pub mod model;
pub mod optim;
pub mod progress;
pub mod quant;
pub mod tape;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
