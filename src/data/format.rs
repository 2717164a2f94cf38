//! Turning a dataset row into text: a `text` column used as is, `messages` rendered with the chat
//! template, `prompt`/`completion` pairs, or alpaca `instruction`/`input`/`output` (rendered as a
//! chat). The text is kept as pieces marked trainable or not, for response-only loss.

use crate::data::records::Record;
use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};
use serde_json::{Map, Value};
use std::path::Path;

/// How rows of a dataset are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowFormat {
    /// One column (default `text`) already in a template.
    Text {
        field: String,
    },
    /// A `messages` column of `{role, content}`.
    Messages,
    PromptCompletion,
    /// `instruction`, optional `input`, `output`.
    Alpaca,
}

impl RowFormat {
    /// Detects the format from the first row's columns.
    pub fn detect(rec: &Record, text_field: &str, path: &Path) -> Result<Self> {
        let has = |k: &str| rec.fields.contains_key(k);
        if has(text_field) {
            Ok(RowFormat::Text { field: text_field.to_string() })
        } else if has("messages") {
            Ok(RowFormat::Messages)
        } else if has("prompt") && has("completion") {
            Ok(RowFormat::PromptCompletion)
        } else if has("instruction") && has("output") {
            Ok(RowFormat::Alpaca)
        } else {
            let cols: Vec<&String> = rec.fields.keys().collect();
            Err(Error::format(
                path,
                format!(
                    "line {}: cannot tell the format from columns {cols:?}: expected `{text_field}`, `messages`, \
                     `prompt`+`completion`, or `instruction`+`output`",
                    rec.line
                ),
            ))
        }
    }

    /// Whether loss is on completions only when the user did not say.
    pub fn default_completion_only(&self) -> bool {
        matches!(self, RowFormat::PromptCompletion)
    }
}

/// A row as text pieces; `true` marks text whose tokens are trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub pieces: Vec<(String, bool)>,
}

impl Sample {
    pub fn text(&self) -> String {
        self.pieces.iter().map(|(s, _)| s.as_str()).collect()
    }
}

fn str_field<'a>(rec: &'a Record, key: &str, path: &Path) -> Result<&'a str> {
    match rec.fields.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::format(path, format!("line {}: column `{key}` is not a string ({other})", rec.line))),
        None => Err(Error::format(path, format!("line {}: missing column `{key}`", rec.line))),
    }
}

fn messages_of(rec: &Record, path: &Path) -> Result<Vec<Message>> {
    let bad = |m: &str| Error::format(path, format!("line {}: column `messages` {m}", rec.line));
    let arr = rec.fields.get("messages").and_then(Value::as_array).ok_or_else(|| bad("is not a list"))?;
    arr.iter()
        .map(|m| {
            let role =
                m.get("role").and_then(Value::as_str).ok_or_else(|| bad("has an entry without a string `role`"))?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("has an entry without a string `content`"))?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Options of rendering.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Train only on responses (assistant turns, completions, text after the response template).
    pub completion_only: bool,
    /// For `text` rows with `completion_only`: text after each occurrence is trained (e.g. `[/INST]`).
    pub response_template: Option<String>,
}

/// Renders one row.
pub fn render(rec: &Record, fmt: &RowFormat, tok: &Tokenizer, opts: &RenderOptions, path: &Path) -> Result<Sample> {
    match fmt {
        RowFormat::Text { field } => {
            let text = str_field(rec, field, path)?;
            match (&opts.response_template, opts.completion_only) {
                (Some(tpl), true) => Ok(split_on_response_template(text, tpl)),
                _ => Ok(Sample { pieces: vec![(text.to_string(), true)] }),
            }
        }
        RowFormat::PromptCompletion => {
            let p = str_field(rec, "prompt", path)?;
            let c = str_field(rec, "completion", path)?;
            Ok(Sample { pieces: vec![(p.to_string(), !opts.completion_only), (c.to_string(), true)] })
        }
        RowFormat::Messages => chat_sample(&messages_of(rec, path)?, tok, opts.completion_only)
            .map_err(|e| Error::format(path, format!("line {}: {e}", rec.line))),
        RowFormat::Alpaca => {
            let instr = str_field(rec, "instruction", path)?;
            let input = match rec.fields.get("input") {
                Some(Value::String(s)) if !s.trim().is_empty() => format!("{instr}\n\n{s}"),
                _ => instr.to_string(),
            };
            let msgs = [Message::new("user", &input), Message::new("assistant", str_field(rec, "output", path)?)];
            chat_sample(&msgs, tok, opts.completion_only)
                .map_err(|e| Error::format(path, format!("line {}: {e}", rec.line)))
        }
    }
}

/// Text before the first response template is not trained; after it, trained.
fn split_on_response_template(text: &str, tpl: &str) -> Sample {
    match text.find(tpl) {
        Some(i) => {
            let cut = i + tpl.len();
            Sample { pieces: vec![(text[..cut].to_string(), false), (text[cut..].to_string(), true)] }
        }
        None => Sample { pieces: vec![(text.to_string(), false)] },
    }
}

/// A chat rendered with the template; with `assistant_only`, only assistant turns are trained.
/// Each assistant turn is found as the difference between the chat rendered up to it (with the
/// generation prompt) and the chat including it.
fn chat_sample(msgs: &[Message], tok: &Tokenizer, assistant_only: bool) -> Result<Sample> {
    let full = tok.apply_chat_template(msgs, false)?;
    if !assistant_only {
        return Ok(Sample { pieces: vec![(full, true)] });
    }
    let mut pieces = Vec::new();
    let mut done = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = tok.apply_chat_template(&msgs[..i], true)?;
        let with = tok.apply_chat_template(&msgs[..=i], false)?;
        if !with.starts_with(&prompt) || !full.starts_with(&with) || prompt.len() < done {
            return Err(Error::Other(
                "the chat template does not render turns as prefixes of each other; cannot mask prompts".into(),
            ));
        }
        pieces.push((full[done..prompt.len()].to_string(), false));
        pieces.push((full[prompt.len()..with.len()].to_string(), true));
        done = with.len();
    }
    pieces.push((full[done..].to_string(), false));
    pieces.retain(|(s, _)| !s.is_empty());
    Ok(Sample { pieces })
}

