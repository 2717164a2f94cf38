//! The optimizer side of a step: global gradient norm and clipping (as `torch.nn.utils.clip_grad_norm_`),
//! 32-bit AdamW over every LoRA tensor (bitsandbytes' update rule), and learning-rate schedules
//! (as transformers' `get_scheduler`).

use crate::backend::{AdamWStep, Backend};
use crate::model::lora::{Lora, LoraGrads};

/// AdamW hyper-parameters; defaults are transformers' (`adam_beta1=0.9`, `adam_beta2=0.999`,
/// `adam_epsilon=1e-8`) with the recipe's weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.001 }
    }
}

/// Where the optimizer's `m` and `v` live.
pub enum OptimState<B: Backend> {
    /// On the device, next to the parameters.
    Device { m: Vec<B::Buf>, v: Vec<B::Buf> },
    /// In host memory (pinned on CUDA), streamed through the device `chunk` values at a time:
    /// bitsandbytes' paged optimizer without its unified-memory page faults.
    Paged { m: Vec<B::HostBuf>, v: Vec<B::HostBuf>, chunk: usize },
}

/// 32-bit AdamW state (`m`, `v`) for every LoRA tensor, in [`Lora::params_mut`] order.
pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    pub state: OptimState<B>,
    /// Updates applied so far.
    pub step: u32,
}

/// Values streamed per chunk by a paged optimizer (16 MiB of m + v at f32).
pub const PAGED_CHUNK: usize = 1 << 21;

/// Whether `paged_adamw_32bit` state (`state_bytes`: m and v) goes to pinned host memory: when it
/// exceeds the user's budget, or else a quarter of the device's free memory. Like bitsandbytes'
/// paged optimizers, state stays on the device while it fits.
pub fn should_page(state_bytes: f64, budget_mb: Option<f64>, free_bytes: Option<u64>) -> bool {
    match (budget_mb, free_bytes) {
        (Some(mb), _) => state_bytes > mb * (1u64 << 20) as f64,
        (None, Some(free)) => state_bytes > free as f64 / 4.0,
        (None, None) => false,
    }
}

impl<B: Backend> AdamW<B> {
    /// Zero state on the device.
    pub fn new(be: &B, lora: &Lora<B>, cfg: AdamWConfig) -> Self {
        let shapes: Vec<usize> = lora.named_params().iter().map(|(_, b)| be.buf_len(b)).collect();
        AdamW {
            cfg,
            state: OptimState::Device {
                m: shapes.iter().map(|&n| be.zeros(n)).collect(),
                v: shapes.iter().map(|&n| be.zeros(n)).collect(),
            },
            step: 0,
        }
    }

    /// Zero state in host memory, streamed through the device `chunk` values at a time.
    pub fn new_paged(be: &B, lora: &Lora<B>, cfg: AdamWConfig, chunk: usize) -> Self {
        let shapes: Vec<usize> = lora.named_params().iter().map(|(_, b)| be.buf_len(b)).collect();
        AdamW {
            cfg,
            state: OptimState::Paged {
                m: shapes.iter().map(|&n| be.host_buf(&vec![0.0; n])).collect(),
                v: shapes.iter().map(|&n| be.host_buf(&vec![0.0; n])).collect(),
                chunk,
            },
            step: 0,
        }
    }

    pub fn is_paged(&self) -> bool {
        matches!(self.state, OptimState::Paged { .. })
    }

    /// `(m, v)` of tensor `i` on the host (for checkpoints).
    pub fn state_of(&self, be: &B, i: usize) -> (Vec<f32>, Vec<f32>) {
        match &self.state {
            OptimState::Device { m, v } => (be.download(&m[i]), be.download(&v[i])),
            OptimState::Paged { m, v, .. } => (be.host_to_vec(&m[i]), be.host_to_vec(&v[i])),
        }
    }

    /// Replaces the state of tensor `i` (when resuming).
    pub fn set_state(&mut self, be: &B, i: usize, m_new: &[f32], v_new: &[f32]) {
        match &mut self.state {
            OptimState::Device { m, v } => {
                m[i] = be.upload(m_new);
                v[i] = be.upload(v_new);
            }
            OptimState::Paged { m, v, .. } => {
                m[i] = be.host_buf(m_new);
                v[i] = be.host_buf(v_new);
            }
        }
    }

    /// One update at learning rate `lr`, gradients multiplied by `grad_scale` first (clipping).
    pub fn update(&mut self, be: &B, lora: &mut Lora<B>, grads: &LoraGrads<B>, lr: f32, grad_scale: f32) {
        self.step += 1;
        let hp = AdamWStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.step,
            grad_scale,
        };
        match &mut self.state {
            OptimState::Device { m, v } => be.adamw_all(lora.params_mut(), grads.bufs(), m, v, &hp),
            OptimState::Paged { m, v, chunk } => {
                for (((p, g), m), v) in lora.params_mut().into_iter().zip(grads.bufs()).zip(m).zip(v) {
                    be.adamw_paged(p, g, m, v, &hp, *chunk);
                }
            }
        }
    }
}

/// The global L2 norm of all gradients (accumulated in f64).
pub fn grad_norm<B: Backend>(be: &B, grads: &LoraGrads<B>) -> f64 {
    be.sum_squares_all(&grads.bufs()).sqrt()
}

