//! Configuration types: the model's shape (read from a Hugging Face `config.json`), the LoRA adapter,
//! and how frozen base weights are stored.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// How RoPE frequencies are rescaled for longer contexts (the `rope_scaling` field of `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// NTK-aware: the base grows once the sequence exceeds `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// Llama 3.1's piecewise rescaling of low and high frequencies.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// The shape of a Llama-family model, field names after Hugging Face's `LlamaConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn req_usize(obj: &Map<String, Value>, key: &str, src: &str) -> Result<usize> {
    match obj.get(key) {
        None => Err(Error::Config(format!("{src}: missing field `{key}`"))),
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| Error::Config(format!("{src}: field `{key}` must be a non-negative integer, got {v}"))),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str, default: f64, src: &str) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| Error::Config(format!("{src}: field `{key}` must be a number, got {v}"))),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&value, &path.display().to_string())
    }

    /// Parses a `config.json` value; `src` names where it came from, for error messages.
    pub fn from_json(value: &Value, src: &str) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::Config(format!("{src}: expected a JSON object")))?;
        let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
        const SUPPORTED: [&str; 3] = ["llama", "mistral", "qwen2"];
        if !SUPPORTED.contains(&model_type) {
            return Err(Error::Config(format!(
                "{src}: field `model_type` is {model_type:?}; supported: llama (and the Llama-shaped {:?})",
                &SUPPORTED[1..]
            )));
        }
        if let Some(archs) = obj.get("architectures").and_then(Value::as_array) {
            for a in archs {
                let a = a.as_str().unwrap_or("");
                if !a.ends_with("ForCausalLM") {
                    return Err(Error::Config(format!(
                        "{src}: field `architectures` lists {a:?}; only *ForCausalLM models are supported"
                    )));
                }
            }
        }
        let hidden_size = req_usize(obj, "hidden_size", src)?;
        let num_attention_heads = req_usize(obj, "num_attention_heads", src)?;
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => req_usize(obj, "num_key_value_heads", src)?,
        };
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => {
                if num_attention_heads == 0 {
                    return Err(Error::Config(format!("{src}: field `num_attention_heads` must be > 0")));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => req_usize(obj, "head_dim", src)?,
        };
        // transformers ≥ 5 writes `rope_parameters` {rope_type, rope_theta, ...}; older versions
        // `rope_theta` and `rope_scaling` at the top level.
        let (rope_theta, rope_scaling) = match obj.get("rope_parameters") {
            Some(Value::Object(rp)) => {
                let theta = opt_f64(rp, "rope_theta", opt_f64(obj, "rope_theta", 10000.0, src)?, src)?;
                let kind = rp.get("rope_type").or_else(|| rp.get("type")).and_then(Value::as_str).unwrap_or("default");
                (theta, if kind == "default" { None } else { Some(parse_rope_scaling(rp, src)?) })
            }
            Some(Value::Null) | None => {
                let scaling = match obj.get("rope_scaling") {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(rs)) => Some(parse_rope_scaling(rs, src)?),
                    Some(v) => {
                        return Err(Error::Config(format!("{src}: field `rope_scaling` must be an object, got {v}")))
                    }
                };
                (opt_f64(obj, "rope_theta", 10000.0, src)?, scaling)
            }
            Some(v) => return Err(Error::Config(format!("{src}: field `rope_parameters` must be an object, got {v}"))),
        };
        let cfg = ModelConfig {
            vocab_size: req_usize(obj, "vocab_size", src)?,
            hidden_size,
            intermediate_size: req_usize(obj, "intermediate_size", src)?,
            num_hidden_layers: req_usize(obj, "num_hidden_layers", src)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(obj, "rms_norm_eps", 1e-6, src)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: match obj.get("max_position_embeddings") {
                None | Some(Value::Null) => 2048,
                Some(_) => req_usize(obj, "max_position_embeddings", src)?,
            },
            tie_word_embeddings: obj.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: obj.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids: token_ids(obj.get("eos_token_id")),
        };
        cfg.validate().map_err(|e| Error::Config(format!("{src}: {e}")))?;
        Ok(cfg)
    }

    /// Checks the relations between fields that the graph relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("field `{name}` must be > 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The Hugging Face `config.json` for this shape (what `merge` writes next to the weights).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
        });
        let o = v.as_object_mut().expect("object literal");
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                o.insert("eos_token_id".into(), json!(one));
            }
            many => {
                o.insert("eos_token_id".into(), json!(many));
            }
        }
        // Both spellings: transformers ≥ 5 reads `rope_parameters`, older versions the legacy keys.
        let mut params = json!({"rope_type": "default", "rope_theta": self.rope_theta});
        if let Some(Value::Object(scaling)) = self.rope_scaling_json() {
            for (k, v) in scaling {
                params[k] = v;
            }
        }
        o.insert("rope_parameters".into(), params);
        o.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
                Some(RopeScaling::Dynamic { factor }) => json!({"rope_type": "dynamic", "factor": factor}),
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings}),
            },
        );
        v
    }
}

