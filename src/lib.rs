//! llamatune: QLoRA fine-tuning of Llama-family models, from Rust, with no Python.
//!
//! # Embedding it
//! ```no_run
//! use llamatune::backend::cpu::Cpu;
//! use llamatune::train::{train_from_config, Event, TrainConfig};
//! use std::sync::atomic::AtomicBool;
//!
//! let be = Cpu::<f32>::new();
//! let cfg = TrainConfig {
//!     model: "smollm2-135m-instruct".into(),
//!     dataset: "data.jsonl".into(),
//!     output_dir: "out".into(),
//!     max_steps: 10,
//!     ..TrainConfig::default()
//! };
//! let outcome = train_from_config(&be, cfg, &AtomicBool::new(false), &mut |e| {
//!     if let Event::Step { step, loss, .. } = e {
//!         println!("step {step}: loss {loss:.3}");
//!     }
//! })?;
//! println!("adapter in {:?}", outcome.adapter_dir);
//! # Ok::<(), llamatune::Error>(())
//! ```
//! Generation is [`generate::generate`] over a loaded [`model::llama::Llama`] (see [`load`]), and
//! merging is [`model::merge::merge`] followed by [`io::export::write_model_dir`];
//! `examples/embed.rs` runs all of it.
//!
//! The pieces, in the order data flows through them: [`model::weights`] / [`model::gguf`] read a
//! checkpoint; [`quant`] stores frozen projections in bitsandbytes' NF4/FP4 layout;
//! [`model::llama`] runs the graph on a [`backend::Backend`], recording a [`tape::Tape`];
//! [`tape::Tape::backward`] produces gradients for the [`model::lora`] adapters only;
//! [`optim`] updates them; [`generate`] decodes with a KV cache.

pub mod assets;
pub mod backend;
pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod io;
pub mod llama2_tokenizer;
pub mod load;
pub mod model;
pub mod optim;
pub mod progress;
pub mod quant;
pub mod tape;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
