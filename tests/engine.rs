//! Behaviour of the engine as a whole on tiny random models: cached decoding equals full re-runs,
//! LoRA-only training drives the loss down, merged adapters equal applied ones, and checkpoints in
//! safetensors (single and sharded) load back to the same model.

use llamatune::backend::cpu::Cpu;
use llamatune::backend::Backend;
use llamatune::config::{ComputeDtype, LoraConfig, QuantConfig, QuantType};
use llamatune::generate::{argmax, generate, GenerationConfig};
use llamatune::model::llama::{
    evaluate, forward_backward, forward_backward_with, full_logits, Batch, Checkpointing, Llama, StepOptions,
};
use llamatune::model::lora::Lora;
use llamatune::model::merge::merge;
use llamatune::model::random::{random_source, tiny_config, write_hf_dir};
use llamatune::model::weights::{SafetensorsSource, SaveDtype};
use llamatune::optim::{clip_coefficient, grad_norm, AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};

type B = Cpu<f32>;
const BE: B = Cpu::new();

fn lora_with_random_b(cfg: &llamatune::config::ModelConfig, targets: &[&str], seed: u64) -> Lora<B> {
    let lcfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..LoraConfig::default() }.with_targets(targets).unwrap();
    let mut lora = Lora::init(&BE, cfg, lcfg, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    for pair in lora.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
        pair.b.iter_mut().for_each(|x| *x = rng.gen_range(-0.5..0.5));
    }
    lora
}

/// Greedy decoding by re-running the whole sequence each step (no cache).
fn greedy_uncached(model: &Llama<B>, lora: Option<&Lora<B>>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let v = model.cfg.vocab_size;
    for _ in 0..n {
        let logits = full_logits(&BE, model, lora, &Batch::causal_lm(&[seq.clone()]));
        let last = &logits[(seq.len() - 1) * v..seq.len() * v];
        seq.push(argmax(last));
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn kv_cache_generation_equals_full_rerun_with_adapter_applied_and_merged() {
    for quant in [None, Some(QuantConfig::default())] {
        let cfg = tiny_config(false);
        let model = Llama::<B>::load(&BE, &random_source(&cfg, 3), quant).unwrap();
        let lora = lora_with_random_b(&cfg, &["q_proj", "v_proj", "down_proj"], 4);
        let prompt = [5u32, 9, 13, 2, 7];
        let gen = GenerationConfig { max_new_tokens: 12, ..GenerationConfig::default() };
        let cached = generate(&BE, &model, Some(&lora), None, &prompt, &gen, &mut |_, _| true).unwrap().tokens;
        let rerun = greedy_uncached(&model, Some(&lora), &prompt, 12);
        assert_eq!(cached, rerun, "quant={quant:?}");
        let base_only = generate(&BE, &model, None, None, &prompt, &gen, &mut |_, _| true).unwrap().tokens;
        assert_ne!(base_only, cached, "the adapter changes what is generated");
        let merged = merge(&BE, &model, &lora);
        let from_merged = generate(&BE, &merged, None, None, &prompt, &gen, &mut |_, _| true).unwrap().tokens;
        assert_eq!(from_merged, cached, "merged weights generate what the applied adapter does");
        let a = full_logits(&BE, &model, Some(&lora), &Batch::causal_lm(&[prompt.to_vec()]));
        let b = full_logits(&BE, &merged, None, &Batch::causal_lm(&[prompt.to_vec()]));
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "merged logits differ by {err}");
    }
}

/// The CPU runs each operation as it is called, so greedy decoding streams each token before it
/// computes the next step (a backend that queues work queues the step first): every interval between
/// two streamed tokens holds one decoding step, the last one too. Streamed the other way round, each
/// token would show a step late and the last two together (a near-zero last interval).
#[test]
fn cpu_greedy_decoding_streams_each_token_before_the_next_step() {
    assert!(!BE.queues_work());
    let cfg = tiny_config(false);
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 5), None).unwrap();
    let gen = GenerationConfig { max_new_tokens: 9, ..Default::default() };
    let t = std::time::Instant::now();
    let mut stamps = Vec::new();
    let out = generate(&BE, &model, None, None, &[3u32, 4, 5], &gen, &mut |_, _| {
        stamps.push(t.elapsed().as_secs_f64());
        true
    })
    .unwrap();
    assert_eq!((out.tokens.len(), stamps.len()), (9, 9));
    let gaps: Vec<f64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let last = gaps[gaps.len() - 1];
    assert!(
        last > 0.25 * median,
        "the last token streamed {last:.2e} s after the one before, a step takes ~{median:.2e} s"
    );
}

