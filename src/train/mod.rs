//! The training loop: gradient accumulation with the loss normalized by the true token count,
//! clipping, scheduling, logging (JSONL and TensorBoard), evaluation, atomic checkpoints, exact
//! resume, a stop flag (Ctrl-C) that saves before exiting, and skipping of non-finite steps.

pub mod config;
pub mod data;

use crate::backend::Backend;
use crate::data::{Batching, TokenizedDataset};
use crate::error::{Error, Result};
use crate::io::checkpoint::{self, TrainerState};
use crate::io::peft;
use crate::io::tensorboard::EventWriter;
use crate::model::llama::{evaluate, forward_backward_with, Batch, Checkpointing, Llama, StepOptions};
use crate::model::lora::{Lora, LoraGrads};
use crate::optim::{clip_coefficient, grad_norm, warmup_steps, AdamW};
pub use config::TrainConfig;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Tokenized training and (optional) evaluation data.
pub struct TrainData {
    pub train: TokenizedDataset,
    pub eval: Option<TokenizedDataset>,
    pub pad_id: u32,
}

impl TrainData {
    /// Every token id (and the pad id) must index the model's embedding.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        for (what, ds) in [("training", Some(&self.train)), ("evaluation", self.eval.as_ref())] {
            if let Some(max) = ds.and_then(|d| d.samples.iter().flat_map(|s| s.input_ids.iter()).max()) {
                if *max as usize >= vocab {
                    return Err(Error::Config(format!(
                        "the {what} data has token id {max} but the model's vocab_size is {vocab}: is the tokenizer the model's?"
                    )));
                }
            }
        }
        if self.pad_id as usize >= vocab {
            return Err(Error::Config(format!("pad token id {} is outside the model's vocab ({vocab})", self.pad_id)));
        }
        Ok(())
    }
}

