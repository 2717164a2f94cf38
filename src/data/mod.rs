//! Training data: read rows (JSONL, JSON, parquet), render them as text with the right template,
//! tokenize with labels (optionally on responses only), then batch them (padding, group-by-length,
//! packing) into [`crate::model::llama::Batch`]es.

pub mod batching;
pub mod format;
pub mod records;
pub mod tokenize;

pub use batching::{BatchPlan, Batching};
pub use format::{RowFormat, Sample};
pub use records::{read_records, Record};
pub use tokenize::{tokenize_dataset, TokenizedDataset, TokenizedSample};