/// Converts OpenAssistant-Guanaco text (`### Human: … ### Assistant: …`, possibly multi-turn) to the
/// Llama-2 chat template `<s>[INST] … [/INST] … </s>`, as the classic recipe's script does.
pub fn guanaco_to_llama2(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text.trim();
    let mut turns = 0;
    while let Some(h) = rest.find("### Human:") {
        let after_h = &rest[h + "### Human:".len()..];
        let a = after_h.find("### Assistant:")?;
        let human = after_h[..a].trim();
        let after_a = &after_h[a + "### Assistant:".len()..];
        let end = after_a.find("### Human:").unwrap_or(after_a.len());
        let assistant = after_a[..end].trim();
        out.push_str(&format!("<s>[INST] {human} [/INST] {assistant} </s>"));
        rest = &after_a[end..];
        turns += 1;
    }
    (turns > 0).then_some(out)
}

/// Converts a row to a plain `{"text": ...}` (Guanaco rows become Llama-2 chat text; other formats
/// are rendered with the tokenizer's chat template if one is given, else kept as they are).
pub fn convert_row(rec: &Record, fmt: &RowFormat, tok: Option<&Tokenizer>, path: &Path) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    match (fmt, tok) {
        (RowFormat::Text { field }, _) => {
            let text = str_field(rec, field, path)?;
            let converted = guanaco_to_llama2(text).unwrap_or_else(|| text.to_string());
            out.insert("text".into(), Value::String(converted));
        }
        (_, Some(tok)) => {
            let s = render(rec, fmt, tok, &RenderOptions::default(), path)?;
            out.insert("text".into(), Value::String(s.text()));
        }
        (_, None) => return Ok(rec.fields.clone()),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guanaco_conversion_single_and_multi_turn() {
        let t = "### Human: Hi there.### Assistant: Hello! How can I help?";
        assert_eq!(guanaco_to_llama2(t).unwrap(), "<s>[INST] Hi there. [/INST] Hello! How can I help? </s>");
        let t = "### Human: A### Assistant: B### Human: C### Assistant: D";
        assert_eq!(guanaco_to_llama2(t).unwrap(), "<s>[INST] A [/INST] B </s><s>[INST] C [/INST] D </s>");
        assert_eq!(guanaco_to_llama2("no markers"), None);
    }

    #[test]
    fn response_template_split() {
        let s = split_on_response_template("<s>[INST] q [/INST] a </s>", "[/INST]");
        assert_eq!(s.pieces, vec![("<s>[INST] q [/INST]".into(), false), (" a </s>".into(), true)]);
    }
}