impl ModelConfig {
    fn rope_scaling_json(&self) -> Option<Value> {
        match &self.rope_scaling {
            None => None,
            Some(RopeScaling::Linear { factor }) => Some(json!({"rope_type": "linear", "factor": factor})),
            Some(RopeScaling::Dynamic { factor }) => Some(json!({"rope_type": "dynamic", "factor": factor})),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => Some(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})),
        }
    }
}

fn parse_rope_scaling(rs: &Map<String, Value>, src: &str) -> Result<RopeScaling> {
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Config(format!("{src}: `rope_scaling` needs a `rope_type`")))?;
    let factor = opt_f64(rs, "factor", 1.0, src)?;
    if factor <= 0.0 {
        return Err(Error::Config(format!("{src}: `rope_scaling.factor` must be > 0")));
    }
    match kind {
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        "linear" => Ok(RopeScaling::Linear { factor }),
        "dynamic" => Ok(RopeScaling::Dynamic { factor }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor,
            low_freq_factor: opt_f64(rs, "low_freq_factor", 1.0, src)?,
            high_freq_factor: opt_f64(rs, "high_freq_factor", 4.0, src)?,
            original_max_position_embeddings: req_usize(rs, "original_max_position_embeddings", src)?,
        }),
        other => Err(Error::Config(format!(
            "{src}: `rope_scaling.rope_type` {other:?} is not supported (linear, dynamic, llama3)"
        ))),
    }
}

