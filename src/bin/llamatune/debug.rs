//! Hidden tools for the parity suite (parity/): raw quantization, logits, hidden states and LoRA
//! gradients written as safetensors, so Python can compare them with the reference stack.

use super::{open_device, Device};
use clap::{Args, Subcommand};
use llamatune::backend::Backend;
use llamatune::config::{ComputeDtype, QuantConfig, QuantType};
use llamatune::error::{Error, Result};
use llamatune::io::peft;
use llamatune::model::llama::Llama;
use llamatune::model::lora::Lora;
use llamatune::model::weights::SaveDtype;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum DebugCommand {
    /// Quantize every tensor of a safetensors file; writes `<name>.packed`, the absmax (plain or
    /// nested: `.absmax_q`, `.absmax2`, `.offset`) and `<name>.dequant`.
    Quantize {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "nf4")]
        quant_type: String,
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        #[arg(long)]
        double_quant: bool,
    },
    /// Logits `(batch, seq, vocab)` of a model (+ adapter) on token rows `1,2,3;4,5,6`.
    Logits {
        #[command(flatten)]
        model: DebugModelArgs,
        #[arg(long)]
        output: PathBuf,
    },
    /// Hidden states `(layers + 1, batch·seq, hidden)`: the embedding output, then each decoder
    /// layer's output.
    Hidden {
        #[command(flatten)]
        model: DebugModelArgs,
        #[arg(long)]
        output: PathBuf,
    },
    /// LoRA gradients of the mean next-token loss (labels = inputs, no dropout), PEFT names.
    /// Trains an adapter (`--adapter` is its initial value) on fixed token batches with the classic
    /// recipe's optimizer (AdamW 32-bit, linear schedule with warm-up, global-norm clipping) and
    /// writes the loss of every step as JSON: the parity suite's side of a loss-curve comparison.
    TrainCurve {
        #[command(flatten)]
        model: DebugModelArgs,
        /// JSON `[[[id, ...], ...], ...]`: per step, its batch rows (equal lengths).
        #[arg(long)]
        batches: PathBuf,
        #[arg(long)]
        steps: usize,
        #[arg(long, default_value_t = 2e-4)]
        learning_rate: f64,
        #[arg(long, default_value_t = 0)]
        warmup_steps: usize,
        #[arg(long, default_value_t = 0.3)]
        max_grad_norm: f64,
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f64,
        /// adamw_torch or paged_adamw_32bit
        #[arg(long, default_value = "paged_adamw_32bit")]
        optim: String,
        #[arg(long)]
        output: PathBuf,
    },
    /// Renders chats with a tokenizer's chat template and encodes them; writes `[{text, ids}]` as JSON.
    /// With a `.gguf`, `--save-tokenizer DIR` also writes the tokenizer files built from it.
    Tokenize {
        /// A directory with `tokenizer.json` (+ `tokenizer_config.json`), or a `.gguf` file.
        #[arg(long)]
        tokenizer: PathBuf,
        /// JSON `[{"messages": [{"role", "content"}...], "add_generation_prompt": bool}, ...]`.
        #[arg(long)]
        chats: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        save_tokenizer: Option<PathBuf>,
    },
    /// Writes a model with random weights of a named shape (see `bench --shape`) as a Hugging Face
    /// directory with a byte-level tokenizer: a stand-in checkpoint for command-line runs on a device.
    RandomModel {
        #[arg(long)]
        shape: String,
        #[arg(long)]
        output_dir: PathBuf,
        /// float16, bfloat16 or float32
        #[arg(long, default_value = "float16")]
        dtype: String,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    Grads {
        #[command(flatten)]
        model: DebugModelArgs,
        #[arg(long)]
        output: PathBuf,
        /// Also write the adapter back out (our PEFT writer) to this directory.
        #[arg(long)]
        save_adapter: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct DebugModelArgs {
    /// A Hugging Face model directory (a tokenizer is not needed).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Token rows: `1,2,3;4,5,6` (equal lengths); `train-curve` takes `--batches` instead.
    #[arg(long)]
    tokens: Option<String>,
    #[arg(long)]
    use_4bit: bool,
    #[arg(long, default_value = "float16")]
    bnb_4bit_compute_dtype: String,
    #[arg(long)]
    use_nested_quant: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn cmd_debug(d: DebugCommand) -> Result<ExitCode> {
    match d {
        DebugCommand::Quantize { input, output, quant_type, blocksize, double_quant } => {
            let quant_type = match quant_type.as_str() {
                "nf4" => QuantType::Nf4,
                "fp4" => QuantType::Fp4,
                q => return Err(Error::Config(format!("--quant-type {q:?} is not nf4 or fp4"))),
            };
            let cfg = QuantConfig { quant_type, blocksize, double_quant, compute_dtype: ComputeDtype::F32 };
            let f = llamatune::model::weights::SafetensorsSource::open_file(&input)?;
            let mut out: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
            let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            for name in f.names().to_vec() {
                let t = f.read(&name)?;
                let q = llamatune::quant::Quant4::quantize(&t.data, &cfg);
                out.push((format!("{name}.packed"), safetensors::Dtype::U8, vec![q.packed.len()], q.packed.clone()));
                match &q.absmax {
                    llamatune::quant::Absmax::F32(a) => {
                        out.push((format!("{name}.absmax"), safetensors::Dtype::F32, vec![a.len()], f32s(a)))
                    }
                    llamatune::quant::Absmax::Nested { q: aq, absmax2, offset } => {
                        out.push((format!("{name}.absmax_q"), safetensors::Dtype::U8, vec![aq.len()], aq.clone()));
                        out.push((
                            format!("{name}.absmax2"),
                            safetensors::Dtype::F32,
                            vec![absmax2.len()],
                            f32s(absmax2),
                        ));
                        out.push((format!("{name}.offset"), safetensors::Dtype::F32, vec![1], f32s(&[*offset])));
                    }
                }
                let dq = q.dequantize();
                out.push((format!("{name}.dequant"), safetensors::Dtype::F32, vec![dq.len()], f32s(&dq)));
            }
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
                .iter()
                .map(|(n, dt, sh, b)| {
                    (n.clone(), safetensors::tensor::TensorView::new(*dt, sh.clone(), b).expect("consistent view"))
                })
                .collect();
            safetensors::serialize_to_file(views, &None, &output)
                .map_err(|e| Error::format(&output, format!("{e:?}")))?;
            Ok(ExitCode::SUCCESS)
        }
        DebugCommand::Logits { model, output } => {
            let dev = open_device(&model.device)?;
            with_device!(&dev, be => debug_logits(be, &model, &output))
        }
        DebugCommand::Hidden { model, output } => {
            let dev = open_device(&model.device)?;
            with_device!(&dev, be => debug_hidden(be, &model, &output))
        }
        DebugCommand::TrainCurve {
            model,
            batches,
            steps,
            learning_rate,
            warmup_steps,
            max_grad_norm,
            weight_decay,
            optim,
            output,
        } => {
            let text = std::fs::read_to_string(&batches).map_err(|e| Error::io(&batches, e))?;
            let rows: Vec<Vec<Vec<u32>>> =
                serde_json::from_str(&text).map_err(|e| Error::format(&batches, e.to_string()))?;
            if rows.is_empty() {
                return Err(Error::format(&batches, "no batches"));
            }
            let curve = CurveArgs { rows, steps, learning_rate, warmup_steps, max_grad_norm, weight_decay, optim };
            let dev = open_device(&model.device)?;
            with_device!(&dev, be => debug_train_curve(be, &model, &curve, &output))
        }
        DebugCommand::RandomModel { shape, output_dir, dtype, seed } => {
            let dtype = SaveDtype::parse(&dtype)
                .ok_or_else(|| Error::Config(format!("--dtype {dtype:?} is not float16, bfloat16 or float32")))?;
            let src = llamatune::bench::RandomSource { config: llamatune::bench::shape_config(&shape)?, seed };
            src.write_hf_dir(&output_dir, dtype)?;
            Ok(ExitCode::SUCCESS)
        }
        DebugCommand::Tokenize { tokenizer, chats, output, save_tokenizer } => {
            debug_tokenize(&tokenizer, &chats, &output, save_tokenizer.as_deref())
        }
        DebugCommand::Grads { model, output, save_adapter } => {
            let dev = open_device(&model.device)?;
            with_device!(&dev, be => debug_grads(be, &model, &output, save_adapter.as_deref()))
        }
    }
}

/// The model, its adapter (when `--adapter` is given) and the `--tokens` batch (when given).
type DebugSetup<B> = (Llama<B>, Option<Lora<B>>, Option<llamatune::model::llama::Batch>);

fn debug_setup<B: Backend>(be: &B, a: &DebugModelArgs) -> Result<DebugSetup<B>> {
    let src = llamatune::model::weights::SafetensorsSource::open(&a.model)?;
    let compute_dtype = ComputeDtype::parse(&a.bnb_4bit_compute_dtype)
        .ok_or_else(|| Error::Config(format!("--bnb-4bit-compute-dtype {:?}", a.bnb_4bit_compute_dtype)))?;
    let quant = a.use_4bit.then_some(QuantConfig {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: a.use_nested_quant,
        compute_dtype,
    });
    let model = Llama::load(be, &src, quant)?;
    let lora = match &a.adapter {
        Some(d) => Some(peft::load_adapter(be, &model.cfg, d)?),
        None => None,
    };
    let Some(tokens) = &a.tokens else {
        return Ok((model, lora, None));
    };
    let rows: Vec<Vec<u32>> = tokens
        .split(';')
        .map(|r| {
            r.split(',')
                .map(|t| t.trim().parse::<u32>().map_err(|_| Error::Config(format!("bad token {t:?}"))))
                .collect()
        })
        .collect::<Result<_>>()?;
    if rows.iter().any(|r| r.len() != rows[0].len()) {
        return Err(Error::Config("--tokens rows must have equal lengths".into()));
    }
    Ok((model, lora, Some(llamatune::model::llama::Batch::causal_lm(&rows))))
}

fn debug_tokenize(tokenizer: &Path, chats: &Path, output: &Path, save: Option<&Path>) -> Result<ExitCode> {
    use llamatune::tokenizer::{Message, Tokenizer};
    let tok = if tokenizer.is_dir() {
        Tokenizer::from_dir(tokenizer)?
    } else {
        let g = llamatune::model::gguf::GgufSource::open(tokenizer)?;
        llamatune::load::gguf_tokenizer(&g)?
    };
    if let Some(dir) = save {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "chat_template": tok.effective_template(),
        });
        for (name, v) in [("tokenizer.json", &tok.json), ("tokenizer_config.json", &cfg)] {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_vec(v).expect("json")).map_err(|e| Error::io(&p, e))?;
        }
    }
    #[derive(serde::Deserialize)]
    struct Chat {
        messages: Vec<Message>,
        #[serde(default)]
        add_generation_prompt: bool,
    }
    let text = std::fs::read_to_string(chats).map_err(|e| Error::io(chats, e))?;
    let chats: Vec<Chat> = serde_json::from_str(&text).map_err(|e| Error::format(chats, e.to_string()))?;
    let mut out = vec![];
    for c in &chats {
        let text = tok.apply_chat_template(&c.messages, c.add_generation_prompt)?;
        let ids = tok.encode_templated(&text)?;
        out.push(serde_json::json!({"text": text, "ids": ids}));
    }
    std::fs::write(output, serde_json::to_vec_pretty(&out).expect("json")).map_err(|e| Error::io(output, e))?;
    Ok(ExitCode::SUCCESS)
}

