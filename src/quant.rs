//! Blockwise 4-bit quantization, bit-compatible with bitsandbytes' CUDA kernels
//! (`quantize_4bit` / `dequantize_4bit`, and `compress_statistics=True` double quantization).
//!
//! Layout, as bitsandbytes stores it for a flattened weight of `n` values:
//! - one f32 `absmax` per block of `blocksize` values (the last block may be partial);
//! - codes packed two per byte, element `2j` in the **high** nibble and `2j+1` in the low nibble;
//! - a value is coded as the nearest table entry to `x * (1/absmax)` (computed in f32, the way the
//!   kernel does, so ties and rounding fall the same way), via the kernel's comparison trees.
//!
//! Double quantization stores `absmax - mean(absmax)` with 8-bit blockwise quantization (blocksize
//! 256) over bitsandbytes' signed dynamic code, plus one f32 absmax per 256 blocks and the f32 mean.

use crate::config::{QuantConfig, QuantType};
use rayon::prelude::*;

/// bitsandbytes' NF4 code (the normal-float quantiles of the QLoRA paper), digits as bitsandbytes
/// prints its float32 table.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' FP4 code (e2m1 with its own bias): index bit 3 is the sign.
#[allow(clippy::excessive_precision)]
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.005_208_333_3,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333_3,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

pub fn code_table(t: QuantType) -> &'static [f32; 16] {
    match t {
        QuantType::Nf4 => &NF4_CODE,
        QuantType::Fp4 => &FP4_CODE,
    }
}

/// The NF4 code of a value already scaled into [-1, 1]: the decision tree of bitsandbytes'
/// `dQuantizeNF4` (thresholds are midpoints between neighbouring codes; a tie goes down).
pub fn quantize_nf4(x: f32) -> u8 {
    if x > 0.039_790_15 {
        if x > 0.389_312_54 {
            if x > 0.642_786_9 {
                if x > 0.861_478_4 {
                    15
                } else {
                    14
                }
            } else if x > 0.501_663_4 {
                13
            } else {
                12
            }
        } else if x > 0.203_521_25 {
            if x > 0.292_013_77 {
                11
            } else {
                10
            }
        } else if x > 0.120_255_25 {
            9
        } else {
            8
        }
    } else if x > -0.339_679_43 {
        if x > -0.137_911_73 {
            if x > -0.045_525_018 {
                7
            } else {
                6
            }
        } else if x > -0.234_607_4 {
            5
        } else {
            4
        }
    } else if x > -0.610_632_9 {
        if x > -0.459_995_27 {
            3
        } else {
            2
        }
    } else if x > -0.848_096_4 {
        1
    } else {
        0
    }
}

/// The FP4 code of a value scaled into [-1, 1]: bitsandbytes' `dQuantizeFP4`.
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 8 } else { 0 };
    let x = x.abs();
    let mag = if x > 0.291_666_67 {
        if x > 0.583_333 {
            if x > 0.833_333_3 {
                3
            } else {
                2
            }
        } else if x > 0.416_666_7 {
            5
        } else {
            4
        }
    } else if x > 0.085_937_5 {
        if x > 0.208_333_33 {
            7
        } else {
            6
        }
    } else if x > 0.002_604_17 {
        1
    } else {
        0
    };
    mag + sign
}

fn quantize_4bit_value(t: QuantType, x: f32) -> u8 {
    match t {
        QuantType::Nf4 => quantize_nf4(x),
        QuantType::Fp4 => quantize_fp4(x),
    }
}

/// bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map(signed=True)`), used for the
/// double-quantized absmax. Built the way torch builds it: float32 linspace and float32 products.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let max_exponent_bits = 7;
    for i in 0..max_exponent_bits {
        let items = (1usize << i) + 1;
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite code values"));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)` as the CPU kernel computes it: the first half
/// counts up from `start`, the second half down from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 }).collect()
}

