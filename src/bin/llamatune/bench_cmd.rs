//! `llamatune bench`: training-step and decoding speed of a random model of a named shape.

use crate::{open_device, Device};
use clap::Args;
use llamatune::bench::{self, BenchConfig};
use llamatune::config::{LoraConfig, QuantConfig};
use llamatune::error::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct BenchArgs {
    /// llama2-7b, llama2-13b, smollm2-135m, or a config.json path
    #[arg(long, default_value = "llama2-7b")]
    shape: String,
    /// auto, cpu or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed training steps
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps before them
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// Rows per step
    #[arg(long, default_value_t = 4)]
    per_device_train_batch_size: usize,
    /// Tokens per row (every row full)
    #[arg(long, default_value_t = 512)]
    max_seq_length: usize,
    /// LoRA rank
    #[arg(long, default_value_t = 64)]
    lora_r: usize,
    /// LoRA scale numerator (scale = alpha / r)
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Dropout on the LoRA branch's input
    #[arg(long, default_value_t = 0.1)]
    lora_dropout: f64,
    /// Module names or `all-linear`
    #[arg(long, num_args = 1.., value_delimiter = ',', default_values_t = ["q_proj".to_string(), "v_proj".to_string()])]
    target_modules: Vec<String>,
    /// Store base projections in 4 bits
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    use_4bit: bool,
    /// nf4 or fp4
    #[arg(long, default_value = "nf4")]
    bnb_4bit_quant_type: String,
    /// Dtype of the 4-bit matmuls: bfloat16, float16 or float32
    #[arg(long, default_value = "bfloat16")]
    bnb_4bit_compute_dtype: String,
    /// Double-quantize the absmax (bitsandbytes' compressed statistics)
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    use_nested_quant: bool,
    /// Recompute each layer in backward instead of keeping its activations
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    gradient_checkpointing: bool,
    /// With gradient checkpointing, keep each layer's saved input in host memory until backward
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    gradient_checkpointing_offload: bool,
    /// With gradient checkpointing, the MLP's gate and up products of this many layers are kept from
    /// the forward pass instead of recomputed (memory for time)
    #[arg(long, default_value_t = 0)]
    gradient_checkpointing_keep_mlp: usize,
    /// With gradient checkpointing, attention's inputs and output of this many layers are kept from
    /// the forward pass instead of recomputed (memory for time)
    #[arg(long, default_value_t = 0)]
    gradient_checkpointing_keep_attention: usize,
    /// adamw_torch or paged_adamw_32bit
    #[arg(long, default_value = "paged_adamw_32bit")]
    optim: String,
    /// New tokens of the greedy decode run (0 = none)
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Prompt tokens before decoding
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// The card's dense bf16 peak in TFLOP/s, for MFU [989 on a GPU (H100/H200 SXM); no MFU on the CPU]
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Seed of the random weights, adapters and tokens
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also write the report here as JSON
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn cmd_bench(a: BenchArgs) -> Result<ExitCode> {
    let targets: Vec<&str> = a.target_modules.iter().map(String::as_str).collect();
    let lora = LoraConfig { r: a.lora_r, alpha: a.lora_alpha, dropout: a.lora_dropout, ..LoraConfig::default() }
        .with_targets(&targets)?;
    let quant = if a.use_4bit {
        Some(QuantConfig::from_flags(&a.bnb_4bit_quant_type, &a.bnb_4bit_compute_dtype, a.use_nested_quant)?)
    } else {
        None
    };
    if a.steps == 0 || a.per_device_train_batch_size == 0 || a.max_seq_length < 2 {
        return Err(Error::Config(
            "--steps and --per-device-train-batch-size must be ≥ 1, --max-seq-length ≥ 2".into(),
        ));
    }
    let cfg = BenchConfig {
        model: bench::shape_config(&a.shape)?,
        shape_name: a.shape.clone(),
        quant,
        lora,
        batch_size: a.per_device_train_batch_size,
        seq_len: a.max_seq_length,
        warmup_steps: a.warmup_steps,
        steps: a.steps,
        gradient_checkpointing: a.gradient_checkpointing,
        gradient_checkpointing_offload: a.gradient_checkpointing_offload,
        gradient_checkpointing_keep_mlp: a.gradient_checkpointing_keep_mlp,
        gradient_checkpointing_keep_attention: a.gradient_checkpointing_keep_attention,
        optim: a.optim.clone(),
        decode_tokens: a.decode_tokens,
        prompt_len: a.prompt_len,
        peak_tflops: a.peak_tflops,
        seed: a.seed,
    };
    let dev = open_device(&a.device)?;
    #[cfg(feature = "cuda")]
    let cfg = BenchConfig { peak_tflops: cfg.peak_tflops.or(matches!(dev, Device::Cuda(_)).then_some(989.0)), ..cfg };
    let report = with_device!(&dev, be => bench::run(be, &cfg, &mut |line| eprintln!("{line}"))?);
    let gib = |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64));
    println!("device           {}", report.device);
    println!(
        "shape            {} ({}, LoRA r={} on {:?})",
        report.shape, report.quant, report.lora_r, report.target_modules
    );
    for (what, layers) in [
        ("MLP products", report.gradient_checkpointing_keep_mlp),
        ("attention", report.gradient_checkpointing_keep_attention),
    ] {
        if layers > 0 {
            println!("checkpointing    {what} kept for backward in {layers} layers");
        }
    }
    println!("load + quantize  {:.1} s, weights {}", report.load_quantize_s, gib(report.weights_memory_bytes));
    println!(
        "train step       {:.1} ms median of {} ({} × {} tokens) → {:.0} tokens/s",
        report.median_step_s * 1e3,
        report.step_times_s.len(),
        report.batch_size,
        report.seq_len,
        report.tokens_per_s
    );
    let rate = if report.achieved_tflops >= 1.0 {
        format!("{:.1} TFLOP/s", report.achieved_tflops)
    } else {
        format!("{:.1} GFLOP/s", report.achieved_tflops * 1e3)
    };
    match (report.mfu, report.peak_tflops) {
        (Some(mfu), Some(peak)) => println!("                 {rate}, MFU {:.1}% of {peak} TFLOP/s", mfu * 100.0),
        _ => println!("                 {rate}"),
    }
    println!("train peak mem   {}", gib(report.train_peak_memory_bytes));
    if let (Some(j), Some(w)) = (report.train_joules_per_step, report.train_mean_power_watts) {
        println!("train energy     {j:.1} J per step, {w:.0} W mean over the timed steps (the board's counter)");
    }
    if let (Some(r), Some(g)) = (report.reserved_memory_bytes, report.reserved_growth_bytes) {
        println!("device memory    {} held after warm-up, {g} bytes more taken over the timed steps", gib(Some(r)));
    }
    if let Some(p) = report.prefill_s {
        println!("prefill          {:.1} ms ({} prompt tokens to the first new one)", p * 1e3, report.prompt_tokens);
    }
    if let Some(t) = report.decode_tokens_per_s {
        println!("decode           {t:.1} tokens/s (batch 1, {} new tokens, greedy)", report.decode_new_tokens);
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&report).expect("report serializes");
        std::fs::write(p, text).map_err(|e| Error::io(p, e))?;
    }
    Ok(ExitCode::SUCCESS)
}
