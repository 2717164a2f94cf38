//! The `llamatune` binary as a user drives it: every subcommand on a tiny model, and bad input
//! answered with a message and a non-zero exit.

mod common;

use serde_json::json;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn llamatune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llamatune")).args(args).env("MATMUL_NUM_THREADS", "1").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A tiny model and a dataset of `samples` rows in a temporary directory, for training runs.
struct TinyRun {
    dir: tempfile::TempDir,
    model: std::path::PathBuf,
    data: std::path::PathBuf,
}

impl TinyRun {
    fn new(samples: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = (dir.path().join("model"), dir.path().join("data.jsonl"));
        common::tiny_model_dir(&model, false);
        common::text_dataset(&data, samples);
        TinyRun { dir, model, data }
    }
    /// The directory `name` inside the run's temporary directory.
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    /// `llamatune train` on the tiny model and data into `out`, with `extra` flags.
    fn train(&self, out: &Path, extra: &[&str]) -> Output {
        let args = ["train", "--model", p(&self.model), "--dataset", p(&self.data), "--output-dir", p(out)];
        llamatune(&[&args[..], extra].concat())
    }
    /// A two-step `train` into `out` that must succeed: the bytes of the adapter it wrote.
    fn two_step_adapter(&self, out: &Path, extra: &[&str]) -> Vec<u8> {
        let o = self.train(out, &[&["--max-steps", "2"][..], extra].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out.join("adapter").join("adapter_model.safetensors")).unwrap()
    }
}