/// The 8-bit code of `x` (already scaled): the nearest entry of the sorted `code` (the first on a
/// tie). bitsandbytes 0.50's `quantize_blockwise` agrees on every double-quantized absmax of the
/// parity suite (parity/run.py), where an older odd-codes-only search did not.
pub fn quantize_8bit(code: &[f32; 256], x: f32) -> u8 {
    // First index whose value is >= x, then the nearer of it and its left neighbour.
    let hi = code.partition_point(|&c| c < x).min(255);
    if hi == 0 {
        return 0;
    }
    let lo = hi - 1;
    if (x - code[lo]).abs() <= (x - code[hi]).abs() {
        lo as u8
    } else {
        hi as u8
    }
}

/// Per-block scales of a 4-bit tensor: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    /// `absmax[i] = code[q[i]] * absmax2[i / 256] + offset`.
    Nested {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

/// Blocksize of the second quantization level in bitsandbytes' double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

impl Absmax {
    /// The f32 absmax of every block.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::F32(v) => v.clone(),
            Absmax::Nested { q, absmax2, offset } => {
                let code = dynamic_map_signed();
                q.iter().enumerate().map(|(i, &c)| code[c as usize] * absmax2[i / NESTED_BLOCKSIZE] + offset).collect()
            }
        }
    }
}

/// A 4-bit blockwise-quantized tensor (flattened row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Quant4 {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Number of values (the packed array holds `ceil(n/2)` bytes).
    pub n: usize,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// f32 absmax per block and each block scaled by the f32 reciprocal, as the kernel does.
fn blockwise_absmax(data: &[f32], blocksize: usize) -> Vec<f32> {
    data.chunks(blocksize).map(|b| b.iter().fold(f32::MIN, |m, v| m.max(v.abs()))).collect()
}

/// 8-bit blockwise quantization over the dynamic code (bitsandbytes' `quantize_blockwise`).
pub fn quantize_blockwise_8bit(data: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let code = dynamic_map_signed();
    let absmax = blockwise_absmax(data, blocksize);
    let mut q = Vec::with_capacity(data.len());
    for (block, &am) in data.chunks(blocksize).zip(&absmax) {
        let inv = 1.0f32 / am;
        q.extend(block.iter().map(|&x| quantize_8bit(&code, x * inv)));
    }
    (q, absmax)
}

impl Quant4 {
    /// Quantizes `data` (the flattened weight) as `bitsandbytes.functional.quantize_4bit` does.
    pub fn quantize(data: &[f32], cfg: &QuantConfig) -> Quant4 {
        let bs = cfg.blocksize;
        assert!(bs >= 2 && bs % 2 == 0, "blocksize must be even");
        let absmax = blockwise_absmax(data, bs);
        let mut packed = vec![0u8; data.len().div_ceil(2)];
        // Blocks are independent and (blocksize being even) own whole bytes: quantize them in parallel.
        packed.par_chunks_mut(bs / 2).zip(data.par_chunks(bs)).zip(absmax.par_iter()).for_each(
            |((bytes, block), am)| {
                let inv = 1.0f32 / am;
                for (j, &x) in block.iter().enumerate() {
                    let c = quantize_4bit_value(cfg.quant_type, x * inv);
                    bytes[j / 2] |= if j % 2 == 0 { c << 4 } else { c };
                }
            },
        );
        let absmax = if cfg.double_quant {
            let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (q, absmax2) = quantize_blockwise_8bit(&centred, NESTED_BLOCKSIZE);
            Absmax::Nested { q, absmax2, offset }
        } else {
            Absmax::F32(absmax)
        };
        Quant4 { quant_type: cfg.quant_type, blocksize: bs, n: data.len(), packed, absmax }
    }