#[test]
fn stops_at_eos_and_max_new_tokens() {
    let cfg = tiny_config(true);
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 8), None).unwrap();
    let prompt = [3u32, 4];
    let free = generate(
        &BE,
        &model,
        None,
        None,
        &prompt,
        &GenerationConfig { max_new_tokens: 6, ..Default::default() },
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!(free.tokens.len(), 6);
    let eos = free.tokens[2];
    let gen = GenerationConfig { max_new_tokens: 6, eos_token_ids: vec![eos], ..Default::default() };
    let out = generate(&BE, &model, None, None, &prompt, &gen, &mut |_, _| true).unwrap();
    let first = free.tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!(out.tokens, free.tokens[..=first].to_vec());
    let gen = GenerationConfig { max_new_tokens: 100, max_length: Some(5), ..Default::default() };
    assert_eq!(generate(&BE, &model, None, None, &prompt, &gen, &mut |_, _| true).unwrap().tokens.len(), 3);
}

#[test]
fn lora_only_training_drives_the_loss_down() {
    let cfg = tiny_config(false);
    let nf4 = QuantConfig {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
        compute_dtype: ComputeDtype::BF16,
    };
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 21), Some(nf4)).unwrap();
    let lcfg =
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, ..LoraConfig::default() }.with_targets(&["all-linear"]).unwrap();
    let mut lora = Lora::init(&BE, &cfg, lcfg, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let rows: Vec<Vec<u32>> =
        (0..2).map(|_| (0..10).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect()).collect();
    let batch = Batch::causal_lm(&rows);
    let mut opt = AdamW::new(&BE, &lora, AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() });
    let first = evaluate(&BE, &model, Some(&lora), &batch).mean();
    for step in 0..80 {
        let mut grads = lora.zero_grads(&BE);
        let n = batch.num_targets() as f32;
        forward_backward(&BE, &model, &lora, &mut grads, &batch, 1.0 / n, Some(step), true);
        let coef = clip_coefficient(grad_norm(&BE, &grads), 1.0);
        opt.update(&BE, &mut lora, &grads, 1e-2, coef as f32);
    }
    let last = evaluate(&BE, &model, Some(&lora), &batch).mean();
    assert!(last < first / 10.0, "loss {first} -> {last}");
    // The frozen base did not move: with B reset to zero the loss is back to the start.
    for pair in lora.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
        pair.b.iter_mut().for_each(|x| *x = 0.0);
    }
    assert!((evaluate(&BE, &model, Some(&lora), &batch).mean() - first).abs() < 1e-6);
}

#[test]
fn safetensors_checkpoints_round_trip_single_and_sharded() {
    let cfg = tiny_config(false);
    let src = random_source(&cfg, 30);
    let reference = Llama::<B>::load(&BE, &src, None).unwrap();
    let batch = Batch::causal_lm(&[vec![1, 2, 3, 4, 5, 6]]);
    let want = full_logits(&BE, &reference, None, &batch);
    let dir = tempfile::tempdir().unwrap();
    for (name, dtype, tol) in [("f32", SaveDtype::F32, 1e-6), ("bf16", SaveDtype::BF16, 0.1)] {
        let d = dir.path().join(name);
        write_hf_dir(&src, &d, dtype).unwrap();
        let m = Llama::<B>::load(&BE, &SafetensorsSource::open(&d).unwrap(), None).unwrap();
        let got = full_logits(&BE, &m, None, &batch);
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= tol, "{name}: max logit error {err}");
    }
    // Sharded: split the tensors over two files and an index.
    let d = dir.path().join("sharded");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), serde_json::to_string(&cfg.to_json()).unwrap()).unwrap();
    let names: Vec<&String> = src.tensors.keys().collect();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let tensors: Vec<_> = chunk.iter().map(|n| ((*n).clone(), src.tensors[*n].clone())).collect();
        llamatune::model::weights::write_safetensors(&d.join(&file), &tensors, SaveDtype::F32, None).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({"weight_map": weight_map}).to_string())
        .unwrap();
    let m = Llama::<B>::load(&BE, &SafetensorsSource::open(&d).unwrap(), None).unwrap();
    assert_eq!(full_logits(&BE, &m, None, &batch), want);
    let _ = BE.name();
}

