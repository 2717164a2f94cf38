//! Shared fixtures: a tiny random Llama written as a Hugging Face directory with a byte-level
//! tokenizer, so workflow tests run the real file paths in seconds.
#![allow(dead_code)]

use llamatune::model::random::{random_source, tiny_config, write_hf_dir};
use llamatune::model::weights::SaveDtype;
use serde_json::json;
use std::path::Path;

pub const VOCAB: usize = 259; // 3 specials + 256 bytes
pub const BOS: u32 = 0;
pub const EOS: u32 = 1;
pub const PAD: u32 = 2;

/// The byte-level tokenizer of [`llamatune::model::random::byte_tokenizer_json`].
pub fn tokenizer_json() -> serde_json::Value {
    llamatune::model::random::byte_tokenizer_json()
}

/// Writes a tiny random model directory (config, weights, tokenizer with the Llama-2 chat template).
pub fn tiny_model_dir(dir: &Path, tied: bool) {
    let mut cfg = tiny_config(tied);
    cfg.vocab_size = VOCAB;
    cfg.bos_token_id = Some(BOS);
    cfg.eos_token_ids = vec![EOS];
    cfg.max_position_embeddings = 512;
    write_hf_dir(&random_source(&cfg, 5), dir, SaveDtype::F32).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": llamatune::tokenizer::LLAMA2_TEMPLATE})
            .to_string(),
    )
    .unwrap();
}

/// A JSONL dataset of Llama-2-template `text` rows.
pub fn text_dataset(path: &Path, n: usize) {
    let mut s = String::new();
    for i in 0..n {
        let q = format!("question {i}: what is {} plus {}?", i % 7, i % 5);
        let a = format!("it is {}", i % 7 + i % 5);
        s.push_str(&json!({"text": format!("<s>[INST] {q} [/INST] {a} </s>")}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}