    /// The 4-bit code of element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        let b = self.packed[i / 2];
        if i % 2 == 0 {
            b >> 4
        } else {
            b & 0x0f
        }
    }

    /// Dequantizes every value to f32 (`code[c] * absmax[block]`).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n];
        self.dequantize_range(0, &mut out);
        out
    }

    /// Dequantizes `out.len()` values starting at flat index `start` (used to expand one row at a time).
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        self.dequantize_range_map(start, out, |v| v);
    }

    /// [`Quant4::dequantize_range`] with `map` applied to each value as it is written (the CPU
    /// backend rounds to the compute dtype and converts to its float type in the same pass).
    pub fn dequantize_range_map<T: Send>(&self, start: usize, out: &mut [T], map: impl Fn(f32) -> T + Sync) {
        let table = code_table(self.quant_type);
        if out.is_empty() {
            return;
        }
        // Only the blocks this range touches: expanding every nested absmax per call made a
        // slab-by-slab matmul quadratic in the weight's size.
        let (b0, b1) = (start / self.blocksize, (start + out.len() - 1) / self.blocksize + 1);
        let absmax: std::borrow::Cow<'_, [f32]> = match &self.absmax {
            Absmax::F32(v) => std::borrow::Cow::Borrowed(&v[b0..b1]),
            Absmax::Nested { q, absmax2, offset } => {
                let code = dynamic_map_signed();
                std::borrow::Cow::Owned(
                    (b0..b1).map(|b| code[q[b] as usize] * absmax2[b / NESTED_BLOCKSIZE] + offset).collect(),
                )
            }
        };
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            // Walk the chunk one absmax block at a time, so the scale is looked up once per block.
            let first = start + c * CHUNK;
            let mut k = 0;
            while k < chunk.len() {
                let i = first + k;
                let block = i / self.blocksize;
                let scale = absmax[block - b0];
                let end = ((block + 1) * self.blocksize - first).min(chunk.len());
                for (j, o) in chunk[k..end].iter_mut().enumerate() {
                    *o = map(table[self.code_at(i + j) as usize] * scale);
                }
                k = end;
            }
        });
    }

    /// Bytes this tensor occupies (codes + scales), for memory reports.
    pub fn nbytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(v) => 4 * v.len(),
                Absmax::Nested { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: QuantType, dq: bool) -> QuantConfig {
        QuantConfig { quant_type: t, blocksize: 64, double_quant: dq, ..QuantConfig::default() }
    }

    #[test]
    fn nf4_tree_is_nearest_code() {
        // Every value strictly between two thresholds must map to its nearest table entry.
        for i in 0..=20000 {
            let x = -1.0 + 2.0 * i as f32 / 20000.0;
            let c = quantize_nf4(x) as usize;
            let best = (0..16)
                .min_by(|&a, &b| (x - NF4_CODE[a]).abs().partial_cmp(&(x - NF4_CODE[b]).abs()).unwrap())
                .unwrap();
            assert!((x - NF4_CODE[c]).abs() <= (x - NF4_CODE[best]).abs() + 1e-6, "x={x} c={c} best={best}");
        }
        for (i, &v) in NF4_CODE.iter().enumerate() {
            assert_eq!(quantize_nf4(v) as usize, i);
        }
    }

    #[test]
    fn fp4_tree_maps_codes_to_themselves() {
        for (i, &v) in FP4_CODE.iter().enumerate() {
            if i == 8 {
                continue; // -0.0 is coded as +0 (sign taken from x < 0)
            }
            assert_eq!(quantize_fp4(v) as usize, i, "v={v}");
        }
    }

    #[test]
    fn exact_byte_layout_on_fixed_vector() {
        // One block of 4 values (blocksize 4): absmax 2.0; scaled: 1.0, -1.0, 0.0, 0.25.
        let data = [2.0f32, -2.0, 0.0, 0.5];
        let q = Quant4::quantize(
            &data,
            &QuantConfig { quant_type: QuantType::Nf4, blocksize: 4, double_quant: false, ..QuantConfig::default() },
        );
        // nf4: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.25 -> 10 (0.2461 is nearest). Element 0 in the high nibble.
        assert_eq!(q.packed, vec![0xF0, 0x7A]);
        assert_eq!(q.absmax, Absmax::F32(vec![2.0]));
        let q = Quant4::quantize(
            &data,
            &QuantConfig { quant_type: QuantType::Fp4, blocksize: 4, double_quant: false, ..QuantConfig::default() },
        );
        // fp4: 1.0 -> 3, -1.0 -> 11, 0 -> 0, 0.25 -> 7.
        assert_eq!(q.packed, vec![0x3B, 0x07]);
        assert_eq!(q.dequantize(), vec![2.0, -2.0, 0.0, 0.5]);
    }

    #[test]
    fn odd_length_and_partial_block() {
        let data: Vec<f32> = (0..67).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let q = Quant4::quantize(&data, &cfg(QuantType::Nf4, false));
        assert_eq!(q.packed.len(), 34);
        match &q.absmax {
            Absmax::F32(a) => {
                assert_eq!(a.len(), 2);
                assert_eq!(a[1], data[64..].iter().fold(0f32, |m, v| m.max(v.abs())));
            }
            _ => unreachable!(),
        }
        assert_eq!(q.packed[33] & 0x0f, 0, "the pad nibble stays zero");
        assert_eq!(q.dequantize().len(), 67);
    }

    fn pseudo_normal(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u1, u2): (f32, f32) = (r.gen::<f32>().max(1e-7), r.gen());
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos() * 0.02
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let data = pseudo_normal(64 * 200, 1);
        for t in [QuantType::Nf4, QuantType::Fp4] {
            let q = Quant4::quantize(&data, &cfg(t, false));
            let d = q.dequantize();
            let absmax = q.absmax.values();
            let table = code_table(t);
            // Largest gap between neighbouring codes bounds the per-value error (relative to absmax).
            let mut sorted: Vec<f32> = table.to_vec();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let max_gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
            for (i, (x, y)) in data.iter().zip(&d).enumerate() {
                assert!((x - y).abs() <= absmax[i / 64] * max_gap / 2.0 + 1e-7, "{t:?} i={i} {x} {y}");
            }
            let rel = (data.iter().zip(&d).map(|(x, y)| (x - y).powi(2)).sum::<f32>()
                / data.iter().map(|x| x * x).sum::<f32>())
            .sqrt();
            // NF4 on Gaussian data: ~10% relative RMS error is the known figure; FP4 is worse.
            let bound = if t == QuantType::Nf4 { 0.12 } else { 0.2 };
            assert!(rel < bound, "{t:?} relative rms error {rel}");
        }
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map_signed();
        assert_eq!(m[0], -m[254]);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
        // The finest step sits next to zero: 1e-6 * 0.55 (the mean of linspace(0.1, 1, 2)).
        let smallest_pos = m.iter().copied().filter(|&v| v > 0.0).fold(f32::MAX, f32::min);
        assert!((smallest_pos - 0.55e-6).abs() < 1e-12);
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(quantize_8bit(&m, v) as usize, i);
        }
        // Between two codes the nearer wins; beyond the ends the ends.
        assert_eq!(quantize_8bit(&m, m[10] * 0.9 + m[11] * 0.1) as usize, 10);
        assert_eq!(quantize_8bit(&m, m[10] * 0.1 + m[11] * 0.9) as usize, 11);
        assert_eq!(quantize_8bit(&m, -5.0), 0);
        assert_eq!(quantize_8bit(&m, 5.0), 255);
    }

    #[test]
    fn double_quant_reconstructs_absmax_within_bound() {
        let data = pseudo_normal(64 * 1000, 7);
        let plain = Quant4::quantize(&data, &cfg(QuantType::Nf4, false));
        let nested = Quant4::quantize(&data, &cfg(QuantType::Nf4, true));
        assert_eq!(plain.packed, nested.packed, "codes do not depend on how absmax is stored");
        let (Absmax::F32(exact), Absmax::Nested { absmax2, .. }) = (&plain.absmax, &nested.absmax) else {
            unreachable!()
        };
        let approx = nested.absmax.values();
        let code = dynamic_map_signed();
        let max_gap = code.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
        for (i, (a, b)) in exact.iter().zip(&approx).enumerate() {
            // Error at most half the widest code gap times that 256-block's scale (plus f32 rounding).
            let bound = absmax2[i / NESTED_BLOCKSIZE] * max_gap / 2.0 + 1e-6 * a;
            assert!((a - b).abs() <= bound, "block {i}: {a} vs {b} (bound {bound})");
        }
        assert!(nested.nbytes() < plain.nbytes());
    }
}