#[test]
fn every_subcommand_on_a_tiny_model() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    common::tiny_model_dir(&model, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 12);
    let out = d.path().join("out");
    let cfg = d.path().join("run.toml");
    std::fs::write(&cfg, "lora-r = 4\nlora_alpha = 8\nmax_seq_length = 64\nlogging_steps = 1\n").unwrap();
    let train = |extra: &[&str]| {
        let mut a =
            vec!["train", "--config", p(&cfg), "--model", p(&model), "--dataset", p(&data), "--output-dir", p(&out)];
        a.extend_from_slice(&[
            "--max-steps",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--target-modules",
            "q_proj,v_proj",
        ]);
        a.extend_from_slice(extra);
        llamatune(&a)
    };
    let o = train(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("lora_r = 4") && err.contains("resolved training config"), "{err}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    assert!(std::fs::read_to_string(out.join("log.jsonl")).unwrap().lines().count() >= 2);
    // A second run into the same directory is refused, unless asked.
    let o = train(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already holds a run"), "{}", stderr(&o));
    let o = train(&["--overwrite-output-dir"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let adapter = out.join("adapter");
    let o = llamatune(&[
        "generate",
        "--model",
        p(&model),
        "--adapter",
        p(&adapter),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = llamatune(&[
        "generate",
        "--model",
        p(&model),
        "--prompt",
        "hi",
        "--raw",
        "--do-sample",
        "--top-k",
        "5",
        "--temperature",
        "0.7",
        "--max-new-tokens",
        "3",
        "--use-4bit",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let mut child = Command::new(env!("CARGO_BIN_EXE_llamatune"))
        .args(["chat", "--model", p(&model), "--adapter", p(&adapter), "--max-new-tokens", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n/reset\nagain\n/exit\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2, "two replies");

    let merged = d.path().join("merged");
    let o = llamatune(&[
        "merge",
        "--model",
        p(&model),
        "--adapter",
        p(&adapter),
        "--output-dir",
        p(&merged),
        "--dtype",
        "bfloat16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["torch_dtype"], "bfloat16");

    let o = llamatune(&["eval", "--model", p(&merged), "--dataset", p(&data), "--max-seq-length", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["eval_loss"].as_f64().unwrap().is_finite() && v["eval_perplexity"].as_f64().unwrap() > 1.0);
}

#[test]
fn data_convert_guanaco_to_llama2() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("guanaco.jsonl");
    let rows = [
        json!({"text": "### Human: Hola### Assistant: ¡Hola! ¿Cómo estás?"}),
        json!({"text": "### Human: A### Assistant: B### Human: C### Assistant: D"}),
    ];
    std::fs::write(&input, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let output = d.path().join("llama2.jsonl");
    let o = llamatune(&["data", "convert", "--input", p(&input), "--output", p(&output)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["text"], "<s>[INST] Hola [/INST] ¡Hola! ¿Cómo estás? </s>");
    assert_eq!(lines[1]["text"], "<s>[INST] A [/INST] B </s><s>[INST] C [/INST] D </s>");
}

#[test]
fn bad_input_gets_a_message_and_a_nonzero_exit() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    common::tiny_model_dir(&model, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 4);
    let out = d.path().join("o");
    let base = ["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(&out)];

    let o = llamatune(&[&base[..], &["--lora-r", "0"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("--lora-r must be > 0"), "{}", stderr(&o));
    let o = llamatune(&[&base[..], &["--no-such-flag"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("--no-such-flag"), "{}", stderr(&o));
    let o = llamatune(&[&base[..], &["--learning-rate", "fast"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("fast"), "{}", stderr(&o));
    let o = llamatune(&[&base[..], &["--device", "tpu"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("--device"), "{}", stderr(&o));
    // NaN reached the config as JSON null, which silently kept the default learning rate.
    let o = llamatune(&[&base[..], &["--learning-rate", "nan"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("--learning-rate"), "{}", stderr(&o));
    let gen = ["generate", "--model", p(&model), "--prompt", "x", "--device", "cpu", "--do-sample"];
    let o = llamatune(&[&gen[..], &["--temperature", "0"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("--temperature"), "{}", stderr(&o));
    let o = llamatune(&[&gen[..], &["--top-p", "0"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("--top-p"), "{}", stderr(&o));

    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let o = llamatune(&base);
    assert!(!o.status.success() && stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));

    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    common::tiny_model_dir(&model, false);
    let o =
        llamatune(&["train", "--model", p(&model), "--dataset", p(&empty), "--output-dir", p(&d.path().join("o2"))]);
    assert!(!o.status.success() && stderr(&o).contains("empty"), "{}", stderr(&o));
    let o = llamatune(&["generate", "--model", p(&d.path().join("nope")), "--prompt", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("nope"), "{}", stderr(&o));

    // A one-sample dataset cannot be split for evaluation (a panic until a fuzz run found it).
    let one = d.path().join("one.jsonl");
    common::text_dataset(&one, 1);
    let o = llamatune(
        &[
            &["train", "--model", p(&model), "--dataset", p(&one), "--output-dir", p(&d.path().join("o3"))][..],
            &["--eval-split-ratio", "0.5"],
        ]
        .concat(),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--eval-split-ratio") && err.contains("one.jsonl") && !err.contains("panicked"), "{err}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    common::tiny_model_dir(&model, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 64);
    let out = d.path().join("o");
    let child = Command::new(env!("CARGO_BIN_EXE_llamatune"))
        .args([
            "train",
            "--model",
            p(&model),
            "--dataset",
            p(&data),
            "--output-dir",
            p(&out),
            "--num-train-epochs",
            "100000",
        ])
        .args(["--lora-r", "4", "--max-seq-length", "64", "--logging-steps", "1", "--per-device-train-batch-size", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then interrupt.
    let log = out.join("log.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("resume with --resume-from-checkpoint latest"), "{}", stderr(&o));
    let ckpts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 1);
    assert!(ckpts[0].path().join("adapter_model.safetensors").exists());
    assert!(!ckpts[0].file_name().to_string_lossy().ends_with(".tmp"));
}

#[test]
fn mixed_precision_flags_are_refused_on_the_cpu() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    common::tiny_model_dir(&model, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 4);
    let out = d.path().join("o");
    let o = llamatune(&["train", "--model", p(&model), "--dataset", p(&data), "--output-dir", p(&out), "--bf16"]);
    assert!(!o.status.success() && stderr(&o).contains("--fp16/--bf16"), "{}", stderr(&o));
}

#[test]
fn bench_random_model_and_conversion_without_an_adapter() {
    let d = tempfile::tempdir().unwrap();
    // A tiny shape as a config.json (the named shapes are too big for a CPU test).
    let cfg = d.path().join("shape.json");
    let shape = json!({"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 1});
    std::fs::write(&cfg, shape.to_string()).unwrap();

    let report = d.path().join("bench.json");
    let o = llamatune(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        p(&cfg),
        "--steps",
        "2",
        "--warmup-steps",
        "0",
        "--per-device-train-batch-size",
        "2",
        "--max-seq-length",
        "16",
        "--decode-tokens",
        "3",
        "--lora-r",
        "8",
        "--json",
        p(&report),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // A CPU has no bf16 tensor-core peak to count MFU against unless one is given (--peak-tflops).
    assert!(out.contains("tokens/s") && out.contains("FLOP/s") && !out.contains("MFU"), "{out}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(r["mfu"].is_null() && r["achieved_tflops"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["step_times_s"].as_array().unwrap().len(), 2);
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0 && r["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["trainable_params"], json!(2 * 8 * ((64 + 64) + (64 + 32))), "r=8 on q_proj and v_proj of 2 layers");

    let o = llamatune(&["bench", "--device", "cpu", "--shape", "llama2-70b-typo"]);
    assert!(!o.status.success() && stderr(&o).contains("llama2-70b-typo"), "{}", stderr(&o));

    // A random checkpoint of that shape, converted by `merge` without an adapter: same tensors.
    let model = d.path().join("random");
    let o = llamatune(&["debug", "random-model", "--shape", p(&cfg), "--output-dir", p(&model), "--dtype", "float32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let copy = d.path().join("copy");
    let o = llamatune(&["merge", "--model", p(&model), "--output-dir", p(&copy), "--dtype", "float32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |dir: &Path| {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> =
            st.tensors().into_iter().map(|(n, t)| (n.to_string(), t.data().to_vec())).collect();
        v.sort();
        v
    };
    assert_eq!(read(&model), read(&copy));
}

#[test]
fn parity_tools_train_curve_and_tokenize() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    common::tiny_model_dir(&model, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 8);
    let out = d.path().join("out");
    let o = llamatune(&[
        "train",
        "--model",
        p(&model),
        "--dataset",
        p(&data),
        "--output-dir",
        p(&out),
        "--max-steps",
        "1",
        "--target-modules",
        "q_proj,v_proj",
        "--lora-r",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // train-curve: the adapter as the starting point, fixed batches cycled, one loss per step.
    let batches = d.path().join("batches.json");
    std::fs::write(
        &batches,
        json!([[[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]], [[3, 4, 3, 4, 3], [4, 3, 4, 3, 4]]]).to_string(),
    )
    .unwrap();
    let curve = d.path().join("curve.json");
    let o = llamatune(&[
        "debug",
        "train-curve",
        "--model",
        p(&model),
        "--adapter",
        p(&out.join("adapter")),
        "--batches",
        p(&batches),
        "--steps",
        "6",
        "--learning-rate",
        "1e-2",
        "--output",
        p(&curve),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&curve).unwrap()).unwrap();
    let losses: Vec<f64> = c.iter().map(|e| e["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[4] < losses[0] && losses[5] < losses[1], "the same batches again, after training: {losses:?}");
    let o = llamatune(&[
        "debug",
        "train-curve",
        "--model",
        p(&model),
        "--batches",
        p(&batches),
        "--steps",
        "1",
        "--output",
        p(&curve),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--adapter"), "{}", stderr(&o));

    // tokenize: the model's template and tokenizer, as the library applies them.
    let chats = d.path().join("chats.json");
    std::fs::write(
        &chats,
        json!([{"messages": [{"role": "user", "content": "hi there"}], "add_generation_prompt": true}]).to_string(),
    )
    .unwrap();
    let toks = d.path().join("toks.json");
    let o = llamatune(&["debug", "tokenize", "--tokenizer", p(&model), "--chats", p(&chats), "--output", p(&toks)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&toks).unwrap()).unwrap();
    let tok = llamatune::tokenizer::Tokenizer::from_dir(&model).unwrap();
    let text = t[0]["text"].as_str().unwrap();
    assert!(text.contains("hi there"), "{text}");
    assert_eq!(t[0]["ids"], json!(tok.encode_templated(text).unwrap()));
}

/// AdamW's hyper-parameters go by transformers' flag names and reach the optimizer: beta1 first
/// matters at step 2 (step 1's bias-corrected moment is the gradient whatever beta1), so two steps
/// with another beta1 leave another adapter.
#[test]
fn adam_flags_reach_the_optimizer() {
    let run = TinyRun::new(8);
    let train = |out: &Path, extra: &[&str]| run.two_step_adapter(out, extra);
    let plain = train(&run.path("plain"), &[]);
    let again = train(&run.path("again"), &[]);
    assert_eq!(plain, again, "the same run twice gives the same adapter");
    let tuned = run.path("tuned");
    let other = train(&tuned, &["--adam-beta1", "0.5", "--adam-beta2", "0.99", "--adam-epsilon", "1e-6"]);
    assert_ne!(plain, other, "the flags changed nothing");
    let saved = std::fs::read_to_string(tuned.join("train_config.toml")).unwrap();
    for line in ["adam_beta1 = 0.5", "adam_beta2 = 0.99", "adam_epsilon = 0.000001"] {
        assert!(saved.contains(line), "{line} not in the saved config:\n{saved}");
    }
    let o = run.train(&run.path("bad"), &["--adam-beta2", "1"]);
    assert!(!o.status.success() && stderr(&o).contains("--adam-beta2"), "{}", stderr(&o));
}

/// transformers' `report_to` and `logging_dir`, and BitsAndBytesConfig's and TRL's flag names as aliases.
#[test]
fn report_to_logging_dir_and_bitsandbytes_names() {
    let run = TinyRun::new(4);
    let train = |out: &Path, extra: &[&str]| run.train(out, &[&["--max-steps", "1"][..], extra].concat());
    let events_in = |dir: &Path| {
        std::fs::read_dir(dir).map_or(0, |r| {
            r.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents")).count()
        })
    };

    let quiet = run.path("quiet");
    let o = train(&quiet, &["--report-to", "none", "--logging-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!quiet.join("runs").exists(), "--report-to none wrote TensorBoard runs");
    assert!(std::fs::read_to_string(quiet.join("log.jsonl")).unwrap().contains("\"loss\""), "log.jsonl still written");

    let tb = run.path("tb");
    let o = train(&run.path("logged"), &["--logging-dir", p(&tb), "--logging-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(events_in(&tb), 1, "one event file in --logging-dir");
    assert!(!run.path("logged").join("runs").exists());

    let o = train(&run.path("wandb"), &["--report-to", "wandb"]);
    assert!(!o.status.success() && stderr(&o).contains("--report-to"), "{}", stderr(&o));

    // BitsAndBytesConfig's and TRL's newer names for the same settings.
    let nested = run.path("nested");
    let o = train(&nested, &["--load-in-4bit", "--bnb-4bit-use-double-quant", "--max-length", "96"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = std::fs::read_to_string(nested.join("train_config.toml")).unwrap();
    for line in ["use_4bit = true", "use_nested_quant = true", "max_seq_length = 96"] {
        assert!(saved.contains(line), "{line} not in the saved config:\n{saved}");
    }
    let chats = run.path("chats.jsonl");
    let chat = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]});
    std::fs::write(&chats, format!("{chat}\n{chat}\n")).unwrap();
    let assistant = run.path("assistant");
    let args = ["train", "--model", p(&run.model), "--dataset", p(&chats), "--output-dir", p(&assistant)];
    let o = llamatune(&[&args[..], &["--max-steps", "1", "--assistant-only-loss"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = std::fs::read_to_string(assistant.join("train_config.toml")).unwrap();
    assert!(saved.contains("completion_only_loss = true"), "{saved}");
}

/// transformers' save and eval strategies: `epoch` acts at each epoch's end, `no` never.
#[test]
fn save_and_eval_strategies() {
    // 10 samples, 2 held out: 8 to train on, 2 steps per epoch at batch 4, 2 epochs.
    let run = TinyRun::new(10);
    let train = |name: &str, extra: &[&str]| {
        let out = run.path(name);
        let epochs = ["--num-train-epochs", "2", "--per-device-train-batch-size", "4", "--eval-split-ratio", "0.2"];
        let o = run.train(&out, &[&epochs[..], extra].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let mut checkpoints: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint-"))
            .collect();
        checkpoints.sort();
        let evals: Vec<u64> = std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("eval_loss").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        (checkpoints, evals)
    };
    let (saved, evals) = train("epoch", &["--save-strategy", "epoch", "--eval-strategy", "epoch"]);
    assert_eq!(saved, ["checkpoint-2", "checkpoint-4"]);
    assert_eq!(evals, [2, 4], "after the first epoch, and at the end");
    let (saved, evals) = train("no", &["--save-strategy", "no", "--save-steps", "1", "--eval-strategy", "no"]);
    assert!(saved.is_empty() && evals.is_empty(), "{saved:?} {evals:?}");
    let (saved, evals) = train("steps", &["--save-steps", "3", "--eval-steps", "1"]);
    assert_eq!(saved, ["checkpoint-3", "checkpoint-4"], "every 3 steps, and at the end");
    assert_eq!(evals, [1, 2, 3, 4]);
    let o = run.train(&run.path("bad"), &["--save-strategy", "best"]);
    assert!(!o.status.success() && stderr(&o).contains("--save-strategy"), "{}", stderr(&o));
}

/// TRL's and transformers' `--neftune-noise-alpha` reaches the training step (another adapter, and
/// the same one twice), is saved with the run's settings, and is refused when not positive.
#[test]
fn neftune_noise_alpha_reaches_the_step() {
    let run = TinyRun::new(8);
    let train = |out: &Path, extra: &[&str]| run.two_step_adapter(out, extra);
    let plain = train(&run.path("plain"), &[]);
    let noised = run.path("noised");
    let a = train(&noised, &["--neftune-noise-alpha", "5"]);
    assert_ne!(plain, a, "the noise changed nothing");
    assert_eq!(a, train(&run.path("again"), &["--neftune-noise-alpha", "5"]), "the same seed, the same noise");
    let saved = std::fs::read_to_string(noised.join("train_config.toml")).unwrap();
    assert!(saved.contains("neftune_noise_alpha = 5.0"), "not in the saved config:\n{saved}");
    for bad in ["0", "-1", "nan"] {
        let o = run.train(&run.path("bad"), &[&format!("--neftune-noise-alpha={bad}")]);
        assert!(!o.status.success() && stderr(&o).contains("neftune-noise-alpha"), "{bad}: {}", stderr(&o));
    }
}

/// `--gradient-checkpointing-keep-mlp N` and `--gradient-checkpointing-keep-attention N` (the MLP
/// products, attention's inputs and output, of N checkpointed layers kept for their replays) train
/// the adapter of a run without them, bit for bit, are saved with the run's settings, and are
/// refused when not a count or without gradient checkpointing.
#[test]
fn kept_products_train_the_same_adapter() {
    let run = TinyRun::new(8);
    let plain = run.two_step_adapter(&run.path("plain"), &[]);
    let kept_dir = run.path("kept");
    let flags = ["--gradient-checkpointing-keep-mlp", "1", "--gradient-checkpointing-keep-attention", "1"];
    let kept = run.two_step_adapter(&kept_dir, &flags);
    assert_eq!(plain, kept, "keeping the MLP products and attention changed the adapter");
    let saved = std::fs::read_to_string(kept_dir.join("train_config.toml")).unwrap();
    for line in ["gradient_checkpointing_keep_mlp = 1", "gradient_checkpointing_keep_attention = 1"] {
        assert!(saved.contains(line), "{line} not in the saved config:\n{saved}");
    }
    for flag in ["--gradient-checkpointing-keep-mlp", "--gradient-checkpointing-keep-attention"] {
        let o = run.train(&run.path("bad"), &[&format!("{flag}=-1")]);
        assert!(!o.status.success() && stderr(&o).contains(flag), "{}", stderr(&o));
        // Without checkpointing nothing is recomputed: the setting is refused, not ignored.
        let o = run.train(&run.path("bad2"), &["--gradient-checkpointing", "false", flag, "2"]);
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(&format!("{flag} needs --gradient-checkpointing")), "{err}");
    }
}
