//! Embedding llamatune in a Rust program: load a model, fine-tune LoRA adapters with a progress
//! callback, generate with the adapter, merge it and write a Hugging Face model directory.
//!
//! `cargo run --release --example embed` uses a tiny random model written to a temporary directory
//! (no download); `cargo run --release --example embed -- smollm2-135m-instruct data.jsonl` trains a
//! real model on your data.

use llamatune::backend::cpu::Cpu;
use llamatune::generate::{generate, GenerationConfig};
use llamatune::io::{export, peft};
use llamatune::model::llama::Llama;
use llamatune::model::merge::merge;
use llamatune::model::random::{byte_tokenizer_json, random_source, tiny_config, write_hf_dir};
use llamatune::model::weights::SaveDtype;
use llamatune::tokenizer::Message;
use llamatune::train::{train_from_config, Event, TrainConfig};
use std::sync::atomic::AtomicBool;

fn main() -> llamatune::Result<()> {
    let tmp = std::env::temp_dir().join(format!("llamatune-embed-{}", std::process::id()));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, dataset) = match args.as_slice() {
        [m, d] => (m.clone(), d.clone()),
        _ => {
            // A tiny random Llama whose tokenizer is a byte-level BPE of 256 + 3 tokens.
            let dir = tmp.join("model");
            let mut cfg = tiny_config(false);
            cfg.vocab_size = 259;
            cfg.bos_token_id = Some(0);
            cfg.eos_token_ids = vec![1];
            write_hf_dir(&random_source(&cfg, 1), &dir, SaveDtype::F32)?;
            std::fs::write(dir.join("tokenizer.json"), byte_tokenizer_json().to_string())
                .map_err(|e| llamatune::Error::io(&dir, e))?;
            let tc = r#"{"bos_token": "<s>", "eos_token": "</s>"}"#;
            std::fs::write(dir.join("tokenizer_config.json"), tc).map_err(|e| llamatune::Error::io(&dir, e))?;
            let data = tmp.join("data.jsonl");
            let rows: String = (0..32)
                .map(|i| format!("{{\"text\": \"<s>[INST] count to {} [/INST] {} </s>\"}}\n", i % 5, "1 2 3 4 5"))
                .collect();
            std::fs::write(&data, rows).map_err(|e| llamatune::Error::io(&data, e))?;
            (dir.display().to_string(), data.display().to_string())
        }
    };

    let be = Cpu::<f32>::new();
    let cfg = TrainConfig {
        model: model.clone(),
        dataset,
        output_dir: tmp.join("run").display().to_string(),
        max_steps: 8,
        lora_r: 8,
        learning_rate: 1e-2,
        logging_steps: 2,
        max_seq_length: 128,
        ..TrainConfig::default()
    };
    let outcome = train_from_config(&be, cfg, &AtomicBool::new(false), &mut |e| match e {
        Event::Step { step, total_steps, loss, .. } => println!("step {step}/{total_steps}: loss {loss:.4}"),
        Event::Checkpoint { dir, .. } => println!("checkpoint: {}", dir.display()),
        _ => {}
    })?;
    let adapter_dir = outcome.adapter_dir.expect("a completed run saves its adapter");

    let (files, tok) = llamatune::load::open(&model)?;
    let base = Llama::load(&be, files.source(), None)?;
    let lora = peft::load_adapter(&be, &base.cfg, &adapter_dir)?;
    let prompt = tok.apply_chat_template(&[Message::new("user", "count to 3")], true)?;
    let ids = tok.encode_templated(&prompt)?;
    let gen = GenerationConfig {
        max_new_tokens: 16,
        eos_token_ids: tok.eos_id().into_iter().collect(),
        ..Default::default()
    };
    let reply = generate(&be, &base, Some(&lora), Some(&tok), &ids, &gen, &mut |_, _| true)?;
    println!("reply: {:?}", reply.text);

    let merged = merge(&be, &base, &lora);
    let out = tmp.join("merged");
    export::write_model_dir(&be, &merged, Some(&tok), &out, SaveDtype::F16, 1 << 30)?;
    println!("merged model: {}", out.display());
    Ok(())
}