/// A recorded decoder layer keeps only the values its backward reads (what PyTorch's autograd saves):
/// the layer's input and the MLP's input for the norms, the attention norm's output for the q/v LoRA
/// branches and their `u`, q and k after RoPE, v, the attention output and its log-sum-exp, gate and
/// up, the two norms' row statistics, and the output. Pre-RoPE q and k, the o and down outputs, the
/// MLP norm's output and the SwiGLU output are dropped as soon as the forward pass is done with them,
/// since no LoRA branch reads them. After backward only the input whose gradient was asked for is left.
/// Backward's replay of a checkpointed layer holds the same values but the output, which it never
/// makes, and gives the same gradients.
#[test]
fn a_recorded_layer_keeps_only_what_its_backward_reads() {
    use llamatune::model::llama::Graph;
    use llamatune::tape::Tape;
    let cfg = tiny_config(false);
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 5), None).unwrap();
    let (batch, seq) = (2, 7);
    let rows: Vec<Vec<u32>> = (0..batch).map(|b| (0..seq).map(|i| (3 + 5 * b + i) as u32).collect()).collect();
    let batch_in = Batch::causal_lm(&rows);
    let (h, kv, inter) = (cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size);
    let m = batch * seq;
    for (targets, kept_by_lora) in [
        (&["q_proj", "v_proj"][..], 0),
        // LoRA on the MLP also keeps the MLP norm's output (gate/up's input) and the SwiGLU output (down's).
        (&["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"][..], m * h + m * inter),
    ] {
        let lora = lora_with_random_b(&cfg, targets, 6);
        let r = lora.cfg.r;
        let g = Graph::new(&BE, &model, Some(&lora), &batch_in, Some(9), false);
        let mut tape = Tape::<B>::new(true);
        let mut x0 = BE.zeros(m * h);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        x0.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0));
        let x = tape.put(x0.clone());
        let y = g.layer_forward(&mut tape, 0, x);
        let saved = m * h // layer input
            + m * h // attention norm output (q, v LoRA)
            + m * h + 2 * m * kv // q, k after RoPE; v
            + m * h + batch * cfg.num_attention_heads * seq // attention output, log-sum-exp
            + m * h // MLP input
            + 2 * m * inter // gate, up
            + 2 * m // the norms' 1/rms
            + targets.len() * m * r // each LoRA branch's u
            + m * h; // the layer output
        assert_eq!(tape.live_elements(&BE), saved + kept_by_lora, "targets {targets:?}");
        let mut grads = lora.zero_grads(&BE);
        let dy = (0..m * h).map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0).collect::<Vec<f32>>();
        let dx = tape.backward(&g, &mut grads, Some((y, dy.clone())), &[x]);
        assert_eq!(dx[0].len(), m * h);
        assert!(dx[0].iter().any(|&v| v != 0.0));
        assert_eq!(tape.live_elements(&BE), m * h + m * h, "the input (asked for) and the output are left");

        // Backward's replay of the layer (checkpointing) holds the same values except the output, which
        // it never makes (the next checkpoint has it), and gives the same gradients bit for bit.
        let mut replay = Tape::<B>::new(true);
        let x = replay.put(x0);
        let y = g.layer_replay(&mut replay, 0, x);
        assert_eq!(replay.live_elements(&BE), saved + kept_by_lora - m * h, "targets {targets:?}");
        let mut replay_grads = lora.zero_grads(&BE);
        let replay_dx = replay.backward(&g, &mut replay_grads, Some((y, dy)), &[x]);
        assert_eq!(replay_dx[0], dx[0]);
        for (a, b) in grads.bufs().iter().zip(replay_grads.bufs()) {
            assert_eq!(*a, b, "targets {targets:?}");
        }
    }
}

