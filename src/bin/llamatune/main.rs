//! The `llamatune` command line: train, generate, chat, merge, eval, data convert, demo.

mod device_failure;
mod train_args;

use clap::{Args, Parser, Subcommand};
use llamatune::backend::cpu::Cpu;
use llamatune::backend::Backend;
use llamatune::config::{ComputeDtype, QuantConfig, QuantType};
use llamatune::data::format::{convert_row, RowFormat};
use llamatune::data::records::{read_records, write_jsonl};
use llamatune::error::{Error, Result};
use llamatune::generate::{generate, GenerationConfig};
use llamatune::io::{export, peft};
use llamatune::load::{self, ModelFiles};
use llamatune::model::llama::Llama;
use llamatune::model::lora::Lora;
use llamatune::model::merge::merge;
use llamatune::model::weights::SaveDtype;
use llamatune::progress::Progress;
use llamatune::tokenizer::{Message, Tokenizer};
use llamatune::train::{self, Event, Finish, TrainConfig, Trainer};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use train_args::TrainArgs;

#[derive(Parser)]
#[command(name = "llamatune", version, about = "QLoRA fine-tuning of Llama-family models: one binary, no Python")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune LoRA adapters on a frozen (4-bit) base model.
    Train(Box<TrainArgs>),
    /// Generate a reply to one prompt (streamed).
    Generate(GenerateArgs),
    /// Chat interactively with a model (+ adapter).
    Chat(ChatArgs),
    /// Fold an adapter into the base weights and write a Hugging Face model directory (without
    /// --adapter: convert the base model, e.g. a GGUF file, to one).
    Merge(MergeArgs),
    /// Loss and perplexity of a model (+ adapter) on a dataset.
    Eval(EvalArgs),
    /// Dataset conversions.
    #[command(subcommand)]
    Data(DataCommand),
    /// Time training steps and decoding on a random model of a named shape (no download).
    Bench(Box<bench_cmd::BenchArgs>),
    /// Tools for the parity suite (parity/): raw quantization, logits and gradients as safetensors.
    #[command(subcommand, hide = true)]
    Debug(debug::DebugCommand),
    /// Fine-tune SmolLM2-135M-Instruct on a small real instruction set, showing answers before and
    /// after, and save the adapter and the merged model (runs on the CPU in a few minutes).
    Demo(DemoArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Convert a dataset to JSONL: OpenAssistant-Guanaco `### Human: … ### Assistant: …` text becomes
    /// the Llama-2 template `<s>[INST] … [/INST] … </s>`; other formats are rendered with --model's chat
    /// template when given, else copied row by row.
    Convert {
        /// Input `.jsonl`, `.json` or `.parquet`.
        #[arg(long)]
        input: PathBuf,
        /// Output `.jsonl`.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "text")]
        dataset_text_field: String,
        /// Render `messages`/`prompt`/alpaca rows to text with this model's chat template.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        skip_bad_rows: bool,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Base model: Hugging Face directory, .gguf file, or `smollm2-135m-instruct`.
    #[arg(long)]
    model: String,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Load the base projections in 4 bits (NF4), as when training.
    #[arg(long)]
    use_4bit: bool,
    /// Dtype of the 4-bit matmuls: float16, bfloat16 or float32.
    #[arg(long, default_value = "float16")]
    bnb_4bit_compute_dtype: String,
    /// auto, cpu or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Cap on prompt + new tokens.
    #[arg(long)]
    max_length: Option<usize>,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    do_sample: bool,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stop_strings: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long)]
    prompt: String,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model (loaded at 16 bits, never 4).
    #[arg(long)]
    model: String,
    /// The PEFT adapter to fold in; without it the base model is written as it is.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output Hugging Face model directory.
    #[arg(long)]
    output_dir: PathBuf,
    /// float16, bfloat16 or float32
    #[arg(long, default_value = "float16")]
    dtype: String,
    /// Largest safetensors shard, in bytes (suffixes KB, MB, GB accepted).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    dataset: String,
    #[arg(long, default_value_t = 1024)]
    max_seq_length: usize,
    #[arg(long, default_value_t = 4)]
    per_device_eval_batch_size: usize,
    #[arg(long, default_value = "text")]
    dataset_text_field: String,
}

