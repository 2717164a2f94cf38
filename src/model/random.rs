//! Random Llama checkpoints for tests and benchmarks: a config and every tensor, held in memory or
//! written as a Hugging Face directory, with no download.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::lora::Proj;
use crate::model::weights::{write_safetensors, HostTensor, SaveDtype, WeightSource};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

/// Tensors held in memory, addressed by their Hugging Face names.
pub struct MemorySource {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl WeightSource for MemorySource {
    fn describe(&self) -> String {
        "in-memory weights".into()
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        self.tensors.get(name).cloned().ok_or_else(|| Error::tensor(name, "not found in in-memory weights"))
    }
}

/// A small Llama config with GQA and sizes that are not multiples of anything in particular.
pub fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 37,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Every tensor of `cfg` drawn at random (std 0.02-ish projections, norms near 1), from `seed`.
pub fn random_source(cfg: &ModelConfig, seed: u64) -> MemorySource {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = BTreeMap::new();
    let mat = |rng: &mut rand::rngs::StdRng, rows: usize, cols: usize, std: f32| HostTensor {
        shape: vec![rows, cols],
        data: (0..rows * cols).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * std * 1.732).collect(),
    };
    let norm = |rng: &mut rand::rngs::StdRng, n: usize| HostTensor {
        shape: vec![n],
        data: (0..n).map(|_| 1.0 + (rng.gen::<f32>() - 0.5) * 0.2).collect(),
    };
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    t.insert("model.embed_tokens.weight".to_string(), mat(&mut rng, v, h, 1.0));
    let proj_std = (1.0 / h as f32).sqrt();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.insert(format!("{p}.input_layernorm.weight"), norm(&mut rng, h));
        t.insert(format!("{p}.post_attention_layernorm.weight"), norm(&mut rng, h));
        for pr in Proj::ALL {
            let (o, i) = pr.shape(cfg);
            t.insert(format!("{p}.{}.weight", pr.hf_path()), mat(&mut rng, o, i, proj_std));
        }
    }
    t.insert("model.norm.weight".to_string(), norm(&mut rng, h));
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".to_string(), mat(&mut rng, v, h, proj_std));
    }
    MemorySource { config: cfg.clone(), tensors: t }
}

/// A byte-level BPE `tokenizer.json` with no merges: ids 0, 1, 2 are `<s>`, `</s>`, `<pad>`, then the
/// 256 GPT-2 byte symbols (vocab 259). Enough to drive random models through the real text paths.
pub fn byte_tokenizer_json() -> serde_json::Value {
    use serde_json::json;
    // GPT-2's byte → printable character table.
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
    let mut vocab = json!({"<s>": 0, "</s>": 1, "<pad>": 2});
    for (b, c) in bs.iter().zip(cs) {
        vocab[char::from_u32(c).expect("valid code point").to_string()] = json!(3 + b);
    }
    let special = |id: u32, t: &str| {
        json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>"), special(2, "<pad>")],
        "normalizer": null,
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

/// Writes `src` as a Hugging Face model directory (`config.json` + `model.safetensors`).
pub fn write_hf_dir(src: &MemorySource, dir: &Path, dtype: SaveDtype) -> Result<()> {
    let tensors: Vec<(String, HostTensor)> = src.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    write_checkpoint(&src.config, &tensors, dir, dtype)
}

/// `config.json` (with `torch_dtype`) and `model.safetensors` of `tensors` in `dir`.
pub fn write_checkpoint(
    config: &ModelConfig,
    tensors: &[(String, HostTensor)],
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = config.to_json();
    cfg["torch_dtype"] = serde_json::json!(dtype.torch_name());
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    write_safetensors(&dir.join("model.safetensors"), tensors, dtype, None)
}