/// A checkpointed layer's first pass (`Tape::keeping` with `ReplayKeeps::lora_us`) keeps every LoRA
/// branch's u, and the layer's replay reads them instead of running the A products again: from the
/// kept values the gradients are the plain tape's bit for bit; with down's kept u doubled, down's dB
/// doubles exactly (dB = scale · dyᵀ · u, and a replay reads down's u nowhere else) and every other
/// gradient stays.
#[test]
fn a_replay_reads_the_lora_u_its_first_pass_kept() {
    use llamatune::model::llama::Graph;
    use llamatune::model::lora::Proj;
    use llamatune::tape::{ReplayKeeps, Tape};
    let cfg = tiny_config(false);
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 15), None).unwrap();
    let rows: Vec<Vec<u32>> = (0..2).map(|b| (0..9).map(|i| (4 + 3 * b + i) as u32).collect()).collect();
    let batch_in = Batch::causal_lm(&rows);
    let (m, h) = (2 * 9, cfg.hidden_size);
    let mut lora = lora_with_random_b(&cfg, &["all-linear"], 16);
    lora.cfg.dropout = 0.1;
    let r = lora.cfg.r;
    let g = Graph::new(&BE, &model, Some(&lora), &batch_in, Some(17), true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let x0: Vec<f32> = (0..m * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let dy: Vec<f32> = (0..m * h).map(|_| rng.gen_range(-1.0..1.0)).collect();

    let mut plain = Tape::<B>::new(true);
    let x = plain.put(x0.clone());
    let y = g.layer_forward(&mut plain, 0, x);
    let mut want = lora.zero_grads(&BE);
    plain.backward(&g, &mut want, Some((y, dy.clone())), &[x]);

    let replayed = |down_factor: f32| {
        let mut first = Tape::<B>::keeping(ReplayKeeps { lora_us: true, ..ReplayKeeps::default() });
        let x = first.put(x0.clone());
        g.layer_forward(&mut first, 0, x);
        let mut u = first.take_lora_u(0, Proj::Down).expect("down's u kept");
        u.iter_mut().for_each(|v| *v *= down_factor);
        assert!(first.keep_lora_u(0, Proj::Down, u).is_none(), "a first pass keeps u");
        let mut replay = Tape::<B>::new(true);
        replay.adopt_kept(&mut first, Some(0));
        assert_eq!(replay.live_elements(&BE), 7 * m * r, "one u per projection");
        let x = replay.put(x0.clone());
        let y = g.layer_replay(&mut replay, 0, x);
        let mut grads = lora.zero_grads(&BE);
        replay.backward(&g, &mut grads, Some((y, dy.clone())), &[x]);
        grads
    };
    let same = replayed(1.0);
    for (a, b) in want.bufs().iter().zip(same.bufs()) {
        assert_eq!(*a, b);
    }
    let doubled = replayed(2.0);
    for p in Proj::ALL {
        let (w, d) = (want.layers[0][p as usize].as_ref().unwrap(), doubled.layers[0][p as usize].as_ref().unwrap());
        assert_eq!(w.a, d.a, "{p:?} dA");
        if p == Proj::Down {
            assert!(w.b.iter().any(|&v| v != 0.0));
            assert_eq!(w.b.iter().map(|v| 2.0 * v).collect::<Vec<f32>>(), d.b, "down's dB from the doubled u");
        } else {
            assert_eq!(w.b, d.b, "{p:?} dB");
        }
    }
}

/// NEFTune (`neftune_noise_alpha`): a training pass adds noise uniform on ±α/√(L·d) to the embeddings,
/// drawn from the step's seed. The same step twice gives the same loss and gradients, another seed or
/// no noise different ones; checkpointed replays start from the noised embeddings (the same gradients
/// with checkpointing on and off, bit for bit); a pass without a seed (evaluation) adds none.
#[test]
fn neftune_noise_is_seeded_replayed_and_training_only() {
    let cfg = tiny_config(false);
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 31), None).unwrap();
    let lora = lora_with_random_b(&cfg, &["q_proj", "v_proj"], 32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    let rows: Vec<Vec<u32>> =
        (0..2).map(|_| (0..12).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect()).collect();
    let batch = Batch::causal_lm(&rows);
    let step = |dropout_seed: Option<u64>, neftune_noise_alpha: Option<f32>, checkpointing: Checkpointing| {
        let mut grads = lora.zero_grads(&BE);
        let opts = StepOptions {
            dropout_seed,
            checkpointing,
            neftune_noise_alpha,
            keep_mlp_layers: 0,
            keep_attention_layers: 0,
        };
        let l = forward_backward_with(&BE, &model, &lora, &mut grads, &batch, 1.0, opts);
        (l.loss_sum, grads.bufs().iter().flat_map(|b| b.iter().copied()).collect::<Vec<f32>>())
    };
    let plain = step(Some(7), None, Checkpointing::Off);
    let noised = step(Some(7), Some(5.0), Checkpointing::Off);
    assert_ne!(plain.0, noised.0, "the noise changes the loss");
    assert_eq!(noised, step(Some(7), Some(5.0), Checkpointing::Off), "the same seed draws the same noise");
    assert_ne!(noised.1, step(Some(8), Some(5.0), Checkpointing::Off).1, "another seed, another draw");
    assert_eq!(noised, step(Some(7), Some(5.0), Checkpointing::OnDevice), "replays see the noised embeddings");
    assert_eq!(step(None, Some(5.0), Checkpointing::Off), step(None, None, Checkpointing::Off), "no seed, no noise");
    assert_eq!(evaluate(&BE, &model, Some(&lora), &batch).loss_sum, step(None, None, Checkpointing::Off).0);
}

