//! RoPE frequency tables, computed on the host the way transformers computes them (float32 inverse
//! frequencies, float32 angle products), including the `linear`, `dynamic` and `llama3` scalings.

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `(head_dim / 2)` for a forward pass whose largest position is `seq_len - 1`
/// (`dynamic` scaling depends on it).
pub fn inv_freq(cfg: &ModelConfig, seq_len: usize) -> Vec<f32> {
    let dim = cfg.head_dim;
    let mut base = cfg.rope_theta;
    if let Some(RopeScaling::Dynamic { factor }) = cfg.rope_scaling {
        let max_pos = cfg.max_position_embeddings as f64;
        let seq = (seq_len as f64).max(max_pos);
        if seq > max_pos {
            base *= ((factor * seq / max_pos) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
        }
    }
    let raw: Vec<f32> = (0..dim / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / dim as f64)) as f32).collect();
    match cfg.rope_scaling {
        Some(RopeScaling::Linear { factor }) => raw.iter().map(|f| f / factor as f32).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            raw.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let out = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    out as f32
                })
                .collect()
        }
        _ => raw,
    }
}

/// `cos` and `sin` tables `(positions.len(), head_dim / 2)` for the given absolute positions.
pub fn tables(cfg: &ModelConfig, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let seq_len = positions.iter().copied().max().map_or(1, |p| p as usize + 1);
    let inv = inv_freq(cfg, seq_len);
    let half = inv.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in &inv {
            let angle = p as f32 * f; // float32 product, as torch computes it
            cos.push((angle as f64).cos() as f32);
            sin.push((angle as f64).sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(scaling: serde_json::Value) -> ModelConfig {
        ModelConfig::from_json(
            &json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 128, "intermediate_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 1, "rope_theta": 500000.0,
                    "max_position_embeddings": 100, "rope_scaling": scaling}),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn default_frequencies() {
        let c = cfg(serde_json::Value::Null);
        let f = inv_freq(&c, 10);
        assert_eq!(f[0], 1.0);
        assert!((f[1] as f64 - 500000f64.powf(-2.0 / 128.0)).abs() < 1e-7);
    }

    #[test]
    fn scalings_change_what_they_should() {
        let plain = inv_freq(&cfg(serde_json::Value::Null), 10);
        let lin = inv_freq(&cfg(json!({"type": "linear", "factor": 4.0})), 10);
        assert!(plain.iter().zip(&lin).all(|(a, b)| (a / 4.0 - b).abs() < 1e-9));
        // dynamic: unchanged inside the trained context, a larger base beyond it.
        let dy = json!({"type": "dynamic", "factor": 2.0});
        assert_eq!(inv_freq(&cfg(dy.clone()), 50), plain);
        assert!(inv_freq(&cfg(dy), 400)[10] < plain[10]);
        // llama3: high frequencies kept, low frequencies divided by factor.
        let l3 = inv_freq(
            &cfg(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192})),
            10,
        );
        assert_eq!(l3[0], plain[0]);
        assert!((l3[63] - plain[63] / 8.0).abs() < 1e-12);
    }
}
