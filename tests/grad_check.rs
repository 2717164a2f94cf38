//! Finite-difference checks (in f64) of every op's backward and of the whole model's LoRA
//! gradients, plus checkpointed (on the device or offloaded) == non-checkpointed backward.

use llamatune::backend::cpu::Cpu;
use llamatune::backend::{AttnShape, Backend, Dropout, HostWeight, RopeTables};
use llamatune::config::{ComputeDtype, LoraConfig, ModelConfig, QuantConfig, QuantType};
use llamatune::model::llama::{forward_backward, Batch, Checkpointing, Graph, Llama};
use llamatune::model::lora::Lora;
use llamatune::model::random::{random_source, tiny_config};
use llamatune::quant::Quant4;
use llamatune::tape::Tape;
use rand::{Rng, SeedableRng};

type B = Cpu<f64>;
const BE: B = Cpu::new();
const EPS: f64 = 1e-6;
/// Central differences in f64 agree with exact gradients to ~1e-9 relative; 1e-6 leaves room for
/// curvature while still catching any wrong term.
const TOL: f64 = 1e-6;

fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(b.iter().map(|x| x * x).sum::<f64>().sqrt());
    num / den.max(1e-30)
}

/// Numeric gradient of `f` at `x` (central differences, every coordinate).
fn numeric_grad(x: &[f64], mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + EPS;
            let fp = f(&xp);
            xp[i] = orig - EPS;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * EPS)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn check(name: &str, analytic: &[f64], numeric: &[f64]) {
    let e = rel_err(analytic, numeric);
    assert!(e < TOL, "{name}: relative error {e:e}");
    assert!(analytic.iter().any(|v| v.abs() > 1e-8), "{name}: gradient is all zeros, the check proves nothing");
}

#[test]
fn rmsnorm_backward() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (m, d) = (3, 7);
    let x = rand_vec(&mut rng, m * d);
    let w = rand_vec(&mut rng, d);
    let dy = rand_vec(&mut rng, m * d);
    let f = |x: &[f64]| {
        let mut out = vec![0.0; m * d];
        let mut r = vec![0.0; m];
        BE.rmsnorm(&x.to_vec(), &w, d, 1e-5, &mut out, &mut r);
        dot(&out, &dy)
    };
    let mut out = vec![0.0; m * d];
    let mut r = vec![0.0; m];
    BE.rmsnorm(&x, &w, d, 1e-5, &mut out, &mut r);
    let mut dx = vec![0.0; m * d];
    BE.rmsnorm_backward(&x, &w, &r, &dy, d, &mut dx, false);
    check("rmsnorm dx", &dx, &numeric_grad(&x, f));
}

fn linear_case(weight: HostWeight) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (rows, cols) = weight.shape();
    let w = BE.upload_weight(weight);
    let m = 5;
    let x = rand_vec(&mut rng, m * cols);
    let dy = rand_vec(&mut rng, m * rows);
    let f = |x: &[f64]| {
        let mut y = vec![0.0; m * rows];
        BE.linear(&x.to_vec(), &w, m, &mut y);
        dot(&y, &dy)
    };
    let mut dx = vec![7.0; m * cols]; // poisoned: accumulate=false must overwrite
    BE.linear_backward_input(&dy, &w, m, &mut dx, false);
    check("linear dx", &dx, &numeric_grad(&x, f));
}

#[test]
fn linear_backward_dense_and_4bit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (rows, cols) = (9, 13);
    let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    linear_case(HostWeight::Dense { rows, cols, data: data.clone() });
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        let q = Quant4::quantize(
            &data,
            &QuantConfig { quant_type, blocksize: 64, double_quant: true, ..QuantConfig::default() },
        );
        linear_case(HostWeight::Quant4 { rows, cols, q, compute: ComputeDtype::F32 });
    }
}

