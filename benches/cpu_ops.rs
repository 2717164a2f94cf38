//! Criterion benchmarks of the CPU reference backend's hot ops on SmolLM2-135M shapes (the CPU is the
//! demo's trainer). `cargo bench --bench cpu_ops`. GPU kernels get their own benches with the CUDA
//! backend's performance work (docs/PERF.md).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llamatune::backend::cpu::Cpu;
use llamatune::backend::{AttnShape, Backend, HostWeight};
use llamatune::config::{ComputeDtype, QuantConfig, QuantType};
use llamatune::quant::Quant4;
use rand::{Rng, SeedableRng};

const BE: Cpu<f32> = Cpu::new();
/// Token rows of one micro-batch of the demo (2 × 128).
const M: usize = 256;

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0..1.0)).collect()
}

fn linear(c: &mut Criterion) {
    let (rows, cols) = (1536, 576); // SmolLM2 gate/up projection
    let data: Vec<f32> = rnd(rows * cols, 1).iter().map(|x| x * 0.05).collect();
    let x = rnd(M * cols, 2);
    let mut y = vec![0f32; M * rows];
    let mut g = c.benchmark_group("linear 256x576 -> 1536");
    g.throughput(Throughput::Elements((2 * M * rows * cols) as u64)); // FLOPs
    let dense = BE.upload_weight(HostWeight::Dense { rows, cols, data: data.clone() });
    g.bench_function("dense f32", |b| b.iter(|| BE.linear(&x, &dense, M, &mut y)));
    for (name, compute) in [("nf4 f32-compute", ComputeDtype::F32), ("nf4 f16-compute", ComputeDtype::F16)] {
        let q = Quant4::quantize(
            &data,
            &QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true, compute_dtype: compute },
        );
        let w = BE.upload_weight(HostWeight::Quant4 { rows, cols, q, compute });
        g.bench_function(name, |b| b.iter(|| BE.linear(&x, &w, M, &mut y)));
    }
    g.finish();

    // Decoding's one row: the 4-bit weight read from its codes, the dense one by dot products
    // (floor: the codes, 0.44 MB, or the f32 weight, 3.5 MB, read once).
    let mut g = c.benchmark_group("linear 1x576 -> 1536 (decoding)");
    g.throughput(Throughput::Elements((2 * rows * cols) as u64));
    let (x1, mut y1) = (x[..cols].to_vec(), vec![0f32; rows]);
    g.bench_function("dense f32", |b| b.iter(|| BE.linear(&x1, &dense, 1, &mut y1)));
    let q = Quant4::quantize(
        &data,
        &QuantConfig {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            compute_dtype: ComputeDtype::F32,
        },
    );
    let w = BE.upload_weight(HostWeight::Quant4 { rows, cols, q, compute: ComputeDtype::F32 });
    g.bench_function("nf4 f32-compute", |b| b.iter(|| BE.linear(&x1, &w, 1, &mut y1)));
    g.finish();
}

fn attention(c: &mut Criterion) {
    let sh = AttnShape::square(2, 128, 9, 3, 64); // SmolLM2 heads
    let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
    let nk = sh.batch * sh.kv_len * sh.kv_heads * sh.head_dim;
    let (q, k, v, dout) = (rnd(nq, 3), rnd(nk, 4), rnd(nk, 5), rnd(nq, 6));
    let (mut out, mut lse) = (vec![0f32; nq], vec![0f32; sh.batch * sh.heads * sh.q_len]);
    let mut g = c.benchmark_group("attention 2x128, 9/3 heads, d64");
    g.bench_function("forward", |b| b.iter(|| BE.attention(&q, &k, &v, sh, None, &mut out, &mut lse)));
    let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
    g.bench_function("backward", |b| {
        b.iter(|| BE.attention_backward(&q, &k, &v, &out, &lse, &dout, sh, None, &mut dq, &mut dk, &mut dv))
    });
    g.finish();
}

fn quantize(c: &mut Criterion) {
    let data: Vec<f32> = rnd(1536 * 576, 7).iter().map(|x| x * 0.05).collect();
    let mut g = c.benchmark_group("quantize 1536x576");
    g.throughput(Throughput::Elements(data.len() as u64));
    for dq in [false, true] {
        let cfg = QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: dq, ..QuantConfig::default() };
        g.bench_function(if dq { "nf4 double-quant" } else { "nf4" }, |b| b.iter(|| Quant4::quantize(&data, &cfg)));
    }
    g.finish();
}

criterion_group!(benches, linear, attention, quantize);
criterion_main!(benches);