#[derive(Args)]
struct DemoArgs {
    /// Where the adapter, merged model and logs go.
    #[arg(long, default_value = "./llamatune-demo")]
    output_dir: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 30)]
    max_steps: i64,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> ExitCode {
    // matrixmultiply counts physical cores; use every hardware thread unless the user said otherwise.
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("MATMUL_NUM_THREADS", n.to_string());
    }
    device_failure::install_hook();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cmd_train(*a),
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Merge(a) => cmd_merge(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Data(DataCommand::Convert { input, output, dataset_text_field, model, skip_bad_rows }) => {
            cmd_convert(&input, &output, &dataset_text_field, model.as_deref(), skip_bad_rows)
        }
        Command::Demo(a) => cmd_demo(a),
        Command::Bench(a) => bench_cmd::cmd_bench(*a),
        Command::Debug(d) => debug::cmd_debug(d),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The backend a `--device` names.
pub(crate) enum Device {
    Cpu(Cpu<f32>),
    #[cfg(feature = "cuda")]
    Cuda(Box<llamatune::backend::cuda::Cuda>),
}

/// Runs `$body` with `$be` bound to the device's backend (each arm monomorphizes the generic code).
macro_rules! with_device {
    ($dev:expr, $be:ident => $body:expr) => {
        match $dev {
            Device::Cpu($be) => $body,
            #[cfg(feature = "cuda")]
            Device::Cuda($be) => {
                let $be = $be.as_ref();
                $body
            }
        }
    };
}

mod bench_cmd;
mod debug;

/// `auto` takes GPU 0 when this build has CUDA and a GPU answers, else the CPU.
pub(crate) fn open_device(device: &str) -> Result<Device> {
    let ordinal = |d: &str| -> Result<usize> {
        match d.strip_prefix("cuda") {
            Some("") => Ok(0),
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Config(format!("--device {d:?}: expected cuda or cuda:N"))),
            None => unreachable!(),
        }
    };
    match device {
        "cpu" => Ok(Device::Cpu(Cpu::new())),
        #[cfg(feature = "cuda")]
        "auto" => match llamatune::backend::cuda::Cuda::new(0) {
            Ok(c) => Ok(Device::Cuda(Box::new(c))),
            Err(e) => {
                eprintln!("note: no usable GPU ({e}); running on the CPU");
                Ok(Device::Cpu(Cpu::new()))
            }
        },
        #[cfg(not(feature = "cuda"))]
        "auto" => Ok(Device::Cpu(Cpu::new())),
        d if d.starts_with("cuda") => {
            let n = ordinal(d)?;
            #[cfg(feature = "cuda")]
            {
                Ok(Device::Cuda(Box::new(llamatune::backend::cuda::Cuda::new(n)?)))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = n;
                Err(Error::Config(format!(
                    "--device {d}: this llamatune was built without CUDA support (rebuild with `--features cuda`)"
                )))
            }
        }
        d => Err(Error::Config(format!("--device {d:?} is not auto, cpu or cuda:N"))),
    }
}

fn load_with_bar<B: Backend>(be: &B, files: &ModelFiles, quant: Option<QuantConfig>) -> Result<Llama<B>> {
    let mut bar: Option<Progress> = None;
    let model = load::load_model(be, files, quant, &mut |done, total| {
        let b = bar.get_or_insert_with(|| Progress::new(if quant.is_some() { "load+quantize" } else { "load" }, total));
        b.update(done, "");
    })?;
    if let Some(mut b) = bar {
        b.finish();
    }
    Ok(model)
}

fn cmd_train(args: TrainArgs) -> Result<ExitCode> {
    let overrides = serde_json::to_value(&args).expect("flags serialize");
    let cfg = TrainConfig::resolve(args.config.as_deref(), overrides)?;
    eprintln!("# resolved training config\n{}", cfg.to_toml());
    let dev = open_device(&cfg.device)?;
    let (files, tok) = load::open(&cfg.model)?;
    with_device!(&dev, be => {
        let model = load_with_bar(be, &files, cfg.quant_config()?)?;
        run_training(be, &model, &tok, cfg).map(|(code, _)| code)
    })
}