#[test]
fn lora_backward_with_dropout() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (m, cols, rows, r) = (4, 6, 5, 3);
    let scale = 0.7f32;
    let dropout = Dropout { p: 0.3, seed: 99 };
    let x = rand_vec(&mut rng, m * cols);
    let a = rand_vec(&mut rng, r * cols);
    let b = rand_vec(&mut rng, rows * r);
    let dy = rand_vec(&mut rng, m * rows);
    let run = |x: &[f64], a: &[f64], b: &[f64]| {
        let mut u = vec![0.0; m * r];
        let mut y = vec![0.0; m * rows];
        BE.lora_forward(&x.to_vec(), &a.to_vec(), &b.to_vec(), m, r, scale, dropout, &mut u, &mut y);
        (u, y)
    };
    let (u, _) = run(&x, &a, &b);
    let (mut da, mut db, mut dx) = (vec![0.0; a.len()], vec![0.0; b.len()], vec![0.0; x.len()]);
    BE.lora_backward(&x, &a, &b, &u, &dy, m, r, scale, dropout, &mut da, &mut db, &mut dx);
    check("lora dx", &dx, &numeric_grad(&x, |x| dot(&run(x, &a, &b).1, &dy)));
    check("lora dA", &da, &numeric_grad(&a, |a| dot(&run(&x, a, &b).1, &dy)));
    check("lora dB", &db, &numeric_grad(&b, |b| dot(&run(&x, &a, b).1, &dy)));
    // The mask really drops something and is reproducible from the seed.
    let factors: Vec<f32> = (0..100).map(|i| dropout.factor(i)).collect();
    assert!(factors.contains(&0.0) && factors.iter().any(|&f| f > 1.0));
    assert_eq!(factors, (0..100).map(|i| dropout.factor(i)).collect::<Vec<_>>());
}

#[test]
fn rope_backward() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (m, heads, hd) = (3, 2, 8);
    let x = rand_vec(&mut rng, m * heads * hd);
    let ang = rand_vec(&mut rng, m * hd / 2);
    let cos: Vec<f64> = ang.iter().map(|a| (a * 3.0).cos()).collect();
    let sin: Vec<f64> = ang.iter().map(|a| (a * 3.0).sin()).collect();
    let dy = rand_vec(&mut rng, x.len());
    let f = |x: &[f64]| {
        let mut out = vec![0.0; x.len()];
        BE.rope(&x.to_vec(), &cos, &sin, heads, hd, false, &mut out);
        dot(&out, &dy)
    };
    let mut dx = vec![0.0; x.len()];
    BE.rope(&dy, &cos, &sin, heads, hd, true, &mut dx);
    check("rope dx", &dx, &numeric_grad(&x, f));
}

#[test]
fn attention_backward_gqa_with_segments() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let sh = AttnShape::square(2, 5, 4, 2, 3);
    let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
    let nk = sh.batch * sh.kv_len * sh.kv_heads * sh.head_dim;
    // Row 0: two packed documents; row 1: one document then padding.
    let seg: Vec<u32> = vec![1, 1, 2, 2, 2, 1, 1, 1, 0, 0];
    let q = rand_vec(&mut rng, nq);
    let k = rand_vec(&mut rng, nk);
    let v = rand_vec(&mut rng, nk);
    let dy = rand_vec(&mut rng, nq);
    let run = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut out = vec![0.0; nq];
        let mut lse = vec![0.0; sh.batch * sh.heads * sh.q_len];
        BE.attention(&q.to_vec(), &k.to_vec(), &v.to_vec(), sh, Some(&seg), &mut out, &mut lse);
        (out, lse)
    };
    let (out, lse) = run(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    BE.attention_backward(&q, &k, &v, &out, &lse, &dy, sh, Some(&seg), &mut dq, &mut dk, &mut dv);
    check("attention dq", &dq, &numeric_grad(&q, |q| dot(&run(q, &k, &v).0, &dy)));
    check("attention dk", &dk, &numeric_grad(&k, |k| dot(&run(&q, k, &v).0, &dy)));
    check("attention dv", &dv, &numeric_grad(&v, |v| dot(&run(&q, &k, v).0, &dy)));
    // Padding queries produce zeros; a key in another document has no influence.
    let d = sh.heads * sh.head_dim;
    assert!(out[(5 + 3) * d..(5 + 4) * d].iter().all(|&x| x == 0.0));
    let mut k2 = k.clone();
    k2[0] += 1.0; // row 0, position 0 (document 1) must not affect document 2 (positions 2..5)
    let out2 = run(&q, &k2, &v).0;
    assert_eq!(out[2 * d..5 * d], out2[2 * d..5 * d]);
}

