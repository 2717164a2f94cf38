//! From tokenized samples to batches: shuffling by seed and epoch, transformers' group-by-length
//! sampler, right padding (padding never trained, found by position, not by token id), and packing
//! (documents share a row but never attend to each other: positions restart and the mask is
//! block-diagonal through per-token segment ids).

use crate::backend::IGNORE_INDEX;
use crate::data::tokenize::TokenizedSample;
use crate::model::llama::Batch;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// How samples become batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Batching {
    pub batch_size: usize,
    pub shuffle: bool,
    pub group_by_length: bool,
    /// Pack samples into rows of this many tokens.
    pub packing: Option<usize>,
    pub pad_id: u32,
    pub seed: u64,
}

/// The batches of one epoch.
pub struct BatchPlan {
    pub batches: Vec<Batch>,
}

impl Batching {
    /// Sample order of `epoch` (a pure function of seed and epoch, so a resumed run sees the same).
    pub fn order(&self, lengths: &[usize], epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..lengths.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if self.shuffle {
            idx.shuffle(&mut rng);
        }
        if self.group_by_length && self.packing.is_none() {
            // transformers' LengthGroupedSampler: megabatches of 50 batches sorted by length
            // (longest first), and the longest sample moved to the very front.
            let mega = 50 * self.batch_size;
            let mut groups: Vec<Vec<usize>> = idx.chunks(mega).map(|c| c.to_vec()).collect();
            for g in &mut groups {
                g.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
            }
            if let Some(max_g) = (0..groups.len()).max_by_key(|&g| lengths[groups[g][0]]) {
                let first = groups[0][0];
                groups[0][0] = groups[max_g][0];
                groups[max_g][0] = first;
            }
            idx = groups.concat();
        }
        idx
    }

    /// The batches of `epoch`.
    pub fn plan(&self, samples: &[TokenizedSample], epoch: usize) -> BatchPlan {
        let lengths: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
        let order = self.order(&lengths, epoch);
        let batches = match self.packing {
            None => {
                order.chunks(self.batch_size).map(|c| self.padded(c.iter().map(|&i| &samples[i]).collect())).collect()
            }
            Some(row_len) => {
                let rows = pack_rows(order.iter().map(|&i| &samples[i]), row_len);
                rows.chunks(self.batch_size).map(|c| self.packed(c, row_len)).collect()
            }
        };
        BatchPlan { batches }
    }

    /// Right-padded batch of whole samples.
    fn padded(&self, rows: Vec<&TokenizedSample>) -> Batch {
        let seq = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
        let n = rows.len();
        let mut b = Batch {
            batch: n,
            seq,
            input_ids: vec![self.pad_id; n * seq],
            labels: vec![IGNORE_INDEX; n * seq],
            positions: (0..n).flat_map(|_| 0..seq as u32).collect(),
            segments: None,
        };
        let mut segments = vec![0u32; n * seq];
        let mut any_pad = false;
        for (r, s) in rows.iter().enumerate() {
            let len = s.input_ids.len();
            any_pad |= len < seq;
            b.input_ids[r * seq..r * seq + len].copy_from_slice(&s.input_ids);
            b.labels[r * seq..r * seq + len].copy_from_slice(&s.labels);
            segments[r * seq..r * seq + len].iter_mut().for_each(|x| *x = 1);
        }
        if any_pad {
            b.segments = Some(segments);
        }
        b
    }

    /// Batch of packed rows, each `row_len` long.
    fn packed(&self, rows: &[Vec<&TokenizedSample>], row_len: usize) -> Batch {
        let n = rows.len();
        let mut b = Batch {
            batch: n,
            seq: row_len,
            input_ids: vec![self.pad_id; n * row_len],
            labels: vec![IGNORE_INDEX; n * row_len],
            positions: vec![0; n * row_len],
            segments: Some(vec![0; n * row_len]),
        };
        let seg = b.segments.as_mut().expect("set above");
        for (r, docs) in rows.iter().enumerate() {
            let mut at = r * row_len;
            for (d, s) in docs.iter().enumerate() {
                let len = s.input_ids.len();
                b.input_ids[at..at + len].copy_from_slice(&s.input_ids);
                b.labels[at..at + len].copy_from_slice(&s.labels);
                // The previous document's last token must not learn to predict this one's first.
                b.labels[at] = IGNORE_INDEX;
                for (k, p) in b.positions[at..at + len].iter_mut().enumerate() {
                    *p = k as u32;
                }
                seg[at..at + len].iter_mut().for_each(|x| *x = d as u32 + 1);
                at += len;
            }
        }
        b
    }
}