/// Which Llama linear layers carry an adapter.
pub const LLAMA_LINEAR_NAMES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A LoRA adapter as PEFT defines it: `y = W x + scaling · B A dropout(x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.
    pub use_rslora: bool,
    /// Module names (`q_proj`, ...). PEFT's default for Llama is `q_proj`, `v_proj`.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 64,
            alpha: 16.0,
            dropout: 0.1,
            use_rslora: false,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Expands `all-linear` and checks every name is a Llama linear layer.
    pub fn with_targets(mut self, targets: &[&str]) -> Result<Self> {
        let mut out = Vec::new();
        for t in targets {
            if *t == "all-linear" {
                out.extend(LLAMA_LINEAR_NAMES.iter().map(|s| s.to_string()));
            } else if LLAMA_LINEAR_NAMES.contains(t) {
                out.push(t.to_string());
            } else {
                return Err(Error::Config(format!(
                    "target module {t:?} is not a Llama linear layer (expected one of {LLAMA_LINEAR_NAMES:?} or all-linear)"
                )));
            }
        }
        out.dedup();
        self.target_modules = out;
        Ok(self)
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| t == module)
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Config("lora r must be > 0".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!("lora dropout must be in [0, 1), got {}", self.dropout)));
        }
        if self.target_modules.is_empty() {
            return Err(Error::Config("lora target_modules is empty".into()));
        }
        Ok(())
    }
}

/// 4-bit data types of bitsandbytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

/// The dtype a 4-bit matmul computes in (bitsandbytes' `bnb_4bit_compute_dtype`): weights are
/// dequantized to it, inputs cast to it, and the product rounded to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    F16,
    BF16,
}

impl ComputeDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "fp32" => Some(ComputeDtype::F32),
            "float16" | "fp16" => Some(ComputeDtype::F16),
            "bfloat16" | "bf16" => Some(ComputeDtype::BF16),
            _ => None,
        }
    }
    /// `x` rounded to this dtype (round to nearest even).
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            ComputeDtype::F32 => x,
            ComputeDtype::F16 => half::f16::from_f32(x).to_f32(),
            ComputeDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// How frozen base weights are stored: 4-bit (bitsandbytes-compatible) or kept dense.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantConfig {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Quantize the per-block absmax again to 8 bits (bitsandbytes' `compress_statistics`).
    pub double_quant: bool,
    pub compute_dtype: ComputeDtype,
}

impl QuantConfig {
    /// From bitsandbytes' flag values (`bnb_4bit_quant_type`, `bnb_4bit_compute_dtype`,
    /// `bnb_4bit_use_double_quant`), blocksize 64 as bitsandbytes uses for 4-bit weights.
    pub fn from_flags(quant_type: &str, compute_dtype: &str, double_quant: bool) -> Result<Self> {
        let quant_type = match quant_type {
            "nf4" => QuantType::Nf4,
            "fp4" => QuantType::Fp4,
            other => return Err(Error::Config(format!("--bnb-4bit-quant-type {other:?} is not nf4 or fp4"))),
        };
        let compute_dtype = ComputeDtype::parse(compute_dtype).ok_or_else(|| {
            Error::Config(format!("--bnb-4bit-compute-dtype {compute_dtype:?} is not float16, bfloat16 or float32"))
        })?;
        Ok(QuantConfig { quant_type, blocksize: 64, double_quant, compute_dtype })
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: false, compute_dtype: ComputeDtype::F32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    }

    #[test]
    fn parses_gqa_and_defaults() {
        let c = ModelConfig::from_json(&base(), "t").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn rope_scaling_types() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_json(&v, "t").unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert_eq!(ModelConfig::from_json(&v, "t").unwrap().rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        v["rope_scaling"] = json!({"type": "yarn", "factor": 2.0});
        let e = ModelConfig::from_json(&v, "t").unwrap_err().to_string();
        assert!(e.contains("rope_type") && e.contains("yarn"), "{e}");
    }

    #[test]
    fn missing_field_and_bad_model_type_are_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let e = ModelConfig::from_json(&v, "cfg.json").unwrap_err().to_string();
        assert!(e.contains("cfg.json") && e.contains("intermediate_size"), "{e}");
        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = ModelConfig::from_json(&v, "cfg.json").unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("gpt2"), "{e}");
    }

    #[test]
    fn transformers_5_rope_parameters() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let c = ModelConfig::from_json(&v, "t").unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { original_max_position_embeddings: 64, .. })));
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
        let c = ModelConfig::from_json(&v, "t").unwrap();
        assert_eq!((c.rope_theta, &c.rope_scaling), (1e6, &None));
        // What we write reads back the same way through either spelling.
        let mut w = c.to_json();
        assert_eq!(ModelConfig::from_json(&w, "t").unwrap(), c);
        w.as_object_mut().unwrap().remove("rope_parameters");
        assert_eq!(ModelConfig::from_json(&w, "t").unwrap(), c);
    }

    #[test]
    fn round_trips_through_json() {
        let mut v = base();
        v["tie_word_embeddings"] = json!(true);
        v["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
        let c = ModelConfig::from_json(&v, "t").unwrap();
        assert_eq!(ModelConfig::from_json(&c.to_json(), "t").unwrap(), c);
    }

    #[test]
    fn lora_scaling_and_targets() {
        let l = LoraConfig::default();
        assert_eq!(l.scaling(), 0.25);
        let l = LoraConfig { use_rslora: true, ..LoraConfig::default() };
        assert_eq!(l.scaling(), 2.0);
        let l = LoraConfig::default().with_targets(&["all-linear"]).unwrap();
        assert_eq!(l.target_modules.len(), 7);
        assert!(LoraConfig::default().with_targets(&["lm_head"]).is_err());
        assert!(LoraConfig { r: 0, ..LoraConfig::default() }.validate().is_err());
    }
}
