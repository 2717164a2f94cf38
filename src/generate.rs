//! Decoding with a KV cache: greedy or sampled (temperature, top-k, top-p), repetition penalty,
//! stopping at EOS, at stop strings, at `max_new_tokens` or `max_length` — the knobs of
//! transformers' `generate`, applied in its order (penalty → temperature → top-k → top-p).

use crate::backend::Backend;
use crate::error::Result;
use crate::model::llama::{decode_step, decode_step_argmax, decode_step_greedy_launch, KvCache, Llama, StepToken};
use crate::model::lora::Lora;
use crate::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// Cap on prompt + generated tokens (also bounds the KV cache).
    pub max_length: Option<usize>,
    /// `false` = greedy.
    pub do_sample: bool,
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off; >1 discourages tokens already present.
    pub repetition_penalty: f32,
    pub eos_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            max_length: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos_token_ids: vec![],
            stop_strings: vec![],
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// The checks transformers makes when it builds its logits processors, each naming its flag: when
    /// sampling, a finite temperature > 0 and top-p in (0, 1]; always, a finite repetition penalty > 0.
    pub fn validate(&self) -> crate::error::Result<()> {
        let bad = |m: String| Err(crate::error::Error::Config(m));
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("--temperature must be a finite number > 0 when sampling, got {}", self.temperature));
        }
        if self.do_sample && !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("--repetition-penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxNewTokens,
    MaxLength,
    /// The callback asked to stop.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens only (the EOS token, if hit, included).
    pub tokens: Vec<u32>,
    /// Decoded new text (stop string cut off), when a tokenizer was given.
    pub text: String,
    pub stop: StopReason,
}

/// Chooses the next token from `logits` (modified in place).
pub fn sample_next(logits: &mut [f32], history: &[u32], cfg: &GenerationConfig, rng: &mut impl Rng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / cfg.repetition_penalty } else { *l * cfg.repetition_penalty };
            }
        }
    }
    if !cfg.do_sample {
        return argmax(logits);
    }
    let t = cfg.temperature.max(1e-6);
    logits.iter_mut().for_each(|l| *l /= t);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let mx = logits[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] - mx) as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if cfg.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let mut u: f64 = rng.gen();
    for (i, p) in idx.iter().zip(&probs) {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    idx[idx.len() - 1] as u32
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates a continuation of `prompt` with a KV cache. `on_token(id, new_text)` is called for each
/// token (streaming); returning `false` stops.
#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    cfg: &GenerationConfig,
    on_token: &mut dyn FnMut(u32, &str) -> bool,
) -> Result<Generated> {
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= model.cfg.vocab_size) {
        return Err(crate::error::Error::Other(format!(
            "prompt token id {bad} is outside the model's vocab ({}): is the tokenizer the model's?",
            model.cfg.vocab_size
        )));
    }
    if prompt.is_empty() {
        return Err(crate::error::Error::Other("the prompt is empty".into()));
    }
    cfg.validate()?;
    let max_total = cfg
        .max_length
        .unwrap_or(usize::MAX)
        .min(prompt.len() + cfg.max_new_tokens)
        .min(model.cfg.max_position_embeddings.max(prompt.len() + 1));
    let mut cache = KvCache::new(be, &model.cfg, max_total.max(prompt.len() + 1));
    let mut out =
        Output { tokens: Vec::new(), history: prompt.to_vec(), text: String::new(), tokenizer, cfg, max_total };
    if prompt.len() >= max_total {
        return Ok(out.finish(StopReason::MaxLength));
    }
    if !cfg.do_sample && cfg.repetition_penalty == 1.0 {
        // Greedy: each step's choice stays on the device for the next, so on a backend that queues
        // work the step after a token is queued before the host reads that token and streams it (the
        // device runs step after step); one that runs each operation as it is called streams the
        // token first, so it shows as soon as it is chosen and no step runs past a stop.
        let budget = cfg.max_new_tokens.min(max_total - prompt.len());
        let ahead = be.queues_work();
        let mut next = decode_step_argmax(be, model, lora, &mut cache, prompt)?;
        let mut queued = std::collections::VecDeque::new();
        let mut launched = 1;
        let mut input = StepToken::Host(next);
        loop {
            let mut stop = if ahead { None } else { out.accept(next, on_token)? };
            if stop.is_none() && launched < budget {
                queued.push_back(decode_step_greedy_launch(be, model, lora, &mut cache, input)?);
                launched += 1;
                input = StepToken::Chosen;
            }
            if ahead {
                stop = out.accept(next, on_token)?;
            }
            if let Some(stop) = stop {
                // At most one step ran past the end; its read is waited for, not left in flight.
                queued.into_iter().for_each(|p| drop(be.read_wait(p)));
                return Ok(out.finish(stop));
            }
            // Every token up to the budget has been queued, so accept stops at the budget's last.
            let pending = queued.pop_front().expect("a step is queued until accept reaches the budget");
            next = be.read_wait(pending)[0] as u32;
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut logits = decode_step(be, model, lora, &mut cache, prompt)?;
    loop {
        let next = sample_next(&mut logits, &out.history, cfg, &mut rng);
        if let Some(stop) = out.accept(next, on_token)? {
            return Ok(out.finish(stop));
        }
        logits = decode_step(be, model, lora, &mut cache, &[next])?;
    }
}

/// What has been generated so far, and the checks each new token goes through.
struct Output<'a> {
    tokens: Vec<u32>,
    /// The prompt and the new tokens.
    history: Vec<u32>,
    text: String,
    tokenizer: Option<&'a Tokenizer>,
    cfg: &'a GenerationConfig,
    max_total: usize,
}

