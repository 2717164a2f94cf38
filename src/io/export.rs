//! Writing a Hugging Face model directory (what `merge` produces): sharded safetensors with an
//! index, `config.json`, `generation_config.json` and the tokenizer files, loadable by
//! `AutoModelForCausalLM.from_pretrained`.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::model::lora::Proj;
use crate::model::weights::{write_atomic, write_safetensors, HostTensor, SaveDtype};
use crate::tokenizer::Tokenizer;
use serde_json::json;
use std::path::Path;

/// Every tensor of `model` under its Hugging Face name, as dense f32 (dequantized if 4-bit).
pub fn hf_tensors<B: Backend>(be: &B, model: &Llama<B>) -> Vec<(String, HostTensor)> {
    let mat = |w: &B::Weight| {
        let h = be.weight_to_host(w);
        let (r, c) = h.shape();
        HostTensor { shape: vec![r, c], data: h.to_f32() }
    };
    let vec1 = |b: &B::Buf| {
        let d = be.download(b);
        HostTensor { shape: vec![d.len()], data: d }
    };
    let mut out = vec![("model.embed_tokens.weight".to_string(), mat(&model.embed))];
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec1(&layer.attn_norm)));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec1(&layer.mlp_norm)));
        for pr in Proj::ALL {
            out.push((format!("{p}.{}.weight", pr.hf_path()), mat(&layer.proj[pr as usize])));
        }
    }
    out.push(("model.norm.weight".to_string(), vec1(&model.norm)));
    if let Some(h) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), mat(h)));
    }
    out
}

/// Writes `model` (and the tokenizer, if given) as a Hugging Face directory, splitting weights into
/// shards of at most `max_shard_bytes`.
pub fn write_model_dir<B: Backend>(
    be: &B,
    model: &Llama<B>,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let elem = if dtype == SaveDtype::F32 { 4 } else { 2 };
    let tensors = hf_tensors(be, model);
    let total: usize = tensors.iter().map(|(_, t)| t.data.len() * elem).sum();
    let mut shards: Vec<Vec<(String, HostTensor)>> = vec![vec![]];
    let mut cur = 0usize;
    for (n, t) in tensors {
        let sz = t.data.len() * elem;
        if cur > 0 && cur + sz > max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        cur += sz;
        shards.last_mut().expect("one shard").push((n, t));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    if shards.len() == 1 {
        write_safetensors(&dir.join("model.safetensors"), &shards[0], dtype, Some(meta))?;
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write_safetensors(&dir.join(&file), shard, dtype, Some(meta.clone()))?;
            for (name, _) in shard {
                weight_map.insert(name.clone(), json!(file));
            }
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).expect("json").as_bytes(),
        )?;
    }
    let mut cfg = model.cfg.to_json();
    cfg["torch_dtype"] = json!(dtype.torch_name());
    write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&cfg).expect("json").as_bytes())?;
    let mut gen = json!({"_from_model_config": true});
    if let Some(b) = model.cfg.bos_token_id {
        gen["bos_token_id"] = json!(b);
    }
    match model.cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => gen["eos_token_id"] = json!(one),
        many => gen["eos_token_id"] = json!(many),
    }
    write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(&gen).expect("json").as_bytes())?;
    if let Some(t) = tokenizer {
        write_tokenizer(t, dir, model.cfg.max_position_embeddings)?;
    }
    Ok(())
}

/// `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.
pub fn write_tokenizer(t: &Tokenizer, dir: &Path, model_max_length: usize) -> Result<()> {
    write_atomic(&dir.join("tokenizer.json"), serde_json::to_string(&t.json).expect("json").as_bytes())?;
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false,
    });
    let mut special = json!({});
    for (key, v) in [("bos_token", &t.bos_token), ("eos_token", &t.eos_token), ("pad_token", &t.pad_token)] {
        if let Some(v) = v {
            cfg[key] = json!(v);
            special[key] = json!(v);
        }
    }
    if let Some(ct) = &t.chat_template {
        cfg["chat_template"] = json!(ct);
    }
    write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg).expect("json").as_bytes())?;
    write_atomic(&dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&special).expect("json").as_bytes())
}