/// The noise itself: uniform on [-m, m) (all of the range used, mean ~0, variance ~m²/3), added to
/// what the buffer holds.
#[test]
fn uniform_noise_covers_its_range_evenly() {
    let (n, m) = (64 * 1031, 0.25f32);
    let mut buf = vec![1.0f32; n];
    BE.add_uniform_noise(&mut buf, m, 99);
    let noise: Vec<f64> = buf.iter().map(|&x| x as f64 - 1.0).collect();
    assert!(noise.iter().all(|&e| e.abs() <= m as f64 + 1e-6), "noise outside ±{m}");
    let max = noise.iter().fold(0f64, |a, &e| a.max(e.abs()));
    let mean = noise.iter().sum::<f64>() / n as f64;
    let var = noise.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n as f64;
    let want_var = (m as f64).powi(2) / 3.0;
    assert!(max > 0.99 * m as f64, "largest |noise| {max} of {m}");
    assert!(mean.abs() < 0.01 * m as f64, "mean {mean}");
    assert!((var - want_var).abs() < 0.02 * want_var, "variance {var}, uniform's {want_var}");
}

/// The cache's one-token step reads its token and position on the device: greedy steps chained on
/// the device's own choices (`StepToken::Chosen`, queued before the host reads them) give the
/// tokens of steps fed from the host, one-token steps after a prompt step in the middle of a
/// sequence still see every position (the position held on the device is set again), and a chain
/// cannot start without a choice on the device nor take a token outside the vocab.
#[test]
fn one_token_steps_read_their_token_and_position_on_the_device() {
    use llamatune::model::llama::{decode_step, decode_step_argmax, decode_step_greedy_launch, KvCache, StepToken};
    let cfg = tiny_config(false);
    let model = Llama::<B>::load(&BE, &random_source(&cfg, 11), Some(QuantConfig::default())).unwrap();
    let lora = lora_with_random_b(&cfg, &["q_proj", "v_proj"], 12);
    let prompt = [4u32, 8, 15, 16, 23];
    let want = greedy_uncached(&model, Some(&lora), &prompt, 9);

    let mut cache = KvCache::new(&BE, &cfg, 16);
    let first = decode_step_argmax(&BE, &model, Some(&lora), &mut cache, &prompt).unwrap();
    let mut queued =
        vec![decode_step_greedy_launch(&BE, &model, Some(&lora), &mut cache, StepToken::Host(first)).unwrap()];
    for _ in 0..7 {
        queued.push(decode_step_greedy_launch(&BE, &model, Some(&lora), &mut cache, StepToken::Chosen).unwrap());
    }
    let mut chained = vec![first];
    chained.extend(queued.into_iter().map(|p| BE.read_wait(p)[0] as u32));
    assert_eq!(chained, want[..9], "chained greedy steps equal the uncached re-run");
    assert_eq!(cache.len, prompt.len() + 8);

    // Host tokens, a three-token step in between, then host tokens again: every step's logits are
    // the full re-run's at its position.
    let seq: Vec<u32> = [&prompt[..], &[7, 1, 30, 2, 9, 14, 3]].concat();
    let full = full_logits(&BE, &model, Some(&lora), &Batch::causal_lm(std::slice::from_ref(&seq)));
    let v = cfg.vocab_size;
    let mut cache = KvCache::new(&BE, &cfg, 16);
    let mut at = 0;
    for n in [5, 1, 1, 3, 1, 1] {
        let logits = decode_step(&BE, &model, Some(&lora), &mut cache, &seq[at..at + n]).unwrap();
        at += n;
        let reference = &full[(at - 1) * v..at * v];
        let err = logits.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "step ending at position {} differs from the re-run by {err}", at - 1);
    }

    let mut fresh = KvCache::new(&BE, &cfg, 16);
    decode_step(&BE, &model, None, &mut fresh, &prompt).unwrap();
    let err = decode_step_greedy_launch(&BE, &model, None, &mut fresh, StepToken::Chosen).err().unwrap();
    assert!(err.to_string().contains("no greedy choice"), "{err}");
    let err = decode_step(&BE, &model, None, &mut fresh, &[cfg.vocab_size as u32]).unwrap_err();
    assert!(err.to_string().contains("outside the model's vocab"), "{err}");
    assert_eq!(fresh.len, prompt.len(), "refused steps leave the cache as it was");
}