/// Greedy packing in order: a sample goes into the current row if it fits, else starts a new row.
fn pack_rows<'a>(samples: impl Iterator<Item = &'a TokenizedSample>, row_len: usize) -> Vec<Vec<&'a TokenizedSample>> {
    let mut rows: Vec<Vec<&TokenizedSample>> = Vec::new();
    let mut used = row_len;
    for s in samples {
        let len = s.input_ids.len().min(row_len);
        if used + len > row_len {
            rows.push(Vec::new());
            used = 0;
        }
        rows.last_mut().expect("a row").push(s);
        used += len;
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, base: u32) -> TokenizedSample {
        TokenizedSample {
            input_ids: (0..len as u32).map(|i| base + i).collect(),
            labels: (0..len as i32).map(|i| base as i32 + i).collect(),
        }
    }

    fn cfg() -> Batching {
        Batching { batch_size: 2, shuffle: true, group_by_length: false, packing: None, pad_id: 0, seed: 7 }
    }

    #[test]
    fn order_is_a_permutation_fixed_by_seed_and_epoch() {
        let lengths = vec![1; 20];
        let c = cfg();
        let a = c.order(&lengths, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_eq!(a, c.order(&lengths, 0));
        assert_ne!(a, c.order(&lengths, 1));
    }

    #[test]
    fn group_by_length_puts_the_longest_first_and_sorts_megabatches() {
        let lengths: Vec<usize> = (0..300).map(|i| (i * 37) % 101 + 1).collect();
        let c = Batching { group_by_length: true, ..cfg() };
        let o = c.order(&lengths, 0);
        assert_eq!(lengths[o[0]], *lengths.iter().max().unwrap());
        // Within the first megabatch (100 samples), after the first element lengths never increase.
        assert!(o[1..100].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }

    #[test]
    fn padding_is_masked_by_position_even_when_pad_is_eos() {
        let eos = 2u32;
        let mut a = sample(3, 10);
        a.input_ids[2] = eos;
        a.labels[2] = eos as i32; // EOS is a trained label
        let b = sample(5, 20);
        let c = Batching { shuffle: false, pad_id: eos, ..cfg() };
        let plan = c.plan(&[a, b], 0);
        let batch = &plan.batches[0];
        assert_eq!(batch.seq, 5);
        assert_eq!(&batch.labels[0..5], &[10, 11, 2, -100, -100]);
        assert_eq!(&batch.input_ids[3..5], &[eos, eos]);
        assert_eq!(batch.segments.as_ref().unwrap()[..5], [1, 1, 1, 0, 0]);
        // The shifted targets keep predicting EOS from the token before it.
        assert_eq!(batch.targets()[1], 2);
    }

    #[test]
    fn packing_resets_positions_and_separates_documents() {
        let s = [sample(3, 10), sample(4, 20), sample(5, 30)];
        let c = Batching { shuffle: false, packing: Some(8), ..cfg() };
        let plan = c.plan(&s, 0);
        let b = &plan.batches[0];
        assert_eq!((b.batch, b.seq), (2, 8));
        assert_eq!(&b.positions[0..8], &[0, 1, 2, 0, 1, 2, 3, 0]);
        assert_eq!(&b.segments.as_ref().unwrap()[0..8], &[1, 1, 1, 2, 2, 2, 2, 0]);
        assert_eq!(b.labels[3], -100, "first token of a packed document is not a target");
        assert_eq!(&b.input_ids[8..13], &[30, 31, 32, 33, 34]);
        assert_eq!(b.targets()[2], -100, "no prediction across the document boundary");
    }
}