/// Attention over q and k before RoPE (the training graph's op): the gradients of the un-rotated q
/// and k, which a rotation dropped or applied the wrong way round would get wrong.
#[test]
fn rope_attention_backward_gqa_with_segments() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let sh = AttnShape::square(2, 5, 4, 2, 4);
    let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
    let nk = sh.batch * sh.kv_len * sh.kv_heads * sh.head_dim;
    let seg: Vec<u32> = vec![1, 1, 2, 2, 2, 1, 1, 1, 0, 0];
    let ang = rand_vec(&mut rng, sh.batch * sh.q_len * sh.head_dim / 2);
    let cos: Vec<f64> = ang.iter().map(|a| (a * 3.0).cos()).collect();
    let sin: Vec<f64> = ang.iter().map(|a| (a * 3.0).sin()).collect();
    let rope = RopeTables::<B> { cos: &cos, sin: &sin };
    let (q, k, v, dy) =
        (rand_vec(&mut rng, nq), rand_vec(&mut rng, nk), rand_vec(&mut rng, nk), rand_vec(&mut rng, nq));
    let run = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut out = vec![0.0; nq];
        let mut lse = vec![0.0; sh.batch * sh.heads * sh.q_len];
        BE.rope_attention(&q.to_vec(), &k.to_vec(), &v.to_vec(), rope, sh, Some(&seg), &mut out, &mut lse);
        (out, lse)
    };
    let (out, lse) = run(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    BE.rope_attention_backward(&q, &k, &v, rope, &out, &lse, &dy, sh, Some(&seg), &mut dq, &mut dk, &mut dv);
    check("rope_attention dq", &dq, &numeric_grad(&q, |q| dot(&run(q, &k, &v).0, &dy)));
    check("rope_attention dk", &dk, &numeric_grad(&k, |k| dot(&run(&q, k, &v).0, &dy)));
    check("rope_attention dv", &dv, &numeric_grad(&v, |v| dot(&run(&q, &k, v).0, &dy)));
}

#[test]
fn swiglu_backward() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let n = 11;
    let g = rand_vec(&mut rng, n).iter().map(|x| x * 4.0).collect::<Vec<_>>();
    let u = rand_vec(&mut rng, n);
    let dy = rand_vec(&mut rng, n);
    let run = |g: &[f64], u: &[f64]| {
        let mut o = vec![0.0; n];
        BE.swiglu(&g.to_vec(), &u.to_vec(), &mut o);
        dot(&o, &dy)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    BE.swiglu_backward(&g, &u, &dy, &mut dg, &mut du);
    check("swiglu dgate", &dg, &numeric_grad(&g, |g| run(g, &u)));
    check("swiglu dup", &du, &numeric_grad(&u, |u| run(&g, u)));
}

#[test]
fn cross_entropy_backward_and_ignore_index() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let (m, v) = (4, 9);
    let logits: Vec<f64> = rand_vec(&mut rng, m * v).iter().map(|x| x * 3.0).collect();
    let targets = [3, -100, 0, 8];
    let scale = 0.5f32;
    let f = |l: &[f64]| {
        let mut d = vec![0.0; m * v];
        BE.cross_entropy(&l.to_vec(), &targets, v, scale, &mut d).0 * scale as f64
    };
    let mut d = vec![0.0; m * v];
    let (loss, count) = BE.cross_entropy(&logits, &targets, v, scale, &mut d);
    assert_eq!(count, 3);
    assert!(d[v..2 * v].iter().all(|&x| x == 0.0), "ignored row has no gradient");
    // Row 0's loss by hand.
    let row = &logits[0..v];
    let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
    assert!(((lse - row[3]) - (loss - f(&logits) / scale as f64 + (lse - row[3]))).abs() < 1e-12);
    check("cross-entropy dlogits", &d, &numeric_grad(&logits, f));
}

#[test]
fn embedding_backward_and_add() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (vocab, dim) = (6, 4);
    let table = rand_vec(&mut rng, vocab * dim);
    let ids = [2u32, 5, 2];
    let dy = rand_vec(&mut rng, ids.len() * dim);
    let f = |t: &[f64]| {
        let w =
            BE.upload_weight(HostWeight::Dense { rows: vocab, cols: dim, data: t.iter().map(|&x| x as f32).collect() });
        let mut out = vec![0.0; ids.len() * dim];
        BE.embedding(&w, &ids, &mut out);
        dot(&out, &dy)
    };
    let mut dt = vec![0.0; vocab * dim];
    BE.embedding_backward(&ids, &dy, dim, &mut dt);
    // f32 storage of the table makes the function linear in it anyway; use a wider step.
    let num: Vec<f64> = (0..table.len())
        .map(|i| {
            let mut p = table.clone();
            p[i] += 0.5;
            let mut q = table.clone();
            q[i] -= 0.5;
            f(&p) - f(&q)
        })
        .collect();
    assert!(rel_err(&dt, &num) < 1e-6, "embedding backward");
    let (a, b) = (rand_vec(&mut rng, 5), rand_vec(&mut rng, 5));
    let mut o = vec![0.0; 5];
    BE.add(&a, &b, &mut o);
    assert!(o.iter().zip(a.iter().zip(&b)).all(|(o, (x, y))| *o == x + y));
}

