//! Tokenization through the `tokenizers` crate (`tokenizer.json`), special tokens and the chat
//! template from `tokenizer_config.json` (or GGUF metadata), rendered with a Jinja engine.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// `(start, end)` byte offsets of a token in its text.
pub type ByteSpan = (usize, usize);

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A tokenizer plus what `tokenizer_config.json` says about it.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Jinja chat template, as in `tokenizer_config.json`.
    pub chat_template: Option<String>,
    /// The JSON it was built from (written next to merged models).
    pub json: Value,
}

/// The Llama-2 chat format (`<s>[INST] <<SYS>>…<</SYS>> … [/INST] … </s>`), used when a model has no template.
pub const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}";

/// ChatML (`<|im_start|>role\n…<|im_end|>`).
pub const CHATML_TEMPLATE: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Builds a tokenizer from a `tokenizer.json` value.
    pub fn from_json(json: Value) -> Result<Self> {
        let bytes = serde_json::to_vec(&json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Tokenizer { inner, bos_token: None, eos_token: None, pad_token: None, chat_template: None, json })
    }

    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
        let mut t = Self::from_json(json).map_err(|e| Error::format(&path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
            t.apply_config(&cfg);
        }
        Ok(t)
    }

    /// Takes special tokens and the chat template from a `tokenizer_config.json` value.
    pub fn apply_config(&mut self, cfg: &Value) {
        self.bos_token = token_string(cfg.get("bos_token")).or(self.bos_token.take());
        self.eos_token = token_string(cfg.get("eos_token")).or(self.eos_token.take());
        self.pad_token = token_string(cfg.get("pad_token")).or(self.pad_token.take());
        match cfg.get("chat_template") {
            Some(Value::String(s)) => self.chat_template = Some(s.clone()),
            Some(Value::Array(named)) => {
                // A list of {name, template}: take "default".
                self.chat_template = named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string);
            }
            _ => {}
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Token ids of `text`; `add_special` applies the post-processor (e.g. Llama's leading `<s>`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids and their `(start, end)` byte offsets in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Whether `text` starts with the BOS token (then no second BOS may be added).
    pub fn starts_with_bos(&self, text: &str) -> bool {
        self.bos_token.as_deref().is_some_and(|b| !b.is_empty() && text.starts_with(b))
    }

    /// Token ids of text that may already begin with the BOS token: the post-processor's BOS is
    /// then not added a second time.
    pub fn encode_templated(&self, text: &str) -> Result<Vec<u32>> {
        let starts_with_bos = self.bos_token.as_deref().is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let mut ids = self.encode(text, !starts_with_bos)?;
        // A post-processor may still prepend BOS to text that had it (defensive: never two in a row).
        if let (Some(b), true) = (self.bos_id(), ids.len() >= 2) {
            if ids[0] == b && ids[1] == b {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The template used for chats: the model's own, else ChatML if the vocabulary has its markers,
    /// else Llama-2's.
    pub fn effective_template(&self) -> &str {
        match &self.chat_template {
            Some(t) => t,
            None if self.token_to_id("<|im_start|>").is_some() => CHATML_TEMPLATE,
            None => LLAMA2_TEMPLATE,
        }
    }

    /// Renders `messages` with the chat template (as transformers' `apply_chat_template`).
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        render_template(
            self.effective_template(),
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
}

/// Renders a Hugging Face Jinja chat template.
pub fn render_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Python string and dict methods (`.strip()`, `.items()`, ...), which Hugging Face templates use.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| Error::Tokenizer(format!("chat template does not parse: {e}")))?;
    let tmpl = env.get_template("chat").map_err(|e| Error::Tokenizer(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::Tokenizer(format!("chat template failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_template_matches_the_recipe_format() {
        let msgs = [Message::new("user", "Hi there"), Message::new("assistant", "Hello!")];
        let s = render_template(LLAMA2_TEMPLATE, &msgs, false, "<s>", "</s>").unwrap();
        assert_eq!(s, "<s>[INST] Hi there [/INST] Hello! </s>");
        let msgs = [Message::new("system", "Be brief."), Message::new("user", "Q")];
        let s = render_template(LLAMA2_TEMPLATE, &msgs, true, "<s>", "</s>").unwrap();
        assert_eq!(s, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ [/INST]");
    }

    #[test]
    fn chatml_template() {
        let msgs = [Message::new("user", "What?")];
        let s = render_template(CHATML_TEMPLATE, &msgs, true, "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let e = render_template("{{ raise_exception('no system role') }}", &[], false, "", "").unwrap_err();
        assert!(e.to_string().contains("no system role"));
    }
}