/// What the trainer reports while it runs (the library's progress callback).
#[derive(Debug, Clone)]
pub enum Event {
    Start {
        total_steps: usize,
        start_step: usize,
        train_samples: usize,
        trainable_params: usize,
        paged_optimizer: bool,
    },
    Step {
        step: usize,
        total_steps: usize,
        loss: f64,
        learning_rate: f64,
        grad_norm: f64,
    },
    Log(serde_json::Value),
    Eval {
        step: usize,
        loss: f64,
        perplexity: f64,
    },
    Skipped {
        step: usize,
        reason: String,
    },
    Checkpoint {
        step: usize,
        dir: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Completed,
    /// The stop flag was raised; a checkpoint of the last completed step was saved.
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub finish: Finish,
    pub global_step: usize,
    /// Mean loss of each optimizer step taken in this run (NaN for skipped steps).
    pub step_losses: Vec<f64>,
    pub final_eval_loss: Option<f64>,
    /// Where the final adapter was written (completed runs).
    pub adapter_dir: Option<PathBuf>,
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub fn process_peak_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Files that mark a directory as holding a run.
fn holds_a_run(dir: &Path) -> bool {
    !checkpoint::list(dir).is_empty() || dir.join("log.jsonl").exists() || dir.join("train_config.toml").exists()
}

/// Loads the model and data named by `cfg` onto `be` and trains, reporting through `on_event`.
/// Raise `stop` to end early with a checkpoint. This is the whole of `llamatune train`.
pub fn train_from_config<B: Backend>(
    be: &B,
    cfg: TrainConfig,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    cfg.validate()?;
    let (files, tok) = crate::load::open(&cfg.model)?;
    let model = Llama::load(be, files.source(), cfg.quant_config()?)?;
    let (data, _) = data::load_train_data(&cfg, &tok)?;
    Trainer::new(be, &model, cfg, &data)?.run(&data, stop, on_event)
}

/// A training run over one model.
pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    model: &'a Llama<B>,
    cfg: TrainConfig,
    pub lora: Lora<B>,
    pub opt: AdamW<B>,
    pub state: TrainerState,
    batching: Batching,
    out_dir: PathBuf,
    /// TensorBoard's event file, unless `report_to` leaves it out.
    tb: Option<EventWriter>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Sets up a run: checks the output directory, then starts fresh adapters or resumes a checkpoint.
    pub fn new(be: &'a B, model: &'a Llama<B>, cfg: TrainConfig, data: &TrainData) -> Result<Self> {
        cfg.validate()?;
        if (cfg.fp16 || cfg.bf16) && !be.supports_mixed_precision() {
            return Err(Error::Config(format!(
                "--fp16/--bf16 (mixed-precision activations) are not available on {}, which computes activations in f32",
                be.name()
            )));
        }
        data.check_vocab(model.cfg.vocab_size)?;
        let out_dir = PathBuf::from(&cfg.output_dir);
        if holds_a_run(&out_dir) && cfg.resume_from_checkpoint.is_none() {
            if !cfg.overwrite_output_dir {
                return Err(Error::Config(format!(
                    "output directory {} already holds a run; pass --resume-from-checkpoint latest to continue it \
                     or --overwrite-output-dir to start over",
                    out_dir.display()
                )));
            }
            for (_, d) in checkpoint::list(&out_dir) {
                std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            }
            let log = out_dir.join("log.jsonl");
            if log.exists() {
                std::fs::remove_file(&log).map_err(|e| Error::io(&log, e))?;
            }
        }
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let batching = Batching {
            batch_size: cfg.per_device_train_batch_size,
            shuffle: true,
            group_by_length: cfg.group_by_length,
            packing: cfg.packing.then_some(cfg.max_seq_length),
            pad_id: data.pad_id,
            seed: cfg.seed,
        };
        let lora_cfg = cfg.lora_config()?;
        // paged_adamw_32bit: 8 bytes of state per parameter go to pinned host memory when over budget.
        let state_bytes = 8.0 * crate::model::lora::param_count(&model.cfg, &lora_cfg) as f64;
        let paged = cfg.optim == "paged_adamw_32bit"
            && crate::optim::should_page(state_bytes, cfg.optim_memory_budget_mb, be.free_memory());
        let paged_chunk = paged.then_some(crate::optim::PAGED_CHUNK);
        let (lora, opt, state) = match &cfg.resume_from_checkpoint {
            Some(which) => {
                let dir = if which == "latest" {
                    checkpoint::list(&out_dir).pop().map(|(_, d)| d).ok_or_else(|| {
                        Error::Config(format!(
                            "--resume-from-checkpoint latest: no checkpoint in {}",
                            out_dir.display()
                        ))
                    })?
                } else {
                    PathBuf::from(which)
                };
                let (lora, mut opt, state) = checkpoint::load(be, &dir, &model.cfg, paged_chunk)?;
                if lora.cfg.r != lora_cfg.r || lora.cfg.target_modules != lora_cfg.target_modules {
                    return Err(Error::Config(format!(
                        "checkpoint {} has r={} targets {:?}, but this run asks for r={} targets {:?}",
                        dir.display(),
                        lora.cfg.r,
                        lora.cfg.target_modules,
                        lora_cfg.r,
                        lora_cfg.target_modules
                    )));
                }
                opt.cfg = cfg.adamw();
                (lora, opt, state)
            }
            None => {
                let lora = Lora::init(be, &model.cfg, lora_cfg, cfg.seed);
                let opt = match paged_chunk {
                    Some(chunk) => AdamW::new_paged(be, &lora, cfg.adamw(), chunk),
                    None => AdamW::new(be, &lora, cfg.adamw()),
                };
                let state = TrainerState {
                    global_step: 0,
                    max_steps: 0,
                    epoch: 0,
                    batch_in_epoch: 0,
                    seed: cfg.seed,
                    bad_steps_in_a_row: 0,
                    skipped_steps: 0,
                    log_history: vec![],
                };
                (lora, opt, state)
            }
        };
        let tb = if cfg.reports_to_tensorboard() {
            let dir = match &cfg.logging_dir {
                Some(d) => PathBuf::from(d),
                None => {
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    out_dir.join("runs").join(format!("run-{ts}"))
                }
            };
            Some(EventWriter::create(&dir)?)
        } else {
            None
        };
        crate::model::weights::write_atomic(&out_dir.join("train_config.toml"), cfg.to_toml().as_bytes())?;
        Ok(Trainer { be, model, cfg, lora, opt, state, batching, out_dir, tb })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self, data: &TrainData) -> usize {
        if self.cfg.max_steps > 0 {
            return self.cfg.max_steps as usize;
        }
        let per_epoch =
            self.batching.plan(&data.train.samples, 0).batches.len().div_ceil(self.cfg.gradient_accumulation_steps);
        ((self.cfg.num_train_epochs * per_epoch as f64).ceil() as usize).max(1)
    }

    fn log(&mut self, entry: serde_json::Value, on: &mut dyn FnMut(Event)) -> Result<()> {
        let path = self.out_dir.join("log.jsonl");
        let mut line = serde_json::to_string(&entry).expect("json");
        line.push('\n');
        use std::io::Write;
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(line.as_bytes()).map_err(|e| Error::io(&path, e))?;
        let step = entry["step"].as_u64().unwrap_or(0);
        let scalars: Vec<(String, f64)> = entry
            .as_object()
            .expect("object")
            .iter()
            .filter(|(k, _)| *k != "step")
            .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
            .collect();
        let tagged: Vec<(String, f64)> = scalars
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("eval_").map_or_else(|| format!("train/{k}"), |e| format!("eval/{e}")), v))
            .collect();
        let refs: Vec<(&str, f64)> = tagged.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        if let Some(tb) = &mut self.tb {
            tb.scalars(step, &refs)?;
        }
        self.state.log_history.push(entry.clone());
        on(Event::Log(entry));
        Ok(())
    }

    /// Mean loss over a dataset (no dropout, no gradients).
    pub fn evaluate(&self, data: &TokenizedDataset) -> f64 {
        let b = Batching {
            batch_size: self.cfg.per_device_eval_batch_size,
            shuffle: false,
            group_by_length: false,
            packing: None,
            ..self.batching.clone()
        };
        let (mut sum, mut count) = (0.0, 0usize);
        for batch in b.plan(&data.samples, 0).batches {
            let l = evaluate(self.be, self.model, Some(&self.lora), &batch);
            sum += l.loss_sum;
            count += l.count;
        }
        sum / count.max(1) as f64
    }

    fn save_checkpoint(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let args = serde_json::to_value(&self.cfg).expect("config serializes");
        let dir = checkpoint::save(
            self.be,
            &self.out_dir,
            &self.model.cfg,
            &self.cfg.model,
            &self.lora,
            &self.opt,
            &self.state,
            &args,
        )?;
        if let Some(limit) = self.cfg.save_total_limit {
            checkpoint::rotate(&self.out_dir, limit.max(1))?;
        }
        on(Event::Checkpoint { step: self.state.global_step, dir });
        Ok(())
    }

    /// Whether `save_strategy` writes a checkpoint after step `gs` (`epoch_end`: it used the epoch's
    /// last batch).
    fn saves_at(&self, gs: usize, epoch_end: bool) -> bool {
        match self.cfg.save_strategy.as_str() {
            "steps" => self.cfg.save_steps > 0 && gs % self.cfg.save_steps == 0,
            "epoch" => epoch_end,
            _ => false,
        }
    }

    /// Runs until the last step, or until `stop` is raised (then saves a checkpoint and returns).
    pub fn run(&mut self, data: &TrainData, stop: &AtomicBool, on: &mut dyn FnMut(Event)) -> Result<Outcome> {
        let be = self.be;
        let total = self.total_steps(data);
        self.state.max_steps = total;
        let warmup =
            if self.cfg.warmup_steps > 0 { self.cfg.warmup_steps } else { warmup_steps(self.cfg.warmup_ratio, total) };
        let schedule = self.cfg.schedule();
        on(Event::Start {
            total_steps: total,
            start_step: self.state.global_step,
            train_samples: data.train.samples.len(),
            trainable_params: self.lora.num_params(be),
            paged_optimizer: self.opt.is_paged(),
        });
        let mut plan = self.batching.plan(&data.train.samples, self.state.epoch).batches;
        let mut grads: LoraGrads<B> = self.lora.zero_grads(be);
        let mut step_losses = Vec::new();
        let (mut log_loss, mut log_steps, mut log_tokens, mut log_gn) = (0.0, 0usize, 0usize, 0.0);
        let mut log_start = Instant::now();
        while self.state.global_step < total {
            if stop.load(Ordering::SeqCst) {
                self.save_checkpoint(on)?;
                return Ok(Outcome {
                    finish: Finish::Interrupted,
                    global_step: self.state.global_step,
                    step_losses,
                    final_eval_loss: None,
                    adapter_dir: None,
                });
            }
            // Gather this step's micro-batches (fewer at the end of an epoch).
            let mut micro: Vec<Batch> = Vec::new();
            while micro.len() < self.cfg.gradient_accumulation_steps {
                if self.state.batch_in_epoch >= plan.len() {
                    if !micro.is_empty() {
                        break;
                    }
                    self.state.epoch += 1;
                    self.state.batch_in_epoch = 0;
                    plan = self.batching.plan(&data.train.samples, self.state.epoch).batches;
                    continue;
                }
                micro.push(plan[self.state.batch_in_epoch].clone());
                self.state.batch_in_epoch += 1;
            }
            let count: usize = micro.iter().map(Batch::num_targets).sum();
            let step = self.state.global_step;
            grads.zero(be);
            let mut loss_sum = 0.0;
            for (i, b) in micro.iter().enumerate() {
                let seed = mix(self.cfg.seed, step as u64, i as u64);
                let opts = StepOptions {
                    dropout_seed: Some(seed),
                    checkpointing: Checkpointing::from_flags(
                        self.cfg.gradient_checkpointing,
                        self.cfg.gradient_checkpointing_offload,
                    ),
                    neftune_noise_alpha: self.cfg.neftune_noise_alpha.map(|a| a as f32),
                    keep_mlp_layers: self.cfg.gradient_checkpointing_keep_mlp,
                    keep_attention_layers: self.cfg.gradient_checkpointing_keep_attention,
                };
                let l =
                    forward_backward_with(be, self.model, &self.lora, &mut grads, b, 1.0 / count.max(1) as f32, opts);
                loss_sum += l.loss_sum;
            }
            let loss = loss_sum / count.max(1) as f64;
            let gn = grad_norm(be, &grads);
            let lr = schedule.lr(self.cfg.learning_rate, step, warmup, total);
            self.state.global_step += 1;
            if !loss.is_finite() || !gn.is_finite() {
                self.state.bad_steps_in_a_row += 1;
                self.state.skipped_steps += 1;
                step_losses.push(f64::NAN);
                let reason = format!(
                    "non-finite {} (loss {loss}, grad norm {gn}); step skipped",
                    if loss.is_finite() { "gradient" } else { "loss" }
                );
                on(Event::Skipped { step: self.state.global_step, reason });
                if self.state.bad_steps_in_a_row >= self.cfg.max_bad_steps {
                    return Err(Error::Other(format!(
                        "{} steps in a row had a NaN/Inf loss or gradient; training stopped. The last good checkpoint in {} is kept.",
                        self.state.bad_steps_in_a_row,
                        self.out_dir.display()
                    )));
                }
                continue;
            }
            self.state.bad_steps_in_a_row = 0;
            let coef = clip_coefficient(gn, self.cfg.max_grad_norm);
            self.opt.update(be, &mut self.lora, &grads, lr as f32, coef as f32);
            step_losses.push(loss);
            on(Event::Step {
                step: self.state.global_step,
                total_steps: total,
                loss,
                learning_rate: lr,
                grad_norm: gn,
            });
            log_loss += loss;
            log_gn += gn;
            log_steps += 1;
            log_tokens += micro.iter().map(|b| b.batch * b.seq).sum::<usize>();
            let gs = self.state.global_step;
            if gs % self.cfg.logging_steps == 0 || gs == total {
                let secs = log_start.elapsed().as_secs_f64().max(1e-9);
                let peak = be.peak_memory().or_else(process_peak_memory).unwrap_or(0);
                let n_batches = plan.len().max(1) as f64;
                let entry = json!({
                    "step": gs,
                    "epoch": self.state.epoch as f64 + self.state.batch_in_epoch as f64 / n_batches,
                    "loss": log_loss / log_steps as f64,
                    "learning_rate": lr,
                    "grad_norm": log_gn / log_steps as f64,
                    "tokens_per_second": log_tokens as f64 / secs,
                    "peak_memory_gib": peak as f64 / (1u64 << 30) as f64,
                });
                self.log(entry, on)?;
                (log_loss, log_steps, log_tokens, log_gn) = (0.0, 0, 0, 0.0);
                log_start = Instant::now();
            }
            // This step used the epoch's last batch.
            let epoch_end = self.state.batch_in_epoch >= plan.len();
            let eval_now = match self.cfg.eval_strategy.as_str() {
                "steps" => self.cfg.eval_steps.is_some_and(|every| every > 0 && gs % every == 0),
                "epoch" => epoch_end,
                _ => false,
            };
            if let (true, Some(eval)) = (eval_now && gs != total, &data.eval) {
                let l = self.evaluate(eval);
                on(Event::Eval { step: gs, loss: l, perplexity: l.exp() });
                self.log(json!({"step": gs, "eval_loss": l, "eval_perplexity": l.exp()}), on)?;
            }
            if self.saves_at(gs, epoch_end) {
                self.save_checkpoint(on)?;
            }
        }
        let final_eval = if self.cfg.eval_strategy == "no" { None } else { data.eval.as_ref() };
        let final_eval_loss = match final_eval {
            Some(eval) => {
                let l = self.evaluate(eval);
                on(Event::Eval { step: self.state.global_step, loss: l, perplexity: l.exp() });
                self.log(json!({"step": self.state.global_step, "eval_loss": l, "eval_perplexity": l.exp()}), on)?;
                Some(l)
            }
            None => None,
        };
        // The end of the run is saved under any strategy that saves at all (as transformers does),
        // unless the last step just was.
        let gs = self.state.global_step;
        let saves = match self.cfg.save_strategy.as_str() {
            "steps" => self.cfg.save_steps > 0,
            "epoch" => true,
            _ => false,
        };
        if saves && !self.saves_at(gs, self.state.batch_in_epoch >= plan.len()) {
            self.save_checkpoint(on)?;
        }
        let adapter_dir = self.out_dir.join(&self.cfg.new_model);
        peft::save_adapter(be, &self.lora, &self.model.cfg, &self.cfg.model, &adapter_dir)?;
        Ok(Outcome {
            finish: Finish::Completed,
            global_step: self.state.global_step,
            step_losses,
            final_eval_loss,
            adapter_dir: Some(adapter_dir),
        })
    }
}