struct CurveArgs {
    rows: Vec<Vec<Vec<u32>>>,
    steps: usize,
    learning_rate: f64,
    warmup_steps: usize,
    max_grad_norm: f64,
    weight_decay: f64,
    optim: String,
}

fn debug_train_curve<B: Backend>(be: &B, a: &DebugModelArgs, c: &CurveArgs, output: &Path) -> Result<ExitCode> {
    use llamatune::model::llama::{forward_backward, Batch};
    use llamatune::optim::{clip_coefficient, grad_norm, AdamW, AdamWConfig, Schedule, PAGED_CHUNK};
    let (model, lora, _) = debug_setup(be, a)?;
    let mut lora =
        lora.ok_or_else(|| Error::Config("debug train-curve needs --adapter (the initial adapter)".into()))?;
    let adam = AdamWConfig { weight_decay: c.weight_decay as f32, ..AdamWConfig::default() };
    let mut opt = match c.optim.as_str() {
        "paged_adamw_32bit" => AdamW::new_paged(be, &lora, adam, PAGED_CHUNK),
        "adamw_torch" => AdamW::new(be, &lora, adam),
        o => return Err(Error::Config(format!("--optim {o:?}: expected adamw_torch or paged_adamw_32bit"))),
    };
    let mut grads = lora.zero_grads(be);
    let mut losses = Vec::with_capacity(c.steps);
    for step in 0..c.steps {
        let batch = Batch::causal_lm(&c.rows[step % c.rows.len()]);
        grads.zero(be);
        let n = batch.num_targets() as f32;
        let l = forward_backward(be, &model, &lora, &mut grads, &batch, 1.0 / n, None, true);
        let gn = grad_norm(be, &grads);
        let lr = c.learning_rate * Schedule::Linear.factor(step, c.warmup_steps, c.steps);
        opt.update(be, &mut lora, &grads, lr as f32, clip_coefficient(gn, c.max_grad_norm) as f32);
        losses.push(serde_json::json!({"step": step, "loss": l.mean(), "grad_norm": gn, "learning_rate": lr}));
    }
    let text = serde_json::to_string_pretty(&losses).expect("json");
    std::fs::write(output, text).map_err(|e| Error::io(output, e))?;
    Ok(ExitCode::SUCCESS)
}

