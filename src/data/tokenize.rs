//! Tokenizing rendered samples into `input_ids` and `labels`. The whole text is tokenized at once
//! (so token boundaries are the tokenizer's, not the pieces'), and a token is trained when it starts
//! inside a trainable piece. BOS is never doubled; EOS is appended when missing and stays a label.

use crate::backend::IGNORE_INDEX;
use crate::data::format::{render, RenderOptions, RowFormat, Sample};
use crate::data::records::Record;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedSample {
    pub input_ids: Vec<u32>,
    /// `input_ids[t]` or -100 (not trained).
    pub labels: Vec<i32>,
}

/// The tokenized dataset and what happened on the way.
#[derive(Debug, Clone, Default)]
pub struct TokenizedDataset {
    pub samples: Vec<TokenizedSample>,
    /// Samples cut to `max_seq_length`.
    pub truncated: usize,
    /// Samples dropped because nothing in them is trained (after truncation).
    pub dropped_untrained: usize,
}

impl TokenizedDataset {
    pub fn total_tokens(&self) -> usize {
        self.samples.iter().map(|s| s.input_ids.len()).sum()
    }
}

/// Tokenizes one sample; returns it and whether it was truncated.
pub fn tokenize_sample(s: &Sample, tok: &Tokenizer, max_len: usize) -> Result<(TokenizedSample, bool)> {
    let text = s.text();
    let add_special = !tok.starts_with_bos(&text);
    let (mut ids, offsets) = tok.encode_with_offsets(&text, add_special)?;
    // Trainable byte ranges of the text.
    let mut ranges = Vec::new();
    let mut pos = 0;
    for (piece, trained) in &s.pieces {
        if *trained {
            ranges.push(pos..pos + piece.len());
        }
        pos += piece.len();
    }
    let trained_at = |start: usize, end: usize| {
        // Special tokens added by the post-processor have an empty span at 0: not trained.
        end > start && ranges.iter().any(|r| r.contains(&start))
    };
    let mut labels: Vec<i32> = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(a, b))| if trained_at(a, b) { id as i32 } else { IGNORE_INDEX })
        .collect();
    if let Some(eos) = tok.eos_id() {
        if ids.last() != Some(&eos) {
            ids.push(eos);
            let last_trained = s.pieces.last().is_some_and(|(_, t)| *t);
            labels.push(if last_trained { eos as i32 } else { IGNORE_INDEX });
        }
    }
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    labels.truncate(max_len);
    Ok((TokenizedSample { input_ids: ids, labels }, truncated))
}

/// Renders and tokenizes every record.
pub fn tokenize_dataset(
    records: &[Record],
    fmt: &RowFormat,
    tok: &Tokenizer,
    opts: &RenderOptions,
    max_len: usize,
    path: &Path,
) -> Result<TokenizedDataset> {
    if max_len < 2 {
        return Err(Error::Config(format!("max_seq_length must be at least 2, got {max_len}")));
    }
    let mut out = TokenizedDataset::default();
    for rec in records {
        let sample = render(rec, fmt, tok, opts, path)?;
        let (t, truncated) = tokenize_sample(&sample, tok, max_len)
            .map_err(|e| Error::format(path, format!("line {}: {e}", rec.line)))?;
        out.truncated += usize::from(truncated);
        // A sample with no trained target after the shift teaches nothing.
        if t.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            out.dropped_untrained += 1;
            continue;
        }
        out.samples.push(t);
    }
    if out.samples.is_empty() {
        return Err(Error::format(path, "no sample has any trained token (all masked or empty)"));
    }
    Ok(out)
}
