//! GGUF (v2/v3) import: metadata, tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) dequantized
//! to f32 under Hugging Face names, llama.cpp's q/k row permutation undone, a [`ModelConfig`] built
//! from the `llama.*` keys, and a `tokenizer.json` built from the `tokenizer.ggml.*` vocabulary.

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::model::weights::{HostTensor, WeightSource};
use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(f) => Some(*f),
            MetaValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Tensor storage types we can read (ggml type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (values per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }
}

#[derive(Debug, Clone)]
struct TensorInfo {
    /// ggml dims, fastest first (`[cols, rows]` for a matrix).
    dims: Vec<usize>,
    ty: GgmlType,
    /// Absolute byte offset in the file.
    offset: usize,
    nbytes: usize,
}

/// An opened GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, MetaValue>,
    tensors: BTreeMap<String, TensorInfo>,
    mmap: Mmap,
}

/// A bounds-checked little-endian reader that reports truncation with the file's name.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.buf.len()) {
            return Err(Error::format(self.path, format!("truncated while reading {what} at byte {}", self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::format(self.path, format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::Int(self.take(1, what)?[0] as i64),
            1 => MetaValue::Int(self.take(1, what)?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as i64),
            4 => MetaValue::Int(self.u32(what)? as i64),
            5 => MetaValue::Int(self.u32(what)? as i32 as i64),
            6 => {
                // Widen through the shortest decimal so 1e-5f32 reads as 1e-5, as Python prints it.
                let x = f32::from_le_bytes(self.take(4, what)?.try_into().expect("4"));
                MetaValue::Float(x.to_string().parse().unwrap_or(x as f64))
            }
            7 => MetaValue::Bool(self.take(1, what)?[0] != 0),
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(self.path, format!("{what}: arrays nested too deeply")));
                }
                let ety = self.u32(what)?;
                let n = self.u64(what)? as usize;
                if n > self.buf.len() {
                    return Err(Error::format(self.path, format!("{what}: array length {n} exceeds the file size")));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::Int(self.u64(what)? as i64),
            11 => MetaValue::Int(self.u64(what)? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8, what)?.try_into().expect("8"))),
            other => return Err(Error::format(self.path, format!("{what}: unknown metadata type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let mut r = Reader { buf: &mmap, pos: 0, path };
        let magic = r.take(4, "the magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(path, format!("bad magic {magic:?}: not a GGUF file")));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(path, format!("GGUF version {version} is not supported (2 or 3)")));
        }
        let n_tensors = r.u64("the tensor count")? as usize;
        let n_kv = r.u64("the metadata count")? as usize;
        let mut meta = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("the type of `{key}`"))?;
            let v = r.value(ty, &format!("metadata `{key}`"), 0)?;
            meta.insert(key, v);
        }
        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor name #{i}"))?;
            let nd = r.u32(&format!("dims of `{name}`"))? as usize;
            if nd > 4 {
                return Err(Error::format(path, format!("tensor `{name}` has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64(&format!("dims of `{name}`"))? as usize);
            }
            let tid = r.u32(&format!("type of `{name}`"))?;
            let ty = GgmlType::from_id(tid)
                .ok_or_else(|| Error::format(path, format!("tensor `{name}` has unsupported ggml type {tid}")))?;
            let off = r.u64(&format!("offset of `{name}`"))? as usize;
            infos.push((name, dims, ty, off));
        }
        let align = meta.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32) as usize;
        let data_start = r.pos.div_ceil(align.max(1)) * align.max(1);
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, off) in infos {
            // Sizes come from the file: a corrupt one must not wrap around into a small, in-bounds one.
            let n = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| {
                Error::format(path, format!("tensor `{name}`: dimensions {dims:?} overflow the address space"))
            })?;
            let (per, bytes) = ty.block();
            if n % per != 0 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: {n} values is not a whole number of blocks"),
                ));
            }
            let nbytes = (n / per).checked_mul(bytes);
            let offset = data_start.checked_add(off);
            let end = offset.zip(nbytes).and_then(|(o, b)| o.checked_add(b));
            if end.is_none_or(|end| end > mmap.len()) {
                let needs = end.map_or_else(|| "more than the address space".to_string(), |e| format!("{e} bytes"));
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` data runs past the end of the file (truncated: needs {needs}, file has {})",
                        mmap.len()
                    ),
                ));
            }
            // Both are known here: `end` was computed from them.
            let (offset, nbytes) = (offset.unwrap_or(0), nbytes.unwrap_or(0));
            tensors.insert(name, TensorInfo { dims, ty, offset, nbytes });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, meta, tensors, mmap })
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta
            .get(key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` is missing or not an integer")))
    }

    /// The architecture prefix of the metadata keys (`llama`).
    pub fn arch(&self) -> Result<&str> {
        let a = self
            .meta
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| Error::format(&self.path, "metadata `general.architecture` is missing"))?;
        if a != "llama" {
            return Err(Error::format(&self.path, format!("architecture {a:?} is not supported (llama)")));
        }
        Ok(a)
    }

    /// The model config implied by the metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let a = self.arch()?.to_string();
        let k = |s: &str| format!("{a}.{s}");
        let heads = self.meta_u64(&k("attention.head_count"))? as usize;
        let hidden = self.meta_u64(&k("embedding_length"))? as usize;
        let vocab = match self.meta.get(&k("vocab_size")).and_then(MetaValue::as_u64) {
            Some(v) => v as usize,
            None => self.meta.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(|t| t.len()).ok_or_else(
                || Error::format(&self.path, "neither `llama.vocab_size` nor `tokenizer.ggml.tokens` is present"),
            )?,
        };
        let head_dim = match self.meta.get(&k("rope.dimension_count")).and_then(MetaValue::as_u64) {
            Some(d) => d as usize,
            None => hidden / heads.max(1),
        };
        let rope_scaling = match self.meta.get(&k("rope.scaling.type")).and_then(MetaValue::as_str) {
            Some("linear") => Some(RopeScaling::Linear {
                factor: self.meta.get(&k("rope.scaling.factor")).and_then(MetaValue::as_f64).unwrap_or(1.0),
            }),
            _ => None,
        };
        let cfg = ModelConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.meta_u64(&k("feed_forward_length"))? as usize,
            num_hidden_layers: self.meta_u64(&k("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: self
                .meta
                .get(&k("attention.head_count_kv"))
                .and_then(MetaValue::as_u64)
                .map_or(heads, |v| v as usize),
            head_dim,
            rms_norm_eps: self
                .meta
                .get(&k("attention.layer_norm_rms_epsilon"))
                .and_then(MetaValue::as_f64)
                .unwrap_or(1e-5),
            rope_theta: self.meta.get(&k("rope.freq_base")).and_then(MetaValue::as_f64).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self.meta.get(&k("context_length")).and_then(MetaValue::as_u64).unwrap_or(2048)
                as usize,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            bos_token_id: self.meta.get("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64).map(|v| v as u32),
            eos_token_ids: self
                .meta
                .get("tokenizer.ggml.eos_token_id")
                .and_then(MetaValue::as_u64)
                .map(|v| vec![v as u32])
                .unwrap_or_default(),
        };
        cfg.validate().map_err(|e| Error::format(&self.path, e))?;
        Ok(cfg)
    }

    /// Dequantizes the GGUF tensor `name` as stored (no permutation undone); shape is
    /// Hugging Face order (slowest first).
    pub fn raw_tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("not found in {}", self.path.display())))?;
        let bytes = &self.mmap[info.offset..info.offset + info.nbytes];
        let data = dequantize(info.ty, bytes);
        Ok(HostTensor { shape: info.dims.iter().rev().copied().collect(), data })
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml block formats → f32.
fn dequantize(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let (per, bytes) = ty.block();
    let mut out = Vec::with_capacity(b.len() / bytes * per);
    match ty {
        GgmlType::F32 => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::BF16 => out.extend(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for blk in b.chunks_exact(bytes) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            for blk in b.chunks_exact(bytes) {
                let d = f16_at(blk, 0);
                let (m, qs) =
                    if ty == GgmlType::Q4_1 { (f16_at(blk, 2), &blk[4..20]) } else { (-8.0 * d, &blk[2..18]) };
                // Low nibbles are elements 0..16, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q4K => {
            for blk in b.chunks_exact(bytes) {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                for j in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let q = &qs[32 * j..32 * j + 32];
                    out.extend(q.iter().map(|&v| d * sc1 as f32 * (v & 0x0f) as f32 - dmin * m1 as f32));
                    out.extend(q.iter().map(|&v| d * sc2 as f32 * (v >> 4) as f32 - dmin * m2 as f32));
                }
            }
        }
        GgmlType::Q6K => {
            for blk in b.chunks_exact(bytes) {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = f16_at(blk, 208);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
    out
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Undoes llama.cpp's interleaving of q/k rows for its RoPE: per head, row `2j + i` of the stored
/// tensor becomes row `i·half + j` (`reshape(n, rows/n/2, 2, cols).swapaxes(1, 2)`).
pub fn unpermute_rows(t: &HostTensor, n_heads: usize) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let per_head = rows / n_heads;
    let half = per_head / 2;
    let mut data = vec![0f32; t.data.len()];
    for h in 0..n_heads {
        for j in 0..half {
            for i in 0..2 {
                let src = h * per_head + 2 * j + i;
                let dst = h * per_head + i * half + j;
                data[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor { shape: t.shape.clone(), data }
}

/// A GGUF file seen through Hugging Face tensor names.
pub struct GgufSource {
    pub file: GgufFile,
    config: ModelConfig,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        Ok(GgufSource { file, config })
    }

    /// The GGUF name of a Hugging Face tensor name.
    fn gguf_name(hf: &str) -> Option<String> {
        let direct = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(d) = direct {
            return Some(d.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, module) = rest.split_once('.')?;
        let g = match module {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{layer}.{g}"))
    }

    /// A Hugging Face `tokenizer.json` built from the GGUF vocabulary.
    pub fn tokenizer_json(&self) -> Result<Value> {
        tokenizer_json_from_meta(&self.file.meta).map_err(|msg| Error::format(&self.file.path, msg))
    }

    /// The chat template stored in the metadata, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.file.meta.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string)
    }
}

impl WeightSource for GgufSource {
    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn has(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|g| self.file.tensors.contains_key(&g))
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let g = Self::gguf_name(name)
            .ok_or_else(|| Error::tensor(name, "has no GGUF counterpart (not a Llama tensor name)"))?;
        let t = self.file.raw_tensor(&g)?;
        let heads = if name.ends_with("q_proj.weight") {
            self.config.num_attention_heads
        } else if name.ends_with("k_proj.weight") {
            self.config.num_key_value_heads
        } else {
            return Ok(t);
        };
        // The row permutation works per pair of rows of each head: check the shape allows it before
        // the loader compares it with the config.
        if t.shape.len() != 2 || heads == 0 || t.shape[0] % (2 * heads) != 0 {
            return Err(Error::tensor(
                name,
                format!(
                    "{g} in {} has shape {:?}: not {heads} heads of an even number of rows",
                    self.file.path.display(),
                    t.shape
                ),
            ));
        }
        Ok(unpermute_rows(&t, heads))
    }
}

/// Builds a `tokenizer.json` from `tokenizer.ggml.*`: byte-level BPE for `gpt2`, and for `llama`
/// (SentencePiece) a byte-fallback BPE whose merges are derived from the vocabulary scores, the way
/// transformers converts a SentencePiece model.
pub fn tokenizer_json_from_meta(meta: &BTreeMap<String, MetaValue>) -> std::result::Result<Value, String> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or("metadata `tokenizer.ggml.model` is missing")?;
    let tokens: Vec<String> = meta
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .ok_or("metadata `tokenizer.ggml.tokens` is missing")?
        .iter()
        .map(|t| t.as_str().map(str::to_string).ok_or("a token is not a string"))
        .collect::<std::result::Result<_, _>>()?;
    let types: Vec<i64> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .map(|a| a.iter().map(|v| if let MetaValue::Int(i) = v { *i } else { 1 }).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    // Control (3) and user-defined (4) tokens are matched whole, before the model runs.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&3) || t.starts_with('<')})
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    match model {
        "gpt2" => {
            let merges: Vec<Value> = meta
                .get("tokenizer.ggml.merges")
                .and_then(MetaValue::as_array)
                .ok_or("metadata `tokenizer.ggml.merges` is missing")?
                .iter()
                .filter_map(|m| m.as_str().map(|s| json!(s)))
                .collect();
            let pre = meta.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
            let byte_level =
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
            let pre_tokenizer = if pre == "smollm" || pre == "llama-bpe" {
                json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
            } else {
                byte_level
            };
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tokenizer,
                "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            }))
        }
        "llama" => {
            let scores: Vec<f64> = meta
                .get("tokenizer.ggml.scores")
                .and_then(MetaValue::as_array)
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
                .unwrap_or_else(|| vec![0.0; tokens.len()]);
            let ids: BTreeMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
            // Every normal token that splits into two normal tokens yields a merge, ranked by the
            // merged token's score (higher first), then by the left part's id.
            let normal = |i: usize| types.get(i).is_none_or(|&t| t == 1);
            let mut merges: Vec<(f64, usize, usize, String)> = Vec::new();
            for (i, t) in tokens.iter().enumerate() {
                if !normal(i) {
                    continue;
                }
                for (cut, _) in t.char_indices().skip(1) {
                    let (l, r) = t.split_at(cut);
                    if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                        if normal(li) && normal(ri) {
                            merges.push((-scores[i], li, ri, format!("{l} {r}")));
                        }
                    }
                }
            }
            merges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let merges: Vec<Value> = merges.into_iter().map(|m| json!(m.3)).collect();
            let unk = meta.get("tokenizer.ggml.unknown_token_id").and_then(MetaValue::as_u64).unwrap_or(0) as usize;
            let bos = meta.get("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64).unwrap_or(1) as usize;
            let bos_tok = tokens.get(bos).cloned().unwrap_or_else(|| "<s>".into());
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                "pre_tokenizer": null,
                "post_processor": {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 0}}],
                    "special_tokens": {bos_tok.clone(): {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}},
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": tokens.get(unk), "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            }))
        }
        other => Err(format!("tokenizer model {other:?} is not supported (gpt2, llama)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_and_q8_0_blocks() {
        // Q4_1: d = 0.5, m = -1, nibbles: byte k holds element k (low) and k+16 (high).
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // element 0 = 10, element 16 = 3
        let v = dequantize(GgmlType::Q4_1, &b);
        assert_eq!(v.len(), 32);
        assert_eq!(v[0], 10.0 * 0.5 - 1.0);
        assert_eq!(v[16], 3.0 * 0.5 - 1.0);
        assert_eq!(v[1], -1.0);
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        b[2] = (-4i8) as u8;
        b[33] = 8;
        let v = dequantize(GgmlType::Q8_0, &b);
        assert_eq!((v[0], v[31]), (-1.0, 2.0));
        // Q4_0: (q - 8) * d
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0;
        let v = dequantize(GgmlType::Q4_0, &b);
        assert_eq!((v[0], v[16]), (-16.0, 14.0));
    }

    #[test]
    fn q4_k_scale_unpacking() {
        // Sub-blocks 0..3 read 6 bits directly; 4..7 combine low nibbles with the top 2 bits.
        let mut s = [0u8; 12];
        s[0] = 0b11_000101; // scale0 = 5, top bits 3 → scale4 high part
        s[4] = 0b01_000111; // min0 = 7, top bits 1 → min4 high part
        s[8] = 0x92; // scale4 low = 2, min4 low = 9
        assert_eq!(scale_min_k4(0, &s), (5, 7));
        assert_eq!(scale_min_k4(4, &s), (2 | (3 << 4), 9 | (1 << 4)));
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp permute: reshape(n, 2, rows/n/2, cols).swapaxes(1, 2).
        let (n, rows, cols) = (2, 8, 3);
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let half = rows / n / 2;
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n {
            for i in 0..2 {
                for j in 0..half {
                    let src = h * rows / n + i * half + j; // HF row
                    let dst = h * rows / n + 2 * j + i; // llama.cpp row
                    permuted[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let back = unpermute_rows(&HostTensor { shape: vec![rows, cols], data: permuted }, n);
        assert_eq!(back.data, hf);
    }
}
