//! `llamatune bench`: a random model of a named shape built on the device (no download), timed
//! through training steps of a recipe and a greedy decode, with an explicit FLOP count for MFU.

use crate::backend::Backend;
use crate::config::{LoraConfig, ModelConfig, QuantConfig};
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationConfig};
use crate::model::llama::{check_replay_keeps, forward_backward_with, Batch, Checkpointing, Llama, StepOptions};
use crate::model::lora::{param_count, Lora, Proj};
use crate::model::weights::{HostTensor, WeightSource};
use crate::optim::{clip_coefficient, grad_norm, AdamW, AdamWConfig, PAGED_CHUNK};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Shapes `--shape` accepts by name.
pub const NAMED_SHAPES: [&str; 3] = ["llama2-7b", "llama2-13b", "smollm2-135m"];

/// The config of a named shape, or of a `config.json` path.
pub fn shape_config(spec: &str) -> Result<ModelConfig> {
    let llama2 = |hidden: usize, ffn: usize, layers: usize, heads: usize| ModelConfig {
        vocab_size: 32000,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    Ok(match spec {
        "llama2-7b" => llama2(4096, 11008, 32, 32),
        "llama2-13b" => llama2(5120, 13824, 40, 40),
        "smollm2-135m" => ModelConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
        path => {
            let p = std::path::Path::new(path);
            if !p.exists() {
                return Err(Error::Config(format!(
                    "--shape {path:?}: not one of {NAMED_SHAPES:?} and no such config file"
                )));
            }
            ModelConfig::from_file(p)?
        }
    })
}

/// Random weights made on request, tensor by tensor, so a 7B model never sits whole in host memory.
/// Each tensor's values depend only on the seed and its name.
pub struct RandomSource {
    pub config: ModelConfig,
    pub seed: u64,
}

impl WeightSource for RandomSource {
    fn describe(&self) -> String {
        "random weights".into()
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn has(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let shape = self.shape_of(name).ok_or_else(|| Error::tensor(name, "not a tensor of this shape"))?;
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        // Embeddings as transformers initializes them (std 0.02: with tied weights they are also the
        // lm_head, and unit-scale rows would give logits in the hundreds), projections 1/√hidden.
        let std = if name.contains("embed_tokens") { 0.02 } else { (1.0 / self.config.hidden_size as f32).sqrt() };
        let key =
            name.bytes().fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        const CHUNK: usize = 1 << 16;
        let mut data = vec![0f32; n];
        data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(key.wrapping_add(c as u64));
            for x in out {
                let u = rng.gen::<f32>();
                *x = if is_norm { 1.0 + (u - 0.5) * 0.2 } else { (u * 2.0 - 1.0) * std * 1.732 };
            }
        });
        Ok(HostTensor { shape, data })
    }
}

impl RandomSource {
    /// Every tensor name of the model, in checkpoint order.
    pub fn tensor_names(&self) -> Vec<String> {
        let c = &self.config;
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        for l in 0..c.num_hidden_layers {
            names.push(format!("model.layers.{l}.input_layernorm.weight"));
            names.push(format!("model.layers.{l}.post_attention_layernorm.weight"));
            names.extend(Proj::ALL.iter().map(|p| format!("model.layers.{l}.{}.weight", p.hf_path())));
        }
        names.push("model.norm.weight".into());
        if !c.tie_word_embeddings {
            names.push("lm_head.weight".into());
        }
        names
    }

