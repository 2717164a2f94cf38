//! Files the trainer reads and writes: PEFT adapters, TensorBoard event files, training
//! checkpoints, and merged Hugging Face model directories.

pub mod checkpoint;
pub mod export;
pub mod peft;
pub mod tensorboard;
