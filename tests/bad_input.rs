//! Malformed files give errors that name the file (or tensor) and the problem — never a panic —
//! and a well-formed GGUF written here imports to the same model as its safetensors twin.

use llamatune::backend::cpu::Cpu;
use llamatune::config::ModelConfig;
use llamatune::model::gguf::{GgufFile, GgufSource};
use llamatune::model::llama::{full_logits, Batch, Llama};
use llamatune::model::random::{random_source, tiny_config, write_hf_dir};
use llamatune::model::weights::{HostTensor, SafetensorsSource, SaveDtype, WeightSource};
use std::path::Path;

type B = Cpu<f32>;
const BE: B = Cpu::new();

fn err_of<T>(r: llamatune::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn hf_dir(dir: &Path) {
    write_hf_dir(&random_source(&tiny_config(false), 1), dir, SaveDtype::F32).unwrap();
}

#[test]
fn truncated_safetensors_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    hf_dir(d.path());
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_of(SafetensorsSource::open(d.path()));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Cut inside the 8-byte length prefix.
    std::fs::write(&f, &bytes[..5]).unwrap();
    let e = err_of(SafetensorsSource::open(d.path()));
    assert!(e.contains("model.safetensors") && e.contains("header"), "{e}");
}

#[test]
fn header_offsets_past_the_end_are_reported() {
    let d = tempfile::tempdir().unwrap();
    hf_dir(d.path());
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[24],"data_offsets":[0,4096]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 96]);
    std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
    let e = err_of(SafetensorsSource::open(d.path()));
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("truncated") || e.contains("offsets") || e.contains("disagree"), "{e}");
}

#[test]
fn shape_disagreeing_with_config_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let mut src = random_source(&tiny_config(false), 1);
    src.tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        HostTensor { shape: vec![41, 24], data: vec![0.01; 41 * 24] },
    );
    write_hf_dir(&src, d.path(), SaveDtype::F32).unwrap();
    let st = SafetensorsSource::open(d.path()).unwrap();
    let e = err_of(Llama::<B>::load(&BE, &st, None));
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("[41, 24]") && e.contains("[40, 24]"), "{e}");
    // A missing tensor is named too.
    let mut src = random_source(&tiny_config(false), 1);
    src.tensors.remove("model.norm.weight");
    let d2 = tempfile::tempdir().unwrap();
    write_hf_dir(&src, d2.path(), SaveDtype::F32).unwrap();
    let e = err_of(Llama::<B>::load(&BE, &SafetensorsSource::open(d2.path()).unwrap(), None));
    assert!(e.contains("model.norm.weight") && e.contains("not found"), "{e}");
}

#[test]
fn config_problems_name_the_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    hf_dir(d.path());
    let cfg_path = d.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = err_of(SafetensorsSource::open(d.path()));
    assert!(e.contains("config.json") && e.contains("num_hidden_layers"), "{e}");
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let e = err_of(ModelConfig::from_file(&cfg_path));
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    let e = err_of(SafetensorsSource::open(&d.path().join("nowhere")));
    assert!(e.contains("nowhere"), "{e}");
}

// ---- a minimal GGUF writer (v3), enough for a Llama model ----------------------------------------