    /// Writes the model as a Hugging Face directory (`config.json`, `model.safetensors`) with the
    /// byte-level tokenizer of [`crate::model::random::byte_tokenizer_json`]: a stand-in checkpoint for
    /// exercising the whole command line on a device without a download.
    pub fn write_hf_dir(&self, dir: &std::path::Path, dtype: crate::model::weights::SaveDtype) -> Result<()> {
        let tensors: Vec<(String, HostTensor)> =
            self.tensor_names().into_iter().map(|n| self.tensor(&n).map(|t| (n, t))).collect::<Result<_>>()?;
        crate::model::random::write_checkpoint(&self.config, &tensors, dir, dtype)?;
        let tok = crate::model::random::byte_tokenizer_json();
        let tok_cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"});
        for (name, v) in [("tokenizer.json", &tok), ("tokenizer_config.json", &tok_cfg)] {
            let text = serde_json::to_vec_pretty(v).map_err(|e| Error::Other(e.to_string()))?;
            crate::model::weights::write_atomic(&dir.join(name), &text)?;
        }
        Ok(())
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (v, h) = (c.vocab_size, c.hidden_size);
        match name {
            "model.embed_tokens.weight" => return Some(vec![v, h]),
            "lm_head.weight" if !c.tie_word_embeddings => return Some(vec![v, h]),
            "model.norm.weight" => return Some(vec![h]),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (l, rest) = rest.split_once('.')?;
        if l.parse::<usize>().ok()? >= c.num_hidden_layers {
            return None;
        }
        if rest == "input_layernorm.weight" || rest == "post_attention_layernorm.weight" {
            return Some(vec![h]);
        }
        Proj::ALL.iter().find(|p| format!("{}.weight", p.hf_path()) == rest).map(|p| {
            let (o, i) = p.shape(c);
            vec![o, i]
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: ModelConfig,
    pub shape_name: String,
    /// `None`: dense bf16/fp16 base weights.
    pub quant: Option<QuantConfig>,
    pub lora: LoraConfig,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Untimed steps first (kernel loading, allocator warm-up).
    pub warmup_steps: usize,
    pub steps: usize,
    pub gradient_checkpointing: bool,
    /// Checkpointed layer inputs wait in host memory ([`Checkpointing::Offload`]).
    pub gradient_checkpointing_offload: bool,
    /// Checkpointed layers whose MLP products are kept for backward ([`StepOptions::keep_mlp_layers`]).
    pub gradient_checkpointing_keep_mlp: usize,
    /// Checkpointed layers whose attention is kept for backward ([`StepOptions::keep_attention_layers`]).
    pub gradient_checkpointing_keep_attention: usize,
    /// `adamw_torch` or `paged_adamw_32bit` (paged: optimizer state moves to pinned host memory when
    /// it would take over a quarter of the free device memory, as in training).
    pub optim: String,
    /// 0 skips decoding.
    pub decode_tokens: usize,
    pub prompt_len: usize,
    /// The card's dense bf16 peak, for MFU (`None`: no MFU, as on a CPU).
    pub peak_tflops: Option<f64>,
    pub seed: u64,
}

/// What was measured. Times in seconds, memory in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub shape: String,
    pub quant: String,
    pub target_modules: Vec<String>,
    pub lora_r: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub gradient_checkpointing: bool,
    pub gradient_checkpointing_offload: bool,
    pub gradient_checkpointing_keep_mlp: usize,
    pub gradient_checkpointing_keep_attention: usize,
    pub optim: String,
    /// Whether the optimizer state actually lived in host memory.
    pub optimizer_paged: bool,
    pub trainable_params: usize,
    pub load_quantize_s: f64,
    pub weights_memory_bytes: Option<u64>,
    pub step_times_s: Vec<f64>,
    pub median_step_s: f64,
    pub tokens_per_s: f64,
    pub flops_per_step: f64,
    pub achieved_tflops: f64,
    pub mfu: Option<f64>,
    pub peak_tflops: Option<f64>,
    pub train_peak_memory_bytes: Option<u64>,
    /// The device's energy per timed step (J) and its mean power over them (W), from its energy
    /// counter where the backend reads one (`Backend::energy_joules`; on the H200 the counter moves
    /// every ~100 ms, so a few steps are good to ~70 J in all).
    pub train_joules_per_step: Option<f64>,
    pub train_mean_power_watts: Option<f64>,
    /// Device memory the backend held after the warm-up steps, and how much more it took from the
    /// device during the timed steps (0: every allocation came from memory already held).
    pub reserved_memory_bytes: Option<u64>,
    pub reserved_growth_bytes: Option<u64>,
    pub losses: Vec<f64>,
    pub decode_new_tokens: usize,
    pub decode_tokens_per_s: Option<f64>,
    /// Prompt tokens of the decode run, and the time from its start to the first new token.
    pub prompt_tokens: usize,
    pub prefill_s: Option<f64>,
}

/// FLOPs of one training step as the engine runs it, counted explicitly:
/// - every frozen matmul (7 projections per layer, and lm_head): 2·out·in per token forward, the same
///   again for the input gradient (no weight gradient: the base is frozen);
/// - causal attention: QKᵀ and P·V cost 2·head_dim·heads·(visible keys) each per token forward,
///   with on average (T+1)/2 keys visible; backward costs 2.5× forward (dQ, dK, dV, dP and the
///   recomputed scores, as FlashAttention counts it);
/// - LoRA on each targeted projection: 2·r·(in+out) forward, 4·r·(in+out) backward (dA, dB and the
///   input gradient through A and B);
/// - with gradient checkpointing, the forward again for every layer but the last (recorded whole),
///   without the down projection's product and LoRA B product, whose output backward's replay does
///   not need (`Graph::layer_replay`), and without the gate and up products (with their LoRA
///   branches) in the `kept_mlp` layers whose first pass kept them (`StepOptions::keep_mlp_layers`),
///   nor the q/k/v products and attention in the `kept_attention` ones.
pub fn step_flops(
    c: &ModelConfig,
    lora: &LoraConfig,
    (batch, seq): (usize, usize),
    checkpointing: bool,
    kept_mlp: usize,
    kept_attention: usize,
) -> f64 {
    let tokens = (batch * seq) as f64;
    let (mut proj, mut lora_f, mut replay, mut gate_up, mut qkv) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for p in Proj::ALL {
        let (o, i) = p.shape(c);
        let (product, (lora_a, lora_b)) =
            (2.0 * (o * i) as f64, (2.0 * (lora.r * i) as f64, 2.0 * (lora.r * o) as f64));
        let targeted = lora.targets(p.name());
        proj += product;
        if targeted {
            lora_f += lora_a + lora_b;
        }
        replay += match (p, targeted) {
            (Proj::Down, true) => lora_a,
            (Proj::Down, false) => 0.0,
            (_, true) => product + lora_a + lora_b,
            (_, false) => product,
        };
        let with_branch = product + if targeted { lora_a + lora_b } else { 0.0 };
        match p {
            Proj::Gate | Proj::Up => gate_up += with_branch,
            Proj::Q | Proj::K | Proj::V => qkv += with_branch,
            _ => {}
        }
    }
    let layers = c.num_hidden_layers as f64;
    let attn = 4.0 * (c.head_dim * c.num_attention_heads) as f64 * (seq as f64 + 1.0) / 2.0;
    let replayed = if checkpointing { layers - 1.0 } else { 0.0 };
    let kept_mlp = (kept_mlp as f64).min(replayed);
    let kept_attention = (kept_attention as f64).min(replayed);
    let head = 2.0 * (c.vocab_size * c.hidden_size) as f64;
    let per_token = layers * (proj * 2.0 + attn * 3.5 + lora_f * 3.0) + replayed * (replay + attn)
        - kept_mlp * gate_up
        - kept_attention * (qkv + attn)
        + 2.0 * head;
    per_token * tokens
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

/// Builds the model on `be`, trains `steps` steps on random tokens and decodes; `log` receives
/// progress lines.
pub fn run<B: Backend>(be: &B, cfg: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if cfg.optim != "adamw_torch" && cfg.optim != "paged_adamw_32bit" {
        return Err(Error::Config(format!("--optim {:?}: expected adamw_torch or paged_adamw_32bit", cfg.optim)));
    }
    check_replay_keeps(
        cfg.gradient_checkpointing,
        cfg.gradient_checkpointing_keep_mlp,
        cfg.gradient_checkpointing_keep_attention,
    )?;
    let src = RandomSource { config: cfg.model.clone(), seed: cfg.seed };
    be.reset_peak_memory();
    let t0 = Instant::now();
    let model = Llama::load(be, &src, cfg.quant)?;
    be.synchronize();
    let load_quantize_s = t0.elapsed().as_secs_f64();
    let weights_memory_bytes = be.peak_memory();
    log(&format!("built {} on {} in {load_quantize_s:.1} s", cfg.shape_name, be.name()));

    let mut lora = Lora::init(be, &model.cfg, cfg.lora.clone(), cfg.seed);
    // Random B too: a zero B would make every step's LoRA output and dA exactly zero.
    lora.randomize_b(be, cfg.seed ^ 0x5eed);
    let adam = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
    let state_bytes = 8.0 * param_count(&cfg.model, &cfg.lora) as f64;
    let paged = cfg.optim == "paged_adamw_32bit" && crate::optim::should_page(state_bytes, None, be.free_memory());
    let mut opt = if paged { AdamW::new_paged(be, &lora, adam, PAGED_CHUNK) } else { AdamW::new(be, &lora, adam) };
    let mut grads = lora.zero_grads(be);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let vocab = cfg.model.vocab_size as u32;
    let mut batch = || {
        let rows: Vec<Vec<u32>> =
            (0..cfg.batch_size).map(|_| (0..cfg.seq_len).map(|_| rng.gen_range(0..vocab)).collect()).collect();
        Batch::causal_lm(&rows)
    };
    be.synchronize();
    be.reset_peak_memory();
    let (mut step_times, mut losses) = (vec![], vec![]);
    let mut reserved_after_warmup = None;
    // The energy counter and the clock at the start of the timed steps.
    let mut energy_start = None;
    for step in 0..cfg.warmup_steps + cfg.steps {
        if step == cfg.warmup_steps {
            reserved_after_warmup = be.reserved_memory();
            be.reset_profile();
            energy_start = be.energy_joules().map(|j| (j, Instant::now()));
        }
        let b = batch();
        let t = Instant::now();
        grads.zero(be);
        let count = b.num_targets();
        let opts = StepOptions {
            dropout_seed: Some(step as u64),
            checkpointing: Checkpointing::from_flags(cfg.gradient_checkpointing, cfg.gradient_checkpointing_offload),
            neftune_noise_alpha: None,
            keep_mlp_layers: cfg.gradient_checkpointing_keep_mlp,
            keep_attention_layers: cfg.gradient_checkpointing_keep_attention,
        };
        let l = forward_backward_with(be, &model, &lora, &mut grads, &b, 1.0 / count.max(1) as f32, opts);
        let gn = grad_norm(be, &grads);
        opt.update(be, &mut lora, &grads, 2e-4, clip_coefficient(gn, 0.3) as f32);
        be.synchronize();
        let dt = t.elapsed().as_secs_f64();
        if step >= cfg.warmup_steps {
            step_times.push(dt);
        }
        losses.push(l.mean());
        log(&format!("step {step}: {dt:.3} s, loss {:.4}", l.mean()));
    }
    // Joules per timed step and the mean power over them (the steps end synchronized, so the span
    // from the first timed step's start to the last one's end holds their work and nothing else).
    let energy = energy_start.zip(be.energy_joules()).map(|((j0, t0), j1)| {
        let joules = (j1 - j0).max(0.0);
        (joules / cfg.steps.max(1) as f64, joules / t0.elapsed().as_secs_f64())
    });
    let train_peak = be.peak_memory();
    let reserved_growth = reserved_after_warmup.zip(be.reserved_memory()).map(|(a, b)| b.saturating_sub(a));
    let median_step_s = median(&step_times);
    let (ckpt, kept) = (cfg.gradient_checkpointing, cfg.gradient_checkpointing_keep_mlp);
    let kept_attention = cfg.gradient_checkpointing_keep_attention;
    let flops = step_flops(&cfg.model, &cfg.lora, (cfg.batch_size, cfg.seq_len), ckpt, kept, kept_attention);
    let achieved = flops / median_step_s / 1e12;

    let (mut decode_tps, mut prefill_s) = (None, None);
    if cfg.decode_tokens > 0 {
        let prompt: Vec<u32> = (0..cfg.prompt_len.max(1)).map(|_| rng.gen_range(0..vocab)).collect();
        let gen = GenerationConfig { max_new_tokens: cfg.decode_tokens, eos_token_ids: vec![], ..Default::default() };
        // An untimed short run first, so first-call costs (library heuristics for the prompt's shapes)
        // stay out of the prefill time.
        let warm = GenerationConfig { max_new_tokens: 2, ..gen.clone() };
        generate(be, &model, Some(&lora), None, &prompt, &warm, &mut |_, _| true)?;
        let t = Instant::now();
        let mut stamps = Vec::with_capacity(cfg.decode_tokens);
        generate(be, &model, Some(&lora), None, &prompt, &gen, &mut |_, _| {
            stamps.push(t.elapsed().as_secs_f64());
            true
        })?;
        if stamps.len() >= 2 {
            prefill_s = Some(stamps[0]);
            decode_tps = Some((stamps.len() - 1) as f64 / (stamps[stamps.len() - 1] - stamps[0]));
        }
        log(&format!("decoded {} tokens: {:.1} tokens/s", stamps.len(), decode_tps.unwrap_or(f64::NAN)));
    }

    Ok(BenchReport {
        device: be.name(),
        shape: cfg.shape_name.clone(),
        quant: cfg.quant.map_or("none".into(), |q| {
            format!("{:?}{}", q.quant_type, if q.double_quant { "+double-quant" } else { "" }).to_lowercase()
        }),
        target_modules: cfg.lora.target_modules.clone(),
        lora_r: cfg.lora.r,
        batch_size: cfg.batch_size,
        seq_len: cfg.seq_len,
        gradient_checkpointing: cfg.gradient_checkpointing,
        gradient_checkpointing_offload: cfg.gradient_checkpointing_offload,
        gradient_checkpointing_keep_mlp: cfg.gradient_checkpointing_keep_mlp,
        gradient_checkpointing_keep_attention: cfg.gradient_checkpointing_keep_attention,
        optim: cfg.optim.clone(),
        optimizer_paged: opt.is_paged(),
        trainable_params: param_count(&cfg.model, &cfg.lora),
        load_quantize_s,
        weights_memory_bytes,
        step_times_s: step_times,
        median_step_s,
        tokens_per_s: (cfg.batch_size * cfg.seq_len) as f64 / median_step_s,
        flops_per_step: flops,
        achieved_tflops: achieved,
        mfu: cfg.peak_tflops.map(|peak| achieved / peak),
        peak_tflops: cfg.peak_tflops,
        train_peak_memory_bytes: train_peak,
        train_joules_per_step: energy.map(|(j, _)| j),
        train_mean_power_watts: energy.map(|(_, w)| w),
        reserved_memory_bytes: reserved_after_warmup,
        reserved_growth_bytes: reserved_growth,
        losses,
        decode_new_tokens: cfg.decode_tokens,
        decode_tokens_per_s: decode_tps,
        prompt_tokens: cfg.prompt_len.max(1),
        prefill_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_count_of_the_7b_recipe_matches_the_hand_count() {
        // 7B, all-linear r=64 off: 2·6.48e9 per token per pass over the projections (32 layers of
        // 4·4096² + 3·4096·11008), the lm_head 2·4096·32000 twice, attention small.
        let c = shape_config("llama2-7b").unwrap();
        let lora = LoraConfig { r: 64, ..LoraConfig::default() }.with_targets(&["q_proj", "v_proj"]).unwrap();
        let f = step_flops(&c, &lora, (4, 512), true, 0, 0) / 2048.0;
        let proj: f64 = 32.0 * 2.0 * (4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0);
        assert!((proj - 2.0 * 6.476e9).abs() / proj < 1e-3);
        // Backward's replay: 31 layers (the last is recorded whole), without the down product.
        let replay: f64 = 31.0 * 2.0 * (4.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 11008.0);
        let lower = 2.0 * proj + replay + 2.0 * 2.0 * 4096.0 * 32000.0;
        assert!(f > lower && f < lower * 1.06, "{f:e} vs {lower:e}");
        // Layers whose MLP products were kept replay no gate and up products (no LoRA on them
        // here); asking for more layers than are replayed keeps the 31 there are.
        let gate_up = 2.0 * 2.0 * 4096.0 * 11008.0;
        let kept = step_flops(&c, &lora, (4, 512), true, 10, 0) / 2048.0;
        assert!(((f - kept) - 10.0 * gate_up).abs() / gate_up < 1e-9, "{:e}", f - kept);
        let all = step_flops(&c, &lora, (4, 512), true, 100, 0) / 2048.0;
        assert!(((f - all) - 31.0 * gate_up).abs() / gate_up < 1e-9, "{:e}", f - all);
        assert_eq!(step_flops(&c, &lora, (4, 512), false, 5, 5), step_flops(&c, &lora, (4, 512), false, 0, 0));
        // Kept attention: no q/k/v products (LoRA r = 64 on q and v: A and B products too) and no
        // attention forward (4 · hidden per visible key, 256.5 of them on average).
        let qkv = 3.0 * 2.0 * 4096.0 * 4096.0 + 2.0 * 2.0 * 64.0 * (4096.0 + 4096.0);
        let attn = 4.0 * 4096.0 * 513.0 / 2.0;
        let kept = step_flops(&c, &lora, (4, 512), true, 0, 7) / 2048.0;
        assert!(((f - kept) - 7.0 * (qkv + attn)).abs() / qkv < 1e-9, "{:e}", f - kept);
    }

    #[test]
    fn random_source_is_deterministic_and_shaped_like_the_config() {
        let c = shape_config("smollm2-135m").unwrap();
        let s = RandomSource { config: c.clone(), seed: 3 };
        let a = s.tensor("model.layers.3.mlp.down_proj.weight").unwrap();
        assert_eq!(a.shape, vec![576, 1536]);
        assert_eq!(a.data, s.tensor("model.layers.3.mlp.down_proj.weight").unwrap().data);
        assert_ne!(a.data, s.tensor("model.layers.4.mlp.down_proj.weight").unwrap().data);
        assert!(s.has("model.layers.29.input_layernorm.weight"));
        assert!(!s.has("model.layers.30.input_layernorm.weight"));
        assert!(!s.has("lm_head.weight"), "tied");
        let names = s.tensor_names();
        assert_eq!(names.len(), 2 + 30 * 9);
        assert!(names.iter().all(|n| s.has(n)));
        assert!(s.tensor("model.layers.0.self_attn.x_proj.weight").is_err());
    }

    #[test]
    fn bench_runs_on_the_cpu_and_reports_every_number() {
        let mut c = crate::model::random::tiny_config(false);
        c.vocab_size = 64;
        let cfg = BenchConfig {
            model: c,
            shape_name: "tiny".into(),
            quant: Some(QuantConfig::default()),
            lora: LoraConfig { r: 4, ..LoraConfig::default() }.with_targets(&["all-linear"]).unwrap(),
            batch_size: 2,
            seq_len: 16,
            warmup_steps: 1,
            steps: 3,
            gradient_checkpointing: true,
            gradient_checkpointing_offload: true,
            gradient_checkpointing_keep_mlp: 0,
            gradient_checkpointing_keep_attention: 0,
            optim: "paged_adamw_32bit".into(),
            decode_tokens: 5,
            prompt_len: 4,
            peak_tflops: Some(1.0),
            seed: 1,
        };
        let be = crate::backend::cpu::Cpu::<f32>::new();
        let r = run(&be, &cfg, &mut |_| {}).unwrap();
        assert_eq!(r.step_times_s.len(), 3);
        assert_eq!(r.losses.len(), 4);
        assert!(r.losses.iter().all(|l| l.is_finite() && *l > 0.0));
        assert!(r.tokens_per_s > 0.0 && r.mfu.is_some_and(|m| m > 0.0));
        assert!(r.decode_tokens_per_s.unwrap() > 0.0);
        // The MLP products and attention kept: the same losses (the same gradients, so the same updates).
        let keep =
            BenchConfig { gradient_checkpointing_keep_mlp: 1, gradient_checkpointing_keep_attention: 1, ..cfg.clone() };
        let kept = run(&be, &keep, &mut |_| {}).unwrap();
        assert_eq!(kept.losses, r.losses);
        assert_eq!((kept.gradient_checkpointing_keep_mlp, kept.gradient_checkpointing_keep_attention), (1, 1));
        let no_ckpt = BenchConfig { gradient_checkpointing: false, gradient_checkpointing_keep_mlp: 1, ..cfg.clone() };
        let err = run(&be, &no_ckpt, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("--gradient-checkpointing-keep-mlp needs --gradient-checkpointing"), "{err}");
        let bad = BenchConfig { optim: "sgd".into(), ..cfg };
        assert!(run(&be, &bad, &mut |_| {}).is_err());
    }
}