/// Loads data, trains with a progress bar, and returns the exit code and the run's outcome.
fn run_training<B: Backend>(
    be: &B,
    model: &Llama<B>,
    tok: &Tokenizer,
    cfg: TrainConfig,
) -> Result<(ExitCode, train::Outcome)> {
    let (data, report) = train::data::load_train_data(&cfg, tok)?;
    eprintln!(
        "data: {} format, {} train / {} eval samples, {} train tokens; {} truncated to {} tokens, {} bad rows skipped, {} without trained tokens dropped",
        report.format,
        report.train_samples,
        report.eval_samples,
        report.train_tokens,
        report.truncated,
        cfg.max_seq_length,
        report.skipped_bad_rows,
        report.dropped_untrained
    );
    let mut trainer = Trainer::new(be, model, cfg, &data)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while saving falls through to the default (exit) — the save is atomic.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: saving a checkpoint after the current step (Ctrl-C again to abort)");
        });
    }
    let mut bar: Option<Progress> = None;
    let outcome = trainer.run(&data, &stop, &mut |ev| match ev {
        Event::Start { total_steps, start_step, train_samples, trainable_params, paged_optimizer } => {
            eprintln!(
                "training: {total_steps} steps from step {start_step}, {train_samples} samples, {trainable_params} trainable parameters on {}{}",
                be.name(),
                if paged_optimizer { "; optimizer state paged to host memory" } else { "" }
            );
            bar = Some(Progress::new("train", total_steps));
        }
        Event::Step { step, loss, learning_rate, .. } => {
            if let Some(b) = bar.as_mut() {
                b.update(step, &format!("loss {loss:.4} lr {learning_rate:.2e}"));
            }
        }
        Event::Log(entry) => {
            if let Some(b) = bar.as_ref() {
                b.println(&entry.to_string());
            }
        }
        Event::Eval { step, loss, perplexity } => {
            if let Some(b) = bar.as_ref() {
                b.println(&format!("eval at step {step}: loss {loss:.4} perplexity {perplexity:.2}"));
            }
        }
        Event::Skipped { step, reason } => eprintln!("\nstep {step}: {reason}"),
        Event::Checkpoint { step, dir } => {
            if let Some(b) = bar.as_ref() {
                b.println(&format!("step {step}: checkpoint saved to {}", dir.display()));
            }
        }
    })?;
    if let Some(b) = bar.as_mut() {
        b.finish();
    }
    match outcome.finish {
        Finish::Completed => {
            let dir = outcome.adapter_dir.as_ref().expect("completed runs save an adapter");
            eprintln!("done: {} steps; adapter saved to {}", outcome.global_step, dir.display());
            Ok((ExitCode::SUCCESS, outcome))
        }
        Finish::Interrupted => {
            eprintln!("stopped at step {}; resume with --resume-from-checkpoint latest", outcome.global_step);
            Ok((ExitCode::from(130), outcome))
        }
    }
}

fn gen_config(s: &SamplingArgs, tok: &Tokenizer, model: &Llama<impl Backend>) -> GenerationConfig {
    let mut eos = model.cfg.eos_token_ids.clone();
    if let Some(e) = tok.eos_id() {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    GenerationConfig {
        max_new_tokens: s.max_new_tokens,
        max_length: s.max_length,
        do_sample: s.do_sample,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repetition_penalty: s.repetition_penalty,
        eos_token_ids: eos,
        stop_strings: s.stop_strings.clone(),
        seed: s.seed,
    }
}

/// Base model (+ adapter) ready for generation.
struct Loaded<'a, B: Backend> {
    be: &'a B,
    model: Llama<B>,
    lora: Option<Lora<B>>,
    tok: Tokenizer,
}

fn load_for_inference<'a, B: Backend>(be: &'a B, m: &ModelArgs) -> Result<Loaded<'a, B>> {
    let (files, tok) = load::open(&m.model)?;
    let compute_dtype = ComputeDtype::parse(&m.bnb_4bit_compute_dtype).ok_or_else(|| {
        Error::Config(format!(
            "--bnb-4bit-compute-dtype {:?} is not float16, bfloat16 or float32",
            m.bnb_4bit_compute_dtype
        ))
    })?;
    let quant = m.use_4bit.then_some(QuantConfig {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: false,
        compute_dtype,
    });
    let model = load_with_bar(be, &files, quant)?;
    let lora = match &m.adapter {
        Some(dir) => Some(peft::load_adapter(be, &model.cfg, dir)?),
        None => None,
    };
    Ok(Loaded { be, model, lora, tok })
}

fn stream_reply<B: Backend>(l: &Loaded<B>, ids: &[u32], gen: &GenerationConfig) -> Result<String> {
    let mut out = std::io::stdout();
    let r = generate(l.be, &l.model, l.lora.as_ref(), Some(&l.tok), ids, gen, &mut |_, piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
        true
    })?;
    println!();
    Ok(r.text)
}

fn cmd_generate(a: GenerateArgs) -> Result<ExitCode> {
    let dev = open_device(&a.model.device)?;
    with_device!(&dev, be => generate_on(be, &a))
}