enum Meta {
    U32(u32),
    F32(f32),
    Str(&'static str),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, x: &str) {
        out.extend((x.len() as u64).to_le_bytes());
        out.extend(x.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(x) => {
                out.extend(8u32.to_le_bytes());
                s(&mut out, x);
            }
            Meta::Strs(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|x| s(&mut out, x));
            }
            Meta::F32s(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(6u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Meta::I32s(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    let mut offset = 0u64;
    for (name, shape, data) in tensors {
        s(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes()); // ggml order: fastest first
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend(offset.to_le_bytes());
        offset += (data.len() * 4).div_ceil(32) as u64 * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (_, _, data) in tensors {
        let start = out.len();
        data.iter().for_each(|x| out.extend(x.to_le_bytes()));
        while (out.len() - start) % 32 != 0 {
            out.push(0);
        }
    }
    out
}

/// llama.cpp's q/k row permutation (`reshape(n, 2, rows/n/2, cols).swapaxes(1, 2)`).
fn permute(t: &HostTensor, n: usize) -> Vec<f32> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let half = rows / n / 2;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n {
        for i in 0..2 {
            for j in 0..half {
                let src = h * rows / n + i * half + j;
                let dst = h * rows / n + 2 * j + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn tiny_gguf() -> (Vec<u8>, llamatune::model::random::MemorySource) {
    tiny_gguf_with(|_| {})
}

/// [`tiny_gguf`] with its tensors `(ggml name, shape, values)` edited by `edit` before writing.
fn tiny_gguf_with(
    edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> (Vec<u8>, llamatune::model::random::MemorySource) {
    let cfg = tiny_config(false);
    let src = random_source(&cfg, 9);
    let mut tensors = Vec::new();
    for (hf, t) in &src.tensors {
        let name = hf
            .replace("model.embed_tokens.weight", "token_embd.weight")
            .replace("model.norm.weight", "output_norm.weight")
            .replace("lm_head.weight", "output.weight")
            .replace("model.layers.", "blk.")
            .replace(".input_layernorm.", ".attn_norm.")
            .replace(".post_attention_layernorm.", ".ffn_norm.")
            .replace(".self_attn.q_proj.", ".attn_q.")
            .replace(".self_attn.k_proj.", ".attn_k.")
            .replace(".self_attn.v_proj.", ".attn_v.")
            .replace(".self_attn.o_proj.", ".attn_output.")
            .replace(".mlp.gate_proj.", ".ffn_gate.")
            .replace(".mlp.up_proj.", ".ffn_up.")
            .replace(".mlp.down_proj.", ".ffn_down.");
        let data = if hf.contains("q_proj") {
            permute(t, cfg.num_attention_heads)
        } else if hf.contains("k_proj") {
            permute(t, cfg.num_key_value_heads)
        } else {
            t.data.clone()
        };
        tensors.push((name, t.shape.clone(), data));
    }
    // A SentencePiece-style vocabulary: <unk>, <s>, </s>, byte tokens would follow in a real model.
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    for w in ["▁", "a", "b", "▁a", "ab", "▁ab", "▁b"] {
        vocab.push(w.into());
    }
    while vocab.len() < cfg.vocab_size {
        vocab.push(format!("tok{}", vocab.len()));
    }
    let mut types = vec![1i32; vocab.len()];
    types[0] = 2;
    types[1] = 3;
    types[2] = 3;
    let scores: Vec<f32> = (0..vocab.len()).map(|i| -(i as f32)).collect();
    let meta = vec![
        ("general.architecture", Meta::Str("llama")),
        ("llama.block_count", Meta::U32(cfg.num_hidden_layers as u32)),
        ("llama.embedding_length", Meta::U32(cfg.hidden_size as u32)),
        ("llama.feed_forward_length", Meta::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", Meta::U32(cfg.num_attention_heads as u32)),
        ("llama.attention.head_count_kv", Meta::U32(cfg.num_key_value_heads as u32)),
        ("llama.rope.dimension_count", Meta::U32(cfg.head_dim as u32)),
        ("llama.rope.freq_base", Meta::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(cfg.rms_norm_eps as f32)),
        ("llama.context_length", Meta::U32(cfg.max_position_embeddings as u32)),
        ("tokenizer.ggml.model", Meta::Str("llama")),
        ("tokenizer.ggml.tokens", Meta::Strs(vocab)),
        ("tokenizer.ggml.scores", Meta::F32s(scores)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
    ];
    edit(&mut tensors);
    (gguf_bytes(&meta, &tensors), src)
}

#[test]
fn gguf_import_equals_safetensors_and_builds_a_spm_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let (bytes, src) = tiny_gguf();
    let path = d.path().join("tiny.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let g = GgufSource::open(&path).unwrap();
    let mut want_cfg = src.config.clone();
    want_cfg.eos_token_ids = vec![2];
    assert_eq!(g.config(), &want_cfg);
    let batch = Batch::causal_lm(&[vec![3, 1, 4, 1, 5, 9, 2, 6]]);
    let a = full_logits(&BE, &Llama::<B>::load(&BE, &g, None).unwrap(), None, &batch);
    let b = full_logits(&BE, &Llama::<B>::load(&BE, &src, None).unwrap(), None, &batch);
    assert_eq!(a, b, "GGUF import (permutation undone) equals the Hugging Face layout");
    let tok = llamatune::tokenizer::Tokenizer::from_json(g.tokenizer_json().unwrap()).unwrap();
    assert_eq!(tok.encode("ab b", true).unwrap(), vec![1, 8, 9], "<s> ▁ab ▁b");
}

#[test]
fn malformed_gguf_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let (bytes, _) = tiny_gguf();
    let path = d.path().join("bad.gguf");
    let mut bad = bytes.clone();
    bad[0..4].copy_from_slice(b"GGUX");
    std::fs::write(&path, &bad).unwrap();
    let e = err_of(GgufFile::open(&path));
    assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");
    std::fs::write(&path, &bytes[..bytes.len() - 64]).unwrap();
    let e = err_of(GgufFile::open(&path));
    assert!(e.contains("bad.gguf") && e.contains("runs past the end"), "{e}");
    std::fs::write(&path, &bytes[..200]).unwrap();
    let e = err_of(GgufFile::open(&path));
    assert!(e.contains("bad.gguf") && e.contains("truncated"), "{e}");
    std::fs::write(&path, b"").unwrap();
    let e = err_of(GgufFile::open(&path));
    assert!(e.contains("bad.gguf"), "{e}");
    let mut v4 = bytes.clone();
    v4[4..8].copy_from_slice(&4u32.to_le_bytes());
    std::fs::write(&path, &v4).unwrap();
    assert!(err_of(GgufFile::open(&path)).contains("version 4"));
}

#[test]
fn gguf_sizes_that_overflow_or_do_not_fit_the_heads_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("sizes.gguf");
    // Dimensions whose product wraps around to a small number must not pass for a small tensor.
    let huge = vec![("token_embd.weight".to_string(), vec![1usize << 62, 8], vec![0.5f32; 8])];
    std::fs::write(&path, gguf_bytes(&[("general.architecture", Meta::Str("llama"))], &huge)).unwrap();
    let e = err_of(GgufFile::open(&path));
    assert!(e.contains("sizes.gguf") && e.contains("token_embd.weight") && e.contains("overflow"), "{e}");
    // A q projection whose rows are not whole pairs of each head's rows cannot be un-permuted.
    let (bytes, _) = tiny_gguf_with(|tensors| {
        let q = tensors.iter_mut().find(|t| t.0 == "blk.0.attn_q.weight").unwrap();
        let cols = q.1[1];
        q.1 = vec![q.1[0] - 1, cols];
        q.2.truncate(q.1[0] * cols);
    });
    std::fs::write(&path, &bytes).unwrap();
    let g = GgufSource::open(&path).unwrap();
    let e = err_of(g.tensor("model.layers.0.self_attn.q_proj.weight"));
    assert!(e.contains("q_proj") && e.contains("sizes.gguf") && e.contains("heads"), "{e}");
    let e = err_of(Llama::<B>::load(&BE, &g, None));
    assert!(e.contains("q_proj"), "{e}");
}

/// Sizes read from a config (an adapter's rank, a model's layer count) allocate nothing before the
/// tensors that must match them are read: a corrupt value is an error, not an allocation that aborts.
#[test]
fn corrupt_sizes_in_configs_are_errors_not_huge_allocations() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_config(false);
    let lcfg =
        llamatune::config::LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target_modules: vec![] }
            .with_targets(&["q_proj", "v_proj"])
            .unwrap();
    let lora = llamatune::model::lora::Lora::init(&BE, &cfg, lcfg, 3);
    llamatune::io::peft::save_adapter(&BE, &lora, &cfg, "tiny", d.path()).unwrap();
    let config = d.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"r\": 4"), "{text}");
    std::fs::write(&config, text.replace("\"r\": 4", "\"r\": 100000000000")).unwrap();
    let e = err_of(llamatune::io::peft::load_adapter(&BE, &cfg, d.path()));
    assert!(e.contains("q_proj.lora_A") && e.contains("100000000000"), "{e}");

    let m = tempfile::tempdir().unwrap();
    hf_dir(m.path());
    let path = m.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["num_hidden_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&path, v.to_string()).unwrap();
    let src = SafetensorsSource::open(m.path()).unwrap();
    let e = err_of(Llama::<B>::load(&BE, &src, None));
    assert!(e.contains("model.layers.2.") && e.contains("not found"), "{e}");
}

/// A xorshift generator: the mutation tests below are the same on every run.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `bytes` with one to four random edits, most within `hot` (where a file's sizes and offsets live):
/// a flipped bit, a random byte, a size-like u64 or u32, or a truncation.
fn mutated(bytes: &[u8], hot: std::ops::Range<usize>, rng: &mut Xorshift) -> Vec<u8> {
    const SIZES: [u64; 10] = [0, 1, 7, 33, 0xff, 0x8000_0000, 0xffff_ffff, 1 << 40, 1 << 63, u64::MAX];
    let mut b = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at =
            if rng.below(4) == 0 { rng.below(b.len()) } else { (hot.start + rng.below(hot.len())).min(b.len() - 1) };
        let end = |n: usize| (at + n).min(b.len());
        match rng.below(5) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => {
                let (e, v) = (end(8), SIZES[rng.below(SIZES.len())].to_le_bytes());
                b[at..e].copy_from_slice(&v[..e - at]);
            }
            3 => {
                let (e, v) = (end(4), (rng.below(40) as u32).to_le_bytes());
                b[at..e].copy_from_slice(&v[..e - at]);
            }
            _ => b.truncate(at.max(1)),
        }
    }
    b
}

/// Whether `f` panicked; the panic's message is returned for the assertion.
fn panic_of(f: impl FnOnce()) -> Option<String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Corrupted GGUF files and adapters are errors, never panics (this mutation run found GGUF tensor
/// sizes that wrapped around and an adapter rank that was allocated before it was checked).
#[test]
fn mutated_gguf_files_and_adapters_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let (gguf, _) = tiny_gguf();
    let path = d.path().join("m.gguf");
    // The tensor infos (names, dims, types, offsets) follow the metadata.
    let infos = gguf.windows(17).position(|w| w == b"token_embd.weight").unwrap() - 8;
    for case in 0..3000 {
        let bytes = mutated(&gguf, infos..infos + 3000, &mut rng);
        std::fs::write(&path, &bytes).unwrap();
        let panicked = panic_of(|| {
            let Ok(g) = GgufSource::open(&path) else { return };
            let _ = g.tokenizer_json().map(llamatune::tokenizer::Tokenizer::from_json);
            if let Ok(m) = Llama::<B>::load(&BE, &g, None) {
                full_logits(&BE, &m, None, &Batch::causal_lm(&[vec![3, 1, 4]]));
            }
        });
        assert!(panicked.is_none(), "GGUF mutation {case} panicked: {panicked:?}");
    }

    let cfg = tiny_config(false);
    let lcfg =
        llamatune::config::LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target_modules: vec![] }
            .with_targets(&["q_proj", "v_proj"])
            .unwrap();
    let dir = d.path().join("adapter");
    llamatune::io::peft::save_adapter(&BE, &llamatune::model::lora::Lora::init(&BE, &cfg, lcfg, 3), &cfg, "t", &dir)
        .unwrap();
    let files = [dir.join("adapter_model.safetensors"), dir.join("adapter_config.json")];
    let originals = files.each_ref().map(|f| std::fs::read(f).unwrap());
    for case in 0..1000 {
        let which = rng.below(2);
        std::fs::write(&files[which], mutated(&originals[which], 0..2000, &mut rng)).unwrap();
        let panicked = panic_of(|| drop(llamatune::io::peft::load_adapter(&BE, &cfg, &dir)));
        assert!(panicked.is_none(), "adapter mutation {case} panicked: {panicked:?}");
        std::fs::write(&files[which], &originals[which]).unwrap();
    }
}
