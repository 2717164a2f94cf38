//! The fine-tuning workflow end to end on a tiny random model: train → checkpoint → resume (equal
//! loss curve) → merge (equal logits) → generate → train the merged model again; TensorBoard read-back;
//! NaN steps skipped; bad configurations refused.

mod common;

use llamatune::backend::cpu::Cpu;
use llamatune::io::{checkpoint, export, peft, tensorboard};
use llamatune::load;
use llamatune::model::llama::{full_logits, Batch, Llama};
use llamatune::model::merge::merge;
use llamatune::model::weights::SaveDtype;
use llamatune::train::data::load_train_data;
use llamatune::train::{Event, Finish, TrainConfig, Trainer};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

type B = Cpu<f32>;
const BE: B = Cpu::new();

fn config(model: &Path, data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        dataset: data.display().to_string(),
        output_dir: out.display().to_string(),
        lora_r: 4,
        lora_alpha: 8.0,
        target_modules: vec!["all-linear".into()],
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        max_steps: 6,
        learning_rate: 5e-3,
        warmup_steps: 1,
        logging_steps: 1,
        save_steps: 2,
        max_seq_length: 64,
        eval_split_ratio: 0.2,
        eval_steps: Some(3),
        ..TrainConfig::default()
    }
}

/// Trains with `cfg`; raises the stop flag after `stop_after` steps if given.
fn run(cfg: TrainConfig, stop_after: Option<usize>) -> (Vec<f64>, Finish) {
    let (files, tok) = load::open(&cfg.model).unwrap();
    let model = Llama::<B>::load(&BE, files.source(), cfg.quant_config().unwrap()).unwrap();
    let (data, _) = load_train_data(&cfg, &tok).unwrap();
    let mut t = Trainer::new(&BE, &model, cfg, &data).unwrap();
    let stop = AtomicBool::new(false);
    let out = t
        .run(&data, &stop, &mut |e| {
            if let (Event::Step { step, .. }, Some(n)) = (&e, stop_after) {
                if *step == n {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
    (out.step_losses, out.finish)
}

#[test]
fn train_checkpoint_resume_merge_generate() {
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("model");
    common::tiny_model_dir(&model_dir, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 24);

    // Uninterrupted run.
    let out_a = d.path().join("a");
    let (losses_a, fin) = run(config(&model_dir, &data, &out_a), None);
    assert_eq!(fin, Finish::Completed);
    assert_eq!(losses_a.len(), 6);
    assert!(losses_a.iter().all(|l| l.is_finite()));
    assert_eq!(checkpoint::list(&out_a).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 4, 6]);

    // Interrupted after step 3 (a checkpoint is saved), then resumed from the latest checkpoint.
    let out_b = d.path().join("b");
    let (first, fin) = run(config(&model_dir, &data, &out_b), Some(3));
    assert_eq!(fin, Finish::Interrupted);
    assert_eq!(first, losses_a[..3].to_vec());
    assert!(out_b.join("checkpoint-3").exists());
    // Without --resume the directory is refused.
    let (files, tok) = load::open(&model_dir.display().to_string()).unwrap();
    let model = Llama::<B>::load(&BE, files.source(), None).unwrap();
    let cfg = config(&model_dir, &data, &out_b);
    let (td, _) = load_train_data(&cfg, &tok).unwrap();
    let e = Trainer::new(&BE, &model, cfg, &td).err().unwrap().to_string();
    assert!(e.contains("already holds a run"), "{e}");
    let resumed = TrainConfig { resume_from_checkpoint: Some("latest".into()), ..config(&model_dir, &data, &out_b) };
    let (rest, fin) = run(resumed, None);
    assert_eq!(fin, Finish::Completed);
    assert_eq!(rest, losses_a[3..].to_vec(), "resumed loss curve equals the uninterrupted one");

    // paged_adamw_32bit over its memory budget keeps the state in host memory: same numbers.
    let out_p = d.path().join("paged");
    let paged = TrainConfig { optim_memory_budget_mb: Some(0.0), ..config(&model_dir, &data, &out_p) };
    let (losses_p, _) = run(paged, None);
    assert_eq!(losses_p, losses_a, "paged optimizer state changes nothing but where it lives");
    let (first_p, _) = run(
        TrainConfig { optim_memory_budget_mb: Some(0.0), ..config(&model_dir, &data, &d.path().join("pb")) },
        Some(3),
    );
    let (rest_p, _) = run(
        TrainConfig {
            optim_memory_budget_mb: Some(0.0),
            resume_from_checkpoint: Some("latest".into()),
            ..config(&model_dir, &data, &d.path().join("pb"))
        },
        None,
    );
    assert_eq!([first_p, rest_p].concat(), losses_a, "paged state survives a checkpoint");

    // The final adapters of both runs are identical files' worth of numbers.
    let lora_a = peft::load_adapter(&BE, &model.cfg, &out_a.join("adapter")).unwrap();
    let lora_b = peft::load_adapter(&BE, &model.cfg, &out_b.join("adapter")).unwrap();
    for ((_, x), (_, y)) in lora_a.named_params().iter().zip(lora_b.named_params()) {
        assert_eq!(*x, y);
    }

    // TensorBoard read-back: every logged step has train/loss, eval scalars exist.
    let run_dir = std::fs::read_dir(out_a.join("runs")).unwrap().next().unwrap().unwrap().path();
    let ev = std::fs::read_dir(&run_dir).unwrap().next().unwrap().unwrap().path();
    let scalars = tensorboard::read_scalars(&ev).unwrap();
    for step in 1..=6i64 {
        assert!(scalars.iter().any(|(s, t, _)| *s == step && t == "train/loss"), "step {step}");
    }
    for tag in [
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/peak_memory_gib",
        "eval/loss",
        "eval/perplexity",
    ] {
        assert!(scalars.iter().any(|(_, t, _)| t == tag), "missing {tag}");
    }
    let tb_loss: Vec<f32> = scalars.iter().filter(|(_, t, _)| t == "train/loss").map(|(_, _, v)| *v).collect();
    assert_eq!(tb_loss, losses_a.iter().map(|&l| l as f32).collect::<Vec<_>>());

    // Merge: the merged model directory gives base+adapter's logits.
    let merged_dir = d.path().join("merged");
    let merged = merge(&BE, &model, &lora_a);
    export::write_model_dir(&BE, &merged, Some(&tok), &merged_dir, SaveDtype::F32, 20_000).unwrap();
    assert!(merged_dir.join("model.safetensors.index.json").exists(), "small shard size forces sharding");
    for f in
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    {
        assert!(merged_dir.join(f).exists(), "{f}");
    }
    let (mfiles, mtok) = load::open(&merged_dir.display().to_string()).unwrap();
    let reloaded = Llama::<B>::load(&BE, mfiles.source(), None).unwrap();
    let ids = mtok.encode("<s>[INST] question 3: what is 3 plus 3? [/INST]", false).unwrap();
    let batch = Batch::causal_lm(std::slice::from_ref(&ids));
    let want = full_logits(&BE, &model, Some(&lora_a), &batch);
    let got = full_logits(&BE, &reloaded, None, &batch);
    let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-4, "merged logits differ by {err}");
    let gen = llamatune::generate::GenerationConfig { max_new_tokens: 5, ..Default::default() };
    let a = llamatune::generate::generate(&BE, &model, Some(&lora_a), None, &ids, &gen, &mut |_, _| true).unwrap();
    let b = llamatune::generate::generate(&BE, &reloaded, None, None, &ids, &gen, &mut |_, _| true).unwrap();
    assert_eq!(a.tokens, b.tokens);

    // A merged model can be trained further.
    let again = TrainConfig { max_steps: 2, save_steps: 0, ..config(&merged_dir, &data, &d.path().join("c")) };
    let (l, fin) = run(again, None);
    assert_eq!((l.len(), fin), (2, Finish::Completed));
}

#[test]
fn nan_steps_are_skipped_then_training_stops_keeping_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("model");
    common::tiny_model_dir(&model_dir, true);
    let data_path = d.path().join("data.jsonl");
    common::text_dataset(&data_path, 16);
    let out = d.path().join("o");
    let base = TrainConfig {
        max_steps: 2,
        save_steps: 2,
        max_bad_steps: 3,
        eval_split_ratio: 0.0,
        eval_steps: None,
        ..config(&model_dir, &data_path, &out)
    };
    let (l, fin) = run(base.clone(), None);
    assert_eq!((l.len(), fin), (2, Finish::Completed));

    let cfg = TrainConfig { max_steps: 20, resume_from_checkpoint: Some("latest".into()), ..base };
    let (files, tok) = load::open(&cfg.model).unwrap();
    let model = Llama::<B>::load(&BE, files.source(), None).unwrap();
    let (data, _) = load_train_data(&cfg, &tok).unwrap();
    let mut t = Trainer::new(&BE, &model, cfg, &data).unwrap();
    assert_eq!(t.state.global_step, 2);
    t.lora.params_mut()[1][0] = f32::NAN; // a LoRA B entry: every forward is now NaN
    let mut skipped = Vec::new();
    let err = t
        .run(&data, &AtomicBool::new(false), &mut |e| {
            if let Event::Skipped { step, reason } = e {
                assert!(reason.contains("non-finite"), "{reason}");
                skipped.push(step);
            }
        })
        .expect_err("training stops")
        .to_string();
    assert!(err.contains("3 steps in a row") && err.contains("checkpoint"), "{err}");
    assert_eq!(skipped, vec![3, 4, 5]);
    let kept: Vec<usize> = checkpoint::list(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(kept, vec![2], "the last good checkpoint is kept and nothing bad was saved");
    let (lora, _, _) = checkpoint::load(&BE, &out.join("checkpoint-2"), &model.cfg, None).unwrap();
    assert!(lora.named_params().iter().all(|(_, b)| b.iter().all(|x| x.is_finite())));
}

#[test]
fn resolved_config_is_saved_in_the_output_dir() {
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("model");
    common::tiny_model_dir(&model_dir, false);
    let data = d.path().join("data.jsonl");
    common::text_dataset(&data, 8);
    let out = d.path().join("o");
    let cfg = TrainConfig {
        max_steps: 1,
        save_steps: 0,
        eval_split_ratio: 0.0,
        eval_steps: None,
        ..config(&model_dir, &data, &out)
    };
    run(cfg.clone(), None);
    let saved = std::fs::read_to_string(out.join("train_config.toml")).unwrap();
    let back =
        TrainConfig::resolve(None, serde_json::to_value(toml::from_str::<toml::Value>(&saved).unwrap()).unwrap())
            .unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn token_ids_outside_the_vocab_are_refused_before_training() {
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("model");
    common::tiny_model_dir(&model_dir, false);
    let data_path = d.path().join("data.jsonl");
    common::text_dataset(&data_path, 4);
    let cfg =
        TrainConfig { eval_split_ratio: 0.0, eval_steps: None, ..config(&model_dir, &data_path, &d.path().join("o")) };
    let (files, tok) = load::open(&cfg.model).unwrap();
    let model = Llama::<B>::load(&BE, files.source(), None).unwrap();
    let (mut data, _) = load_train_data(&cfg, &tok).unwrap();
    data.train.samples[1].input_ids[2] = common::VOCAB as u32 + 5;
    let e = Trainer::new(&BE, &model, cfg, &data).err().unwrap().to_string();
    assert!(e.contains("token id 264") && e.contains("vocab_size is 259"), "{e}");
    let gen = llamatune::generate::GenerationConfig::default();
    let e = llamatune::generate::generate(&BE, &model, None, None, &[1, 999], &gen, &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("999"), "{e}");
}