fn generate_on<B: Backend>(be: &B, a: &GenerateArgs) -> Result<ExitCode> {
    let l = load_for_inference(be, &a.model)?;
    let gen = gen_config(&a.sampling, &l.tok, &l.model);
    let ids = if a.raw {
        l.tok.encode(&a.prompt, true)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        l.tok.encode_templated(&l.tok.apply_chat_template(&msgs, true)?)?
    };
    stream_reply(&l, &ids, &gen)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_chat(a: ChatArgs) -> Result<ExitCode> {
    let dev = open_device(&a.model.device)?;
    with_device!(&dev, be => chat_on(be, &a))
}

fn chat_on<B: Backend>(be: &B, a: &ChatArgs) -> Result<ExitCode> {
    let l = load_for_inference(be, &a.model)?;
    let gen = gen_config(&a.sampling, &l.tok, &l.model);
    let mut history: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let base_len = history.len();
    eprintln!("chat with {} — /reset clears the history, /exit or Ctrl-D quits", a.model.model);
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| Error::Other(e.to_string()))? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(base_len);
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let ids = l.tok.encode_templated(&l.tok.apply_chat_template(&history, true)?)?;
        let reply = stream_reply(&l, &ids, &gen)?;
        history.push(Message::new("assistant", reply.trim()));
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("GB") {
        (n, 1usize << 30)
    } else if let Some(n) = t.strip_suffix("MB") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("KB") {
        (n, 1 << 10)
    } else {
        (t.as_str(), 1)
    };
    let v: f64 = num.trim().parse().map_err(|_| Error::Config(format!("--max-shard-size {s:?} is not a size")))?;
    Ok((v * mult as f64) as usize)
}

fn merge_to_dir(
    be: &Cpu<f32>,
    base: &str,
    adapter: Option<&Path>,
    out: &Path,
    dtype: SaveDtype,
    shard: usize,
) -> Result<()> {
    let (files, tok) = load::open(base)?;
    let model = load_with_bar(be, &files, None)?;
    let model = match adapter {
        Some(adapter) => merge(be, &model, &peft::load_adapter(be, &model.cfg, adapter)?),
        None => model,
    };
    export::write_model_dir(be, &model, Some(&tok), out, dtype, shard)?;
    Ok(())
}