/// Tiny model, all-linear LoRA with random (non-zero) B so every adapter gets gradient.
fn tiny_setup(tied: bool, quant: Option<QuantConfig>, targets: &[&str]) -> (Llama<B>, Lora<B>, Batch) {
    let cfg = tiny_config(tied);
    let src = random_source(&cfg, 11);
    let model = Llama::<B>::load(&BE, &src, quant).unwrap();
    let lcfg = LoraConfig { r: 3, alpha: 6.0, dropout: 0.1, ..LoraConfig::default() }.with_targets(targets).unwrap();
    let mut lora = Lora::init(&BE, &cfg, lcfg, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for layer in &mut lora.layers {
        for pair in layer.iter_mut().flatten() {
            let n = pair.b.len();
            pair.b = rand_vec(&mut rng, n).iter().map(|x| x * 0.3).collect();
        }
    }
    let rows: Vec<Vec<u32>> =
        (0..2).map(|_| (0..6).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect()).collect();
    let mut batch = Batch::causal_lm(&rows);
    batch.labels[1] = -100; // one ignored label
    (model, lora, batch)
}

fn loss_of(model: &Llama<B>, lora: &Lora<B>, batch: &Batch) -> f64 {
    let mut g = lora.zero_grads(&BE);
    forward_backward(&BE, model, lora, &mut g, batch, 1.0, Some(77), false).loss_sum
}

fn whole_model_check(tied: bool, targets: &[&str], modules: usize) {
    let (model, mut lora, batch) = tiny_setup(tied, None, targets);
    let mut grads = lora.zero_grads(&BE);
    forward_backward(&BE, &model, &lora, &mut grads, &batch, 1.0, Some(77), false);
    let analytic: Vec<Vec<f64>> = grads.bufs().iter().map(|b| b.to_vec()).collect();
    let n_params = analytic.len();
    assert_eq!(n_params, 2 * modules * 2, "A and B for {modules} modules in 2 layers");
    for (pi, analytic) in analytic.iter().enumerate() {
        let x0 = lora.params_mut()[pi].clone();
        let num = numeric_grad(&x0, |x| {
            *lora.params_mut()[pi] = x.to_vec();
            loss_of(&model, &lora, &batch)
        });
        *lora.params_mut()[pi] = x0;
        check(&format!("model LoRA param {pi} (tied={tied})"), analytic, &num);
    }
}

#[test]
fn whole_model_lora_gradients_untied_gqa() {
    whole_model_check(false, &["all-linear"], 7);
}

#[test]
fn whole_model_lora_gradients_tied() {
    whole_model_check(true, &["all-linear"], 7);
}

/// LoRA on q and v only (the classic recipe): each MLP has no branch, so it is one op on the tape
/// whose backward is one call (`Backend::mlp_backward`), which the earlier layers' gradients
/// flow through.
#[test]
fn whole_model_lora_gradients_attention_only() {
    whole_model_check(false, &["q_proj", "v_proj"], 2);
}

/// Backward's replay of a checkpointed layer computes only what the layer's backward reads (no down
/// product, no final residual add, and without LoRA on down no SwiGLU output): the gradients must be
/// the plain tape's bit for bit, with LoRA on every projection and on q and v only.
#[test]
fn checkpointed_backward_equals_plain() {
    let cases =
        [(None, &["all-linear"][..]), (Some(QuantConfig::default()), &["all-linear"]), (None, &["q_proj", "v_proj"])];
    for (quant, targets) in cases {
        let (model, lora, batch) = tiny_setup(false, quant, targets);
        let mut g1 = lora.zero_grads(&BE);
        let l1 = forward_backward(&BE, &model, &lora, &mut g1, &batch, 0.1, Some(3), Checkpointing::Off);
        assert!(g1.bufs().iter().all(|b| b.iter().any(|&x| x != 0.0)));
        // Offloading parks the layer inputs (host memory is where CPU buffers already are) and takes
        // them back through the same tape paths a GPU run uses.
        for ckpt in [Checkpointing::OnDevice, Checkpointing::Offload] {
            let mut g2 = lora.zero_grads(&BE);
            let l2 = forward_backward(&BE, &model, &lora, &mut g2, &batch, 0.1, Some(3), ckpt);
            assert_eq!(l1, l2);
            for (a, b) in g1.bufs().iter().zip(g2.bufs()) {
                assert_eq!(*a, b, "checkpointing {ckpt:?} changed a gradient");
            }
        }
    }
}

/// Checkpointed layers that keep their MLP's gate and up products (`gradient_checkpointing_keep_mlp`)
/// or their attention's inputs, output and lse (`gradient_checkpointing_keep_attention`) from the
/// first pass replay without computing them: the gradients must be the plain tape's bit for bit on
/// every MLP path (LoRA on gate/up; only on down; none, with o's product into the norm or, with LoRA
/// on o, apart) and with LoRA on q/k/v or not, with the LoRA `u`s kept too or recomputed by the
/// replay, for some of the checkpointed layers or all of them; and the first pass holds exactly the
/// kept values more (the MLP's `2 · rows · intermediate_size`, attention's q, k, v, output and lse).
#[test]
fn kept_products_give_the_plain_gradients() {
    let cfg = ModelConfig { num_hidden_layers: 4, ..tiny_config(false) };
    let cases: [(Option<QuantConfig>, &[&str]); 5] = [
        (Some(QuantConfig::default()), &["all-linear"]),
        (None, &["down_proj"]),
        (Some(QuantConfig::default()), &["q_proj", "v_proj"]),
        (None, &["q_proj", "o_proj"]),
        (None, &["gate_proj", "o_proj"]),
    ];
    for (quant, targets) in cases {
        let model = Llama::<B>::load(&BE, &random_source(&cfg, 41), quant).unwrap();
        let lcfg =
            LoraConfig { r: 3, alpha: 6.0, dropout: 0.1, ..LoraConfig::default() }.with_targets(targets).unwrap();
        let mut lora = Lora::init(&BE, &cfg, lcfg, 42);
        let mut rng = rand::rngs::StdRng::seed_from_u64(43);
        for pair in lora.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
            let n = pair.b.len();
            pair.b = rand_vec(&mut rng, n).iter().map(|x| x * 0.3).collect();
        }
        let (batch_rows, seq) = (2, 7);
        let rows: Vec<Vec<u32>> =
            (0..batch_rows).map(|_| (0..seq).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect()).collect();
        let batch = Batch::causal_lm(&rows);
        // One step through the public graph API, returning the loss, the gradients and what the
        // tape held after the forward pass.
        let step = |ckpt: Checkpointing, (mlp, attention): (usize, usize), keep_lora_us: bool| {
            let mut grads = lora.zero_grads(&BE);
            let mut g = Graph::new(&BE, &model, Some(&lora), &batch, Some(3), ckpt);
            (g.keep_mlp_layers, g.keep_attention_layers, g.keep_lora_us) = (mlp, attention, keep_lora_us);
            let mut tape = Tape::new(true);
            let x = g.body(&mut tape, &batch.input_ids);
            let held = tape.live_elements(&BE);
            let (loss, _) = g.lm_head_loss(&mut tape, x, &batch.targets(), 0.1);
            tape.backward(&g, &mut grads, None, &[]);
            (loss, grads.bufs().iter().map(|b| b.to_vec()).collect::<Vec<_>>(), held)
        };
        let (loss, grads, _) = step(Checkpointing::Off, (0, 0), true);
        assert!(grads.iter().all(|b| b.iter().any(|&x| x != 0.0)), "{targets:?}: a zero gradient");
        let m = batch.input_ids.len();
        let mlp_values = 2 * m * cfg.intermediate_size;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let attention_values = m * (2 * cfg.hidden_size + 2 * kv) + batch_rows * cfg.num_attention_heads * seq;
        for ckpt in [Checkpointing::OnDevice, Checkpointing::Offload] {
            let (_, _, held_none) = step(ckpt, (0, 0), true);
            // 3 of the 4 layers are checkpointed (the last is recorded whole): 5 keeps those 3.
            for (keep, kept) in
                [((1, 0), (1, 0)), ((5, 0), (3, 0)), ((0, 1), (0, 1)), ((0, 5), (0, 3)), ((2, 3), (2, 3))]
            {
                for keep_lora_us in [true, false] {
                    let (l2, g2, held) = step(ckpt, keep, keep_lora_us);
                    let what = format!(
                        "{targets:?} {ckpt:?}, kept (MLP, attention) of {keep:?} layers, u kept {keep_lora_us}"
                    );
                    assert_eq!(loss, l2, "{what}: loss");
                    assert!(grads == g2, "{what}: the gradients differ");
                    if keep_lora_us {
                        let want = kept.0 * mlp_values + kept.1 * attention_values;
                        assert_eq!(held - held_none, want, "{what}: held after the forward");
                    }
                }
            }
        }
    }
}
