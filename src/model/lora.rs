//! LoRA adapters as PEFT defines them: for a frozen `W (out, in)`, trainable `A (r, in)` and
//! `B (out, r)`, output `W x + scaling · B A dropout(x)`. A starts Kaiming-uniform(a=√5) (uniform in
//! ±1/√in), B starts at zero, so training starts from the base model exactly.

use crate::backend::Backend;
use crate::config::{LoraConfig, ModelConfig, LLAMA_LINEAR_NAMES};
use rand::{Rng, SeedableRng};

/// The seven linear layers of a Llama decoder layer, in PEFT's naming order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        LLAMA_LINEAR_NAMES[self as usize]
    }
    /// The Hugging Face module path under a layer (`self_attn.q_proj`, `mlp.down_proj`).
    pub fn hf_path(self) -> String {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => format!("self_attn.{}", self.name()),
            _ => format!("mlp.{}", self.name()),
        }
    }
    /// `(out_features, in_features)` of this projection.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.hidden_size),
            Proj::K | Proj::V => (c.kv_dim(), c.hidden_size),
            Proj::O => (c.hidden_size, c.q_dim()),
            Proj::Gate | Proj::Up => (c.intermediate_size, c.hidden_size),
            Proj::Down => (c.hidden_size, c.intermediate_size),
        }
    }
}

/// One adapter's two matrices.
pub struct LoraPair<B: Backend> {
    /// `(r, in)`
    pub a: B::Buf,
    /// `(out, r)`
    pub b: B::Buf,
}

impl<B: Backend> Clone for LoraPair<B> {
    fn clone(&self) -> Self {
        LoraPair { a: self.a.clone(), b: self.b.clone() }
    }
}

/// All adapters of a model: `layers[l][proj]` is `Some` for targeted modules.
pub struct Lora<B: Backend> {
    pub cfg: LoraConfig,
    pub layers: Vec<[Option<LoraPair<B>>; 7]>,
}

impl<B: Backend> Lora<B> {
    /// Fresh adapters initialised as PEFT does (A Kaiming-uniform, B zero), from `seed`.
    pub fn init(be: &B, model: &ModelConfig, cfg: LoraConfig, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                Proj::ALL.map(|p| {
                    if !cfg.targets(p.name()) {
                        return None;
                    }
                    let (out, inp) = p.shape(model);
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f64> = (0..cfg.r * inp).map(|_| rng.gen_range(-bound..bound)).collect();
                    Some(LoraPair { a: be.upload_f64(&a), b: be.zeros(out * cfg.r) })
                })
            })
            .collect();
        Lora { cfg, layers }
    }

    /// Replaces every B with small random values (tests and benchmarks: PEFT's zero B makes the
    /// adapter's output and dA exactly zero on the first step, which hides errors and work).
    pub fn randomize_b(&mut self, be: &B, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for pair in self.layers.iter_mut().flatten().flatten() {
            let n = be.buf_len(&pair.b);
            let b: Vec<f64> = (0..n).map(|_| rng.gen_range(-0.01..0.01)).collect();
            pair.b = be.upload_f64(&b);
        }
    }

    pub fn scaling(&self) -> f32 {
        self.cfg.scaling() as f32
    }

    /// Every trainable tensor with its PEFT name, A before B, layers in order.
    pub fn named_params(&self) -> Vec<(String, &B::Buf)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &layer[p as usize] {
                    let base = format!("base_model.model.model.layers.{l}.{}", p.hf_path());
                    out.push((format!("{base}.lora_A.weight"), &pair.a));
                    out.push((format!("{base}.lora_B.weight"), &pair.b));
                }
            }
        }
        out
    }

    /// Mutable access to every trainable tensor, in the order of [`Lora::named_params`].
    pub fn params_mut(&mut self) -> Vec<&mut B::Buf> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            for pair in layer.iter_mut().flatten() {
                out.push(&mut pair.a);
                out.push(&mut pair.b);
            }
        }
        out
    }

    /// Gradient buffers of the same shapes, zeroed.
    pub fn zero_grads(&self, be: &B) -> LoraGrads<B> {
        LoraGrads {
            layers: self
                .layers
                .iter()
                .map(|layer| {
                    std::array::from_fn(|i| {
                        layer[i]
                            .as_ref()
                            .map(|pair| LoraPair { a: be.zeros(be.buf_len(&pair.a)), b: be.zeros(be.buf_len(&pair.b)) })
                    })
                })
                .collect(),
        }
    }

    pub fn num_params(&self, be: &B) -> usize {
        self.named_params().iter().map(|(_, b)| be.buf_len(b)).sum()
    }
}

/// Trainable parameters an adapter of `cfg` has on a model of shape `model`.
pub fn param_count(model: &ModelConfig, cfg: &LoraConfig) -> usize {
    let per_layer: usize = Proj::ALL
        .iter()
        .filter(|p| cfg.targets(p.name()))
        .map(|p| {
            let (out, inp) = p.shape(model);
            cfg.r * (out + inp)
        })
        .sum();
    per_layer * model.num_hidden_layers
}

/// Gradients of every adapter, laid out like [`Lora`].
pub struct LoraGrads<B: Backend> {
    pub layers: Vec<[Option<LoraPair<B>>; 7]>,
}

impl<B: Backend> LoraGrads<B> {
    /// Every gradient tensor, in the order of [`Lora::named_params`].
    pub fn bufs(&self) -> Vec<&B::Buf> {
        let mut out = Vec::new();
        for layer in &self.layers {
            for pair in layer.iter().flatten() {
                out.push(&pair.a);
                out.push(&pair.b);
            }
        }
        out
    }
    pub fn bufs_mut(&mut self) -> Vec<&mut B::Buf> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            for pair in layer.iter_mut().flatten() {
                out.push(&mut pair.a);
                out.push(&mut pair.b);
            }
        }
        out
    }
    pub fn zero(&mut self, be: &B) {
        // Zeros written, not `*= 0`, which would keep a NaN from a skipped step.
        be.zero_all(self.bufs_mut());
    }
}