fn debug_logits<B: Backend>(be: &B, a: &DebugModelArgs, output: &Path) -> Result<ExitCode> {
    let (model, lora, batch) = debug_setup(be, a)?;
    let batch = batch.ok_or_else(|| Error::Config("this debug command needs --tokens".into()))?;
    let logits = llamatune::model::llama::full_logits(be, &model, lora.as_ref(), &batch);
    let t = llamatune::model::weights::HostTensor {
        shape: vec![batch.batch, batch.seq, model.cfg.vocab_size],
        data: logits,
    };
    llamatune::model::weights::write_safetensors(output, &[("logits".into(), t)], SaveDtype::F32, None)?;
    Ok(ExitCode::SUCCESS)
}

fn debug_grads<B: Backend>(be: &B, a: &DebugModelArgs, output: &Path, save: Option<&Path>) -> Result<ExitCode> {
    let (model, lora, batch) = debug_setup(be, a)?;
    let batch = batch.ok_or_else(|| Error::Config("this debug command needs --tokens".into()))?;
    let lora = lora.ok_or_else(|| Error::Config("debug grads needs --adapter".into()))?;
    let mut grads = lora.zero_grads(be);
    let n = batch.num_targets() as f32;
    let loss = llamatune::model::llama::forward_backward(be, &model, &lora, &mut grads, &batch, 1.0 / n, None, true);
    let mut tensors = vec![(
        "loss".to_string(),
        llamatune::model::weights::HostTensor { shape: vec![1], data: vec![loss.mean() as f32] },
    )];
    for ((name, p), g) in lora.named_params().iter().zip(grads.bufs()) {
        let _ = p;
        let d = be.download(g);
        tensors.push((name.clone(), llamatune::model::weights::HostTensor { shape: vec![d.len()], data: d }));
    }
    llamatune::model::weights::write_safetensors(output, &tensors, SaveDtype::F32, None)?;
    if let Some(dir) = save {
        peft::save_adapter(be, &lora, &model.cfg, &a.model.display().to_string(), dir)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn debug_hidden<B: Backend>(be: &B, a: &DebugModelArgs, output: &Path) -> Result<ExitCode> {
    use llamatune::model::llama::Graph;
    use llamatune::tape::Tape;
    let (model, lora, batch) = debug_setup(be, a)?;
    let batch = batch.ok_or_else(|| Error::Config("this debug command needs --tokens".into()))?;
    let g = Graph::new(be, &model, lora.as_ref(), &batch, None, false);
    let mut t = Tape::<B>::new(false);
    let h = model.cfg.hidden_size;
    let mut x0 = be.zeros(batch.input_ids.len() * h);
    be.embedding(&model.embed, &batch.input_ids, &mut x0);
    let mut all = be.download(&x0);
    let mut x = t.put(x0);
    for l in 0..model.cfg.num_hidden_layers {
        x = g.layer_forward(&mut t, l, x);
        all.extend(be.download(t.get(x)));
    }
    let n = model.cfg.num_hidden_layers + 1;
    let t = llamatune::model::weights::HostTensor { shape: vec![n, batch.input_ids.len(), h], data: all };
    llamatune::model::weights::write_safetensors(output, &[("hidden".into(), t)], SaveDtype::F32, None)?;
    Ok(ExitCode::SUCCESS)
}
