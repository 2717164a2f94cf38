//! Building a run's [`TrainData`] from its config: read, render, tokenize, hold out an eval split.

use super::{TrainConfig, TrainData};
use crate::data::format::{RenderOptions, RowFormat};
use crate::data::{read_records, tokenize_dataset, TokenizedDataset};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

/// What loading the data found, for the user.
#[derive(Debug, Clone, Default)]
pub struct DataReport {
    pub format: String,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub skipped_bad_rows: usize,
    pub truncated: usize,
    pub dropped_untrained: usize,
    pub train_tokens: usize,
}

fn load_file(path: &Path, cfg: &TrainConfig, tok: &Tokenizer) -> Result<(TokenizedDataset, String, usize)> {
    let recs = read_records(path, cfg.skip_bad_rows)?;
    let fmt = RowFormat::detect(&recs.rows[0], &cfg.dataset_text_field, path)?;
    let opts = RenderOptions {
        completion_only: cfg.completion_only_loss.unwrap_or_else(|| fmt.default_completion_only()),
        response_template: cfg.response_template.clone(),
    };
    if opts.completion_only && matches!(fmt, RowFormat::Text { .. }) && opts.response_template.is_none() {
        return Err(Error::Config(
            "--completion-only-loss on `text` rows needs --response-template (e.g. \"[/INST]\")".into(),
        ));
    }
    let ds = tokenize_dataset(&recs.rows, &fmt, tok, &opts, cfg.max_seq_length, path)?;
    Ok((ds, format!("{fmt:?}"), recs.skipped))
}

/// Reads and tokenizes the training (and evaluation) data of `cfg`.
pub fn load_train_data(cfg: &TrainConfig, tok: &Tokenizer) -> Result<(TrainData, DataReport)> {
    let (mut train, format, skipped) = load_file(Path::new(&cfg.dataset), cfg, tok)?;
    let mut report = DataReport { format, skipped_bad_rows: skipped, ..Default::default() };
    let eval = match &cfg.eval_dataset {
        Some(p) => {
            let (ds, _, s) = load_file(Path::new(p), cfg, tok)?;
            report.skipped_bad_rows += s;
            Some(ds)
        }
        None if cfg.eval_split_ratio > 0.0 => {
            let n = train.samples.len();
            if n < 2 {
                return Err(Error::Config(format!(
                    "--eval-split-ratio needs at least 2 samples to split; {} has {n}",
                    cfg.dataset
                )));
            }
            let n_eval = ((n as f64 * cfg.eval_split_ratio).round() as usize).clamp(1, n - 1);
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0xe7a1));
            let eval_set: std::collections::HashSet<usize> = idx[..n_eval].iter().copied().collect();
            let all = std::mem::take(&mut train.samples);
            let mut eval = TokenizedDataset::default();
            for (i, s) in all.into_iter().enumerate() {
                if eval_set.contains(&i) {
                    eval.samples.push(s);
                } else {
                    train.samples.push(s);
                }
            }
            Some(eval)
        }
        None => None,
    };
    report.train_samples = train.samples.len();
    report.eval_samples = eval.as_ref().map_or(0, |e| e.samples.len());
    report.truncated = train.truncated + eval.as_ref().map_or(0, |e| e.truncated);
    report.dropped_untrained = train.dropped_untrained;
    report.train_tokens = train.total_tokens();
    let pad_id = tok.pad_token.as_deref().and_then(|p| tok.token_to_id(p)).or_else(|| tok.eos_id()).unwrap_or(0);
    Ok((TrainData { train, eval, pad_id }, report))
}
