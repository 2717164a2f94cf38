//! Shared fixtures: a tiny random Llama written as a Hugging Face directory with a byte-level
//! tokenizer, so workflow tests run the real file paths in seconds.
#![allow(dead_code)]

use llamatune::model::random::{random_source, tiny_config, write_hf_dir};
use llamatune::model::weights::SaveDtype;
use serde_json::json;
use std::path::Path;

/// GPT-2's byte → printable character table.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

pub const VOCAB: usize = 259; // 3 specials + 256 bytes
pub const BOS: u32 = 0;
pub const EOS: u32 = 1;
pub const PAD: u32 = 2;

/// A byte-level BPE `tokenizer.json` (no merges) whose ids 0..3 are `<s>`, `</s>`, `<pad>`.
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<s>", "</s>", "<pad>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(3 + b));
    }
    let added: Vec<_> = ["<s>", "</s>", "<pad>"]
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
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