fn cmd_merge(a: MergeArgs) -> Result<ExitCode> {
    let dtype = SaveDtype::parse(&a.dtype)
        .ok_or_else(|| Error::Config(format!("--dtype {:?} is not float16, bfloat16 or float32", a.dtype)))?;
    let be = Cpu::<f32>::new();
    merge_to_dir(&be, &a.model, a.adapter.as_deref(), &a.output_dir, dtype, parse_size(&a.max_shard_size)?)?;
    let what = if a.adapter.is_some() { "merged model" } else { "model" };
    eprintln!("{what} written to {}", a.output_dir.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_eval(a: EvalArgs) -> Result<ExitCode> {
    let dev = open_device(&a.model.device)?;
    with_device!(&dev, be => eval_on(be, &a))
}

fn eval_on<B: Backend>(be: &B, a: &EvalArgs) -> Result<ExitCode> {
    let l = load_for_inference(be, &a.model)?;
    let cfg = TrainConfig {
        model: a.model.model.clone(),
        dataset: a.dataset.clone(),
        max_seq_length: a.max_seq_length,
        dataset_text_field: a.dataset_text_field.clone(),
        ..TrainConfig::default()
    };
    let (data, report) = train::data::load_train_data(&cfg, &l.tok)?;
    data.check_vocab(l.model.cfg.vocab_size)?;
    let batching = llamatune::data::Batching {
        batch_size: a.per_device_eval_batch_size,
        shuffle: false,
        group_by_length: false,
        packing: None,
        pad_id: data.pad_id,
        seed: 0,
    };
    let plan = batching.plan(&data.train.samples, 0).batches;
    let mut bar = Progress::new("eval", plan.len());
    let (mut sum, mut count) = (0.0, 0usize);
    for (i, b) in plan.iter().enumerate() {
        let r = llamatune::model::llama::evaluate(l.be, &l.model, l.lora.as_ref(), b);
        sum += r.loss_sum;
        count += r.count;
        bar.update(i + 1, "");
    }
    bar.finish();
    let loss = sum / count.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({"eval_loss": loss, "eval_perplexity": loss.exp(), "samples": report.train_samples, "tokens": count, "truncated": report.truncated})
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_convert(input: &Path, output: &Path, text_field: &str, model: Option<&str>, skip: bool) -> Result<ExitCode> {
    let recs = read_records(input, skip)?;
    let fmt = RowFormat::detect(&recs.rows[0], text_field, input)?;
    let tok = match model {
        Some(m) => Some(load::open(m)?.1),
        None => None,
    };
    let rows = recs.rows.iter().map(|r| convert_row(r, &fmt, tok.as_ref(), input)).collect::<Result<Vec<_>>>()?;
    write_jsonl(output, &rows)?;
    eprintln!("wrote {} rows to {} ({} bad rows skipped)", rows.len(), output.display(), recs.skipped);
    Ok(ExitCode::SUCCESS)
}

const DEMO_PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a neural network is in one sentence.",
];

fn cmd_demo(a: DemoArgs) -> Result<ExitCode> {
    let dev = open_device(&a.device)?;
    with_device!(&dev, be => demo_on(be, &a))
}

fn demo_on<B: Backend>(be: &B, a: &DemoArgs) -> Result<ExitCode> {
    let out = PathBuf::from(&a.output_dir);
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    // Data: the OpenAssistant records of AlpacaEval's example outputs (fetched from PyPI).
    let raw = llamatune::assets::fetch(&llamatune::assets::ALPACA_EVAL_OUTPUTS)?;
    let text = std::fs::read_to_string(&raw).map_err(|e| Error::io(&raw, e))?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| Error::format(&raw, format!("not valid JSON: {e}")))?;
    let oasst: Vec<serde_json::Map<String, serde_json::Value>> = rows
        .into_iter()
        .filter(|r| r.get("dataset").and_then(|d| d.as_str()) == Some("oasst"))
        .filter_map(|r| {
            let mut m = serde_json::Map::new();
            m.insert("instruction".into(), r.get("instruction")?.clone());
            m.insert("output".into(), r.get("output")?.clone());
            Some(m)
        })
        .collect();
    let data_path = out.join("oasst_instructions.jsonl");
    write_jsonl(&data_path, &oasst)?;
    eprintln!("demo data: {} OpenAssistant instruction/response pairs -> {}", oasst.len(), data_path.display());

    let (files, tok) = load::open("smollm2-135m-instruct")?;
    let quant =
        QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true, compute_dtype: ComputeDtype::F16 };
    let model = load_with_bar(be, &files, Some(quant))?;
    let gen = GenerationConfig {
        max_new_tokens: 48,
        eos_token_ids: tok.eos_id().into_iter().collect(),
        repetition_penalty: 1.1,
        ..GenerationConfig::default()
    };
    let answer = |lora: Option<&Lora<B>>, p: &str| -> Result<String> {
        let ids = tok.encode_templated(&tok.apply_chat_template(&[Message::new("user", p)], true)?)?;
        Ok(generate(be, &model, lora, Some(&tok), &ids, &gen, &mut |_, _| true)?.text)
    };
    let before: Vec<String> = DEMO_PROMPTS.iter().map(|p| answer(None, p)).collect::<Result<_>>()?;

    let cfg = TrainConfig {
        model: "smollm2-135m-instruct".into(),
        dataset: data_path.display().to_string(),
        output_dir: out.join("run").display().to_string(),
        overwrite_output_dir: true,
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: vec!["all-linear".into()],
        max_steps: a.max_steps,
        per_device_train_batch_size: 2,
        max_seq_length: 192,
        learning_rate: 5e-4,
        logging_steps: 5,
        save_steps: 0,
        use_nested_quant: true,
        completion_only_loss: Some(true),
        ..TrainConfig::default()
    };
    let (code, outcome) = run_training(be, &model, &tok, cfg)?;
    if outcome.finish != Finish::Completed {
        return Ok(code);
    }
    let adapter = outcome.adapter_dir.expect("completed");
    let lora = peft::load_adapter(be, &model.cfg, &adapter)?;
    for (p, b) in DEMO_PROMPTS.iter().zip(&before) {
        let after = answer(Some(&lora), p)?;
        println!("\n### {p}\n--- before fine-tuning:\n{}\n--- after fine-tuning:\n{}", b.trim(), after.trim());
    }
    let merged_dir = out.join("merged");
    merge_to_dir(&Cpu::<f32>::new(), "smollm2-135m-instruct", Some(&adapter), &merged_dir, SaveDtype::F16, 5 << 30)?;
    println!("\nadapter: {}\nmerged model: {}", adapter.display(), merged_dir.display());
    Ok(ExitCode::SUCCESS)
}