impl Output<'_> {
    /// Takes `next`: streams its text to `on_token` and says why to stop, if it is time.
    fn accept(&mut self, next: u32, on_token: &mut dyn FnMut(u32, &str) -> bool) -> Result<Option<StopReason>> {
        let cfg = self.cfg;
        self.tokens.push(next);
        self.history.push(next);
        let mut piece = String::new();
        if let Some(tok) = self.tokenizer {
            let full = tok.decode(&self.tokens, true)?;
            piece = full.get(self.text.len()..).unwrap_or("").to_string();
            self.text = full;
            if let Some(pos) = cfg.stop_strings.iter().filter_map(|s| self.text.find(s.as_str())).min() {
                self.text.truncate(pos);
                on_token(next, "");
                return Ok(Some(StopReason::StopString));
            }
        }
        Ok(if !on_token(next, &piece) {
            Some(StopReason::Interrupted)
        } else if cfg.eos_token_ids.contains(&next) {
            Some(StopReason::Eos)
        } else if self.tokens.len() >= cfg.max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if self.history.len() >= self.max_total {
            Some(StopReason::MaxLength)
        } else {
            None
        })
    }

    fn finish(self, stop: StopReason) -> Generated {
        Generated { tokens: self.tokens, text: self.text, stop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GenerationConfig {
        GenerationConfig { do_sample: true, ..GenerationConfig::default() }
    }

    #[test]
    fn greedy_and_repetition_penalty() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let g = GenerationConfig::default();
        assert_eq!(sample_next(&mut [0.1, 2.0, 1.9], &[], &g, &mut rng), 1);
        let g = GenerationConfig { repetition_penalty: 1.2, ..GenerationConfig::default() };
        // 2.0 / 1.2 < 1.9: the repeated token loses.
        assert_eq!(sample_next(&mut [0.1, 2.0, 1.9], &[1], &g, &mut rng), 2);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let logits = [3.0f32, 2.9, 0.0, -1.0, 2.8];
        let k = GenerationConfig { top_k: 2, ..cfg() };
        let p = GenerationConfig { top_p: 0.5, ..cfg() };
        for _ in 0..200 {
            let t = sample_next(&mut logits.clone(), &[], &k, &mut rng);
            assert!(t == 0 || t == 1);
            let t = sample_next(&mut logits.clone(), &[], &p, &mut rng);
            assert!(t == 0 || t == 1, "top-p 0.5 keeps the two best of three near-equal tokens");
        }
        // Sampling at temperature 1 visits more than one token.
        let seen: std::collections::BTreeSet<u32> =
            (0..200).map(|_| sample_next(&mut logits.clone(), &[], &cfg(), &mut rng)).collect();
        assert!(seen.len() >= 3);
    }
}