/// The factor `clip_grad_norm_` multiplies gradients by: `max_norm / (norm + 1e-6)` when that is
/// below 1, else 1. A non-positive `max_norm` disables clipping.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Learning-rate schedules of transformers' `get_scheduler`, with its default arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    /// One cycle (`num_cycles = 1`): the cosine's half wave, and 0 from the last step on.
    CosineWithRestarts,
    /// Linear decay to `lr_end = 1e-7` (`power = 1`).
    Polynomial,
    /// `1/√((step + shift)/timescale)` after warm-up, `timescale` = the warm-up steps (or 10,000).
    InverseSqrt,
}

/// The names [`Schedule::parse`] takes, for messages.
pub const SCHEDULE_NAMES: &str =
    "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt";

/// transformers' `get_polynomial_decay_schedule_with_warmup` default `lr_end`.
const POLYNOMIAL_LR_END: f64 = 1e-7;

impl Schedule {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "constant" => Some(Schedule::Constant),
            "constant_with_warmup" => Some(Schedule::ConstantWithWarmup),
            "linear" => Some(Schedule::Linear),
            "cosine" => Some(Schedule::Cosine),
            "cosine_with_restarts" => Some(Schedule::CosineWithRestarts),
            "polynomial" => Some(Schedule::Polynomial),
            "inverse_sqrt" => Some(Schedule::InverseSqrt),
            _ => None,
        }
    }

    /// The learning rate at optimizer step `step` (0-based) for a base (peak) rate `base`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if self == Schedule::Polynomial && step >= warmup {
            // The decay ends at an absolute rate, so its multiplier depends on the base rate.
            if step > total {
                return POLYNOMIAL_LR_END;
            }
            let remaining = 1.0 - (step - warmup) as f64 / (total - warmup).max(1) as f64;
            return (base - POLYNOMIAL_LR_END) * remaining + POLYNOMIAL_LR_END;
        }
        base * self.factor(step, warmup, total)
    }

    /// The multiplier of the base learning rate at optimizer step `step` (0-based); for
    /// [`Schedule::Polynomial`] after warm-up see [`Schedule::lr`].
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if self != Schedule::Constant && step < warmup {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear | Schedule::Polynomial => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Schedule::CosineWithRestarts if progress >= 1.0 => 0.0,
            Schedule::CosineWithRestarts => (0.5 * (1.0 + (std::f64::consts::PI * (progress % 1.0)).cos())).max(0.0),
            Schedule::InverseSqrt => {
                let timescale = if warmup > 0 { w } else { 10_000.0 };
                1.0 / ((s + timescale - w) / timescale).sqrt()
            }
        }
    }
}

/// Warm-up steps from a ratio, rounded up as transformers does.
pub fn warmup_steps(ratio: f64, total: usize) -> usize {
    (ratio * total as f64).ceil() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn schedules_match_transformers() {
        assert_eq!(warmup_steps(0.03, 100), 3);
        let l = Schedule::Linear;
        assert_eq!(l.factor(0, 3, 100), 0.0);
        assert!((l.factor(2, 3, 100) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(l.factor(3, 3, 100), 1.0);
        assert!((l.factor(50, 3, 100) - 50.0 / 97.0).abs() < 1e-12);
        assert_eq!(Schedule::Cosine.factor(100, 3, 100), 0.0);
        assert!((Schedule::Cosine.factor(3 + 97 / 2, 3, 100) - 0.5).abs() < 0.02);
        assert_eq!(Schedule::Constant.factor(0, 3, 100), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(1, 4, 100), 0.25);
        // cosine_with_restarts with one cycle: the cosine, then 0 from the last step on.
        let r = Schedule::CosineWithRestarts;
        assert_eq!(r.factor(2, 4, 100), 0.5);
        assert_eq!(r.factor(40, 4, 100), Schedule::Cosine.factor(40, 4, 100));
        assert_eq!(r.factor(100, 4, 100), 0.0);
        // polynomial (power 1) to lr_end = 1e-7: halfway, (lr − 1e-7)/2 + 1e-7.
        let p = Schedule::Polynomial;
        assert_eq!(p.lr(2e-4, 2, 4, 104), 1e-4);
        assert!((p.lr(2e-4, 54, 4, 104) - ((2e-4 - 1e-7) * 0.5 + 1e-7)).abs() < 1e-15);
        assert!((p.lr(2e-4, 104, 4, 104) - 1e-7).abs() < 1e-18);
        assert_eq!(p.lr(2e-4, 105, 4, 104), 1e-7);
        // inverse_sqrt, timescale = warm-up: 1 at the warm-up's end, 1/√2 a warm-up later.
        let i = Schedule::InverseSqrt;
        assert_eq!(i.factor(4, 4, 100), 1.0);
        assert!((i.factor(8, 4, 100) - 0.5f64.sqrt()).abs() < 1e-15);
        assert!((i.factor(30_000, 0, 100_000) - 0.5).abs() < 1e-15, "timescale 10,000 without warm-up");
        assert_eq!(Schedule::parse("inverse_sqrt"), Some(i));
    }

    #[test]
    fn clipping_coefficient() {
        assert_eq!(clip_coefficient(0.1, 0.3), 1.0);
        assert!((clip_coefficient(3.0, 0.3) - 0.3 / (3.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_coefficient(3.0, 0.0), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // With bias correction the first Adam step is lr·sign(g) (|g| ≫ eps), then decay.
        let be = Cpu::<f32>::new();
        let mut p = vec![1.0f32, -2.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        let hp =
            AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
        be.adamw(&mut p, &vec![0.5, -3.0], &mut m, &mut v, &hp);
        assert!((p[0] - (1.0 - 0.1) * (1.0 - 0.001)).abs() < 1e-5, "{p:?}");
        assert!((p[1] - (-2.0 + 0.1) * (1.0 - 0.001)).abs() < 1e-5, "{p:?}");
    }
}
