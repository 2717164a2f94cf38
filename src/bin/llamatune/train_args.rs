//! The flags of `llamatune train`, named after the Python stack's arguments.

use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Flags of `train`; every one optional so that a TOML config (`--config`) can supply it.
/// Defaults are the classic Llama-2 QLoRA recipe's.
#[derive(Args, Serialize, Default)]
pub struct TrainArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Base model: Hugging Face directory, .gguf file, or `smollm2-135m-instruct`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Training data (.jsonl, .json, .parquet): `text`, `messages`, `prompt`/`completion` or alpaca columns.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
    /// Held-out evaluation data (same formats as --dataset).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_dataset: Option<String>,
    /// Fraction of the training data held out for evaluation when no --eval-dataset [0]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_split_ratio: Option<f64>,
    /// Checkpoints, logs, TensorBoard runs and the final adapter go here [./results]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dir: Option<String>,
    /// Name of the final adapter directory inside --output-dir [adapter]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    new_model: Option<String>,
    /// Start over in an output directory that already holds a run [false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    overwrite_output_dir: Option<bool>,
    /// Continue a run: `latest` (the newest checkpoint in --output-dir) or a checkpoint directory
    #[arg(long, alias = "resume", num_args = 0..=1, default_missing_value = "latest")]
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_from_checkpoint: Option<String>,
    /// LoRA rank [64]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_r: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/r [16]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA branch's input [0.1]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    /// Module names or `all-linear` [q_proj v_proj]
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_modules: Option<Vec<String>>,
    /// PEFT's bias setting; Llama has no biases, so only `none` [none]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bias: Option<String>,
    /// Scale by alpha/sqrt(r) (rsLoRA) [false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    use_rslora: Option<bool>,
    /// Store base projections in 4 bits [true] (BitsAndBytesConfig's name: --load-in-4bit)
    #[arg(long, alias = "load-in-4bit", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    use_4bit: Option<bool>,
    /// GPU compute dtype of the 4-bit matmuls: float16 or bfloat16 [float16] (the CPU computes in f32)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bnb_4bit_compute_dtype: Option<String>,
    /// nf4 or fp4 [nf4]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bnb_4bit_quant_type: Option<String>,
    /// Double quantization of the absmax [false] (BitsAndBytesConfig's name: --bnb-4bit-use-double-quant)
    #[arg(long, alias = "bnb-4bit-use-double-quant", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    use_nested_quant: Option<bool>,
    /// Passes over the data (fractions allowed) [1]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_train_epochs: Option<f64>,
    /// Overrides epochs when > 0 [-1]
    #[arg(long, allow_hyphen_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<i64>,
    /// Micro-batch size for training [4]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_train_batch_size: Option<usize>,
    /// Batch size for evaluation [4]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_eval_batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step [1]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_accumulation_steps: Option<usize>,
    /// Recompute each layer in backward instead of keeping its activations [true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing: Option<bool>,
    /// With gradient checkpointing, keep each layer's saved input in host memory until backward
    /// (Unsloth's offloaded checkpointing: same results, less device memory) [true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing_offload: Option<bool>,
    /// With gradient checkpointing, the MLP's gate and up products of this many layers (those
    /// nearest the output) are kept from the forward pass instead of recomputed in backward: same
    /// results, faster, 2 · rows · intermediate_size values more per layer (90 MB for Llama-2-7B at
    /// 4 × 512) [0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing_keep_mlp: Option<usize>,
    /// With gradient checkpointing, attention's inputs, output and log-sum-exp of this many layers are
    /// kept from the forward pass: their replays run neither the q/k/v products nor attention; same
    /// results, ~84 MB more per layer for Llama-2-7B at 4 × 512 [0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing_keep_attention: Option<usize>,
    /// Clip the global gradient norm to this (0 = off) [0.3]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    /// Peak learning rate [2e-4]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    /// Decoupled weight decay [0.001]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    /// AdamW's first-moment decay [0.9]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    /// AdamW's second-moment decay [0.999]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    /// AdamW's epsilon [1e-8]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_epsilon: Option<f64>,
    /// paged_adamw_32bit or adamw_32bit [paged_adamw_32bit]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    optim: Option<String>,
    /// paged_adamw_32bit: keep optimizer state on the device up to this many MiB, else page it to
    /// pinned host memory [a quarter of free device memory]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    optim_memory_budget_mb: Option<f64>,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt [cosine]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_scheduler_type: Option<String>,
    /// Fraction of the steps spent warming up [0.03]
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_ratio: Option<f64>,
    /// Overrides --warmup-ratio when > 0 [0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<usize>,
    /// Batch samples of similar length together [true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    group_by_length: Option<bool>,
    /// When checkpoints are written: steps, epoch or no [steps]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_strategy: Option<String>,
    /// Checkpoint every N steps; 0 = only at the end [0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_steps: Option<usize>,
    /// Keep at most this many checkpoints (oldest deleted first)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_total_limit: Option<usize>,
    /// Log every N steps [25]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_steps: Option<usize>,
    /// Integrations to log to: tensorboard (or all) or none [tensorboard]
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    report_to: Option<Vec<String>>,
    /// TensorBoard's event directory [OUTPUT_DIR/runs/run-<time>]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_dir: Option<String>,
    /// When the eval data is evaluated: steps, epoch or no [steps]
    #[arg(long, alias = "evaluation-strategy")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_strategy: Option<String>,
    /// Evaluate every N steps (and always at the end when there is eval data)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_steps: Option<usize>,
    /// Longest sequence in tokens; longer samples are truncated and counted [1024] (TRL's newer name:
    /// --max-length)
    #[arg(long, alias = "max-length")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_seq_length: Option<usize>,
    /// Pack samples into full rows (documents never attend across each other) [false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    packing: Option<bool>,
    /// Column holding already-templated text [text]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset_text_field: Option<String>,
    /// Loss on responses only: completions, assistant turns of chats (TRL's --assistant-only-loss),
    /// text after --response-template (default: on for prompt/completion data)
    #[arg(long, alias = "assistant-only-loss", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_only_loss: Option<bool>,
    /// With --completion-only-loss on `text` rows: train on what follows this marker, e.g. "[/INST]"
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    response_template: Option<String>,
    /// Skip dataset rows that are not JSON objects (counted) instead of failing
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_bad_rows: Option<bool>,
    /// Stop after this many optimizer steps in a row were skipped for a NaN/Inf loss or gradient [5]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_bad_steps: Option<usize>,
    /// NEFTune: add uniform noise of magnitude ALPHA/sqrt(seq_len * hidden) to the embeddings while
    /// training (TRL/transformers' neftune_noise_alpha; the NEFTune paper used 5) [off]
    #[arg(long, value_parser = finite_f64, value_name = "ALPHA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    neftune_noise_alpha: Option<f64>,
    /// Seed of data order, adapter init and dropout [42]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Mixed precision on the GPU (fp16) [false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    fp16: Option<bool>,
    /// Mixed precision on the GPU (bf16) [false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    bf16: Option<bool>,
    /// auto, cpu or cuda:N [auto]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
}

/// A float flag's value, refused when it is not finite: the flags reach the config as JSON, where NaN
/// and infinity become `null`, which would leave the default in place without a word.
pub(crate) fn finite_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number")),
        Err(e) => Err(e.to_string()),
    }
}
