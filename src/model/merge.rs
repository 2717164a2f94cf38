//! Folding LoRA adapters into the base weights: `W' = W + scaling · B · A`, dense, as PEFT's
//! `merge_and_unload` does. A 4-bit base is dequantized first, so the merged model is 16/32-bit.

use crate::backend::{Backend, HostWeight};
use crate::model::llama::{Layer, Llama};
use crate::model::lora::{Lora, Proj};

/// `w (rows, cols) += scale · b (rows, r) · a (r, cols)`, in f64 accumulation.
pub fn add_lora_product(w: &mut [f32], a: &[f64], b: &[f64], rows: usize, cols: usize, r: usize, scale: f64) {
    for i in 0..rows {
        for j in 0..cols {
            let mut s = 0f64;
            for k in 0..r {
                s += b[i * r + k] * a[k * cols + j];
            }
            w[i * cols + j] += (scale * s) as f32;
        }
    }
}

/// A new model with every adapter folded in (all projections dense).
pub fn merge<B: Backend>(be: &B, model: &Llama<B>, lora: &Lora<B>) -> Llama<B> {
    let cfg = model.cfg.clone();
    let r = lora.cfg.r;
    let scale = lora.cfg.scaling();
    let layers = model
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let proj = Proj::ALL.map(|p| {
                let host = be.weight_to_host(&layer.proj[p as usize]);
                let (rows, cols) = host.shape();
                let mut data = host.to_f32();
                if let Some(pair) = &lora.layers[l][p as usize] {
                    add_lora_product(
                        &mut data,
                        &be.download_f64(&pair.a),
                        &be.download_f64(&pair.b),
                        rows,
                        cols,
                        r,
                        scale,
                    );
                }
                be.upload_weight(HostWeight::Dense { rows, cols, data })
            });
            Layer { attn_norm: layer.attn_norm.clone(), mlp_norm: layer.mlp_norm.clone(), proj }
        })
        .collect();
    let copy = |w: &B::Weight| be.upload_weight(be.weight_to_host(w));
    Llama {
        cfg,
        embed: copy(&model.embed),
        layers,
        norm: model.norm.clone(),
        lm_head: model.lm_head.as_ref().map(copy),
    }
}
