//! Criterion benchmarks of the CUDA backend's ops on the Llama-2-7B shapes of one training step
//! (M = 2048 token rows) and of decoding (M = 1), each beside its rival in the same run: the 4-bit
//! linear (fused kernel, and dequantize + cuBLAS) against the same product with a dense bf16 weight
//! (cuBLAS alone), the GEMV against its
//! bytes at copy bandwidth (measured here by a residual add). Every iteration ends with a device
//! synchronization, so launch overhead counts (the GEMV, a few microseconds, runs 32 times per sync). `cargo bench --features cuda --bench gpu_kernels` on a
//! GPU host (scripts/stage-gpu.sh stages the binary); numbers go to docs/PERF.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llamatune::backend::cuda::{Cuda, Fused4bit};
use llamatune::backend::{AdamWStep, AttnShape, Backend, HostWeight, RopeTables};
use llamatune::config::{ComputeDtype, QuantConfig, QuantType};
use llamatune::quant::Quant4;
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

fn gpu() -> &'static Cuda {
    static G: OnceLock<Cuda> = OnceLock::new();
    G.get_or_init(|| Cuda::new(0).expect("a CUDA device"))
}

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-scale..scale)).collect()
}

/// (name, out features, in features) of the 7B projections.
const PROJ: [(&str, usize, usize); 3] =
    [("q/k/v/o 4096x4096", 4096, 4096), ("gate/up 11008x4096", 11008, 4096), ("down 4096x11008", 4096, 11008)];
const M: usize = 2048;

fn weights(rows: usize, cols: usize) -> (<Cuda as Backend>::Weight, <Cuda as Backend>::Weight) {
    let data = rnd(rows * cols, 1, 0.02);
    let q = QuantConfig {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: false,
        compute_dtype: ComputeDtype::BF16,
    };
    let nf4 = gpu().upload_weight(HostWeight::Quant4 {
        rows,
        cols,
        q: Quant4::quantize(&data, &q),
        compute: ComputeDtype::BF16,
    });
    // Not exactly fp16, so the dense weight is stored bf16: the plain cuBLAS bf16 GEMM.
    let dense = gpu().upload_weight(HostWeight::Dense { rows, cols, data });
    (nf4, dense)
}

fn linear(c: &mut Criterion) {
    let be = gpu();
    for (name, rows, cols) in PROJ {
        let (nf4, dense) = weights(rows, cols);
        let x = be.upload(&rnd(M * cols, 2, 1.0));
        let dy = be.upload(&rnd(M * rows, 3, 1.0));
        let mut y = be.zeros(M * rows);
        let mut dx = be.zeros(M * cols);
        let mut g = c.benchmark_group(format!("linear M=2048 {name}"));
        g.throughput(Throughput::Elements((2 * M * rows * cols) as u64)); // FLOPs
                                                                          // The fused kernel (where the device has it), the second path, and cuBLAS on a dense weight.
        let cases =
            [("nf4 fused", &nf4, true), ("nf4 dequant + cuBLAS", &nf4, false), ("bf16 cuBLAS (rival)", &dense, false)];
        for (label, w, fused) in cases {
            be.set_fused_4bit(if fused { Fused4bit::Always } else { Fused4bit::Off });
            g.bench_function(format!("{label} forward"), |b| {
                b.iter(|| {
                    be.linear(&x, w, M, &mut y);
                    be.synchronize();
                })
            });
            g.bench_function(format!("{label} input grad"), |b| {
                b.iter(|| {
                    be.linear_backward_input(&dy, w, M, &mut dx, false);
                    be.synchronize();
                })
            });
        }
        be.set_fused_4bit(Fused4bit::Auto);
        g.finish();
    }
}

/// Expanding a 4-bit weight into bf16 (the second path's first step, and the cost that keeping a
/// replay's expansions saves): whole 1,024-value segments a warp each against one thread per 32 values.
/// Throughput in bytes moved (codes + absmax + bf16 output), to set against the copy rate.
fn dequantize(c: &mut Criterion) {
    let be = gpu();
    for (name, rows, cols) in PROJ.into_iter().take(2) {
        let (nf4, _) = weights(rows, cols);
        let n = rows * cols;
        let mut g = c.benchmark_group(format!("dequantize {name}"));
        g.throughput(Throughput::Bytes((n / 2 + n / 64 * 4 + 2 * n) as u64));
        for (label, seg) in [("segments", true), ("32 values per thread", false)] {
            be.set_dequant_seg(seg);
            g.bench_function(format!("bf16, {label}"), |b| {
                b.iter(|| {
                    drop(be.dequantize(&nf4, ComputeDtype::BF16));
                    be.synchronize();
                })
            });
        }
        // Device time as the step sees it, without a synchronization per expansion.
        for (label, seg) in [("segments", true), ("32 values per thread", false)] {
            be.set_dequant_seg(seg);
            g.bench_function(format!("bf16, {label}, back to back"), |b| {
                b.iter_custom(|iters| back_to_back(be, iters, || drop(be.dequantize(&nf4, ComputeDtype::BF16))))
            });
        }
        be.set_dequant_seg(true);
        g.finish();
    }
}

/// Where the fused 4-bit kernel beats dequantize + cuBLAS: the 4096×4096 projection over token counts
/// from a short prompt to a training batch (the second path dequantizes all of W whatever M is).
fn linear_by_m(c: &mut Criterion) {
    let be = gpu();
    let (rows, cols) = (4096, 4096);
    let (nf4, _) = weights(rows, cols);
    for m in [16, 64, 128, 256, 512, 1024] {
        let x = be.upload(&rnd(m * cols, 2, 1.0));
        let dy = be.upload(&rnd(m * rows, 3, 1.0));
        let (mut y, mut dx) = (be.zeros(m * rows), be.zeros(m * cols));
        let mut g = c.benchmark_group(format!("linear nf4 4096x4096 M={m}"));
        g.throughput(Throughput::Elements((2 * m * rows * cols) as u64));
        for (label, fused) in [("fused", true), ("dequant + cuBLAS", false)] {
            be.set_fused_4bit(if fused { Fused4bit::Always } else { Fused4bit::Off });
            g.bench_function(format!("{label} forward"), |b| {
                b.iter(|| {
                    be.linear(&x, &nf4, m, &mut y);
                    be.synchronize();
                })
            });
            g.bench_function(format!("{label} input grad"), |b| {
                b.iter(|| {
                    be.linear_backward_input(&dy, &nf4, m, &mut dx, false);
                    be.synchronize();
                })
            });
        }
        be.set_fused_4bit(Fused4bit::Auto);
        g.finish();
    }
}

/// GEMV launches per timed iteration: one GEMV takes a few microseconds, less than a synchronization,
/// so they run back to back as in decoding (launch gaps still count, the sync's round trip does not).
const GEMV_REPS: usize = 32;

fn gemv(c: &mut Criterion) {
    let be = gpu();
    for (name, rows, cols) in PROJ {
        let (nf4, _) = weights(rows, cols);
        let x = be.upload(&rnd(cols, 4, 1.0));
        let mut y = be.zeros(rows);
        let mut g = c.benchmark_group(format!("gemv M=1 {name}"));
        // Bytes: codes + f32 absmax per 64 + x + y, for GEMV_REPS launches.
        let bytes = rows * cols / 2 + rows * cols / 64 * 4 + (rows + cols) * 4;
        g.throughput(Throughput::Bytes((GEMV_REPS * bytes) as u64));
        g.bench_function(format!("nf4 gemv ×{GEMV_REPS} back to back"), |b| {
            b.iter(|| {
                for _ in 0..GEMV_REPS {
                    be.linear(&x, &nf4, 1, &mut y);
                }
                be.synchronize();
            })
        });
        g.finish();
    }
    // The decoding layer's products that share x: q/k/v (3 × 4096 rows) and gate/up (2 × 11008), one
    // launch per weight against one launch for all (kernels/nf4.cu gemv_4bit_many_*).
    for (name, rows, n) in [("q/k/v 3x4096x4096", 4096, 3), ("gate/up 2x11008x4096", 11008, 2)] {
        let cols = 4096;
        let ws: Vec<_> = (0..n).map(|_| weights(rows, cols).0).collect();
        let x = be.upload(&rnd(cols, 4, 1.0));
        let mut ys: Vec<_> = (0..n).map(|_| be.zeros(rows)).collect();
        let mut g = c.benchmark_group(format!("gemv M=1 {name}"));
        let bytes = n * (rows * cols / 2 + rows * cols / 64 * 4 + rows * 4) + cols * 4;
        g.throughput(Throughput::Bytes((GEMV_REPS * bytes) as u64));
        for (label, one_launch) in [("one launch each", false), ("one launch", true)] {
            g.bench_function(format!("nf4 gemv, {label}, ×{GEMV_REPS} back to back"), |b| {
                be.set_gemv_many(one_launch);
                b.iter(|| {
                    for _ in 0..GEMV_REPS {
                        be.linear_many(&x, &ws.iter().collect::<Vec<_>>(), 1, &mut ys.iter_mut().collect::<Vec<_>>());
                    }
                    be.synchronize();
                })
            });
        }
        be.set_gemv_many(true);
        g.finish();
    }
}

fn bandwidth(c: &mut Criterion) {
    let be = gpu();
    let n = 64 << 20;
    let (a, b2) = (be.upload(&rnd(n, 5, 1.0)), be.upload(&rnd(n, 6, 1.0)));
    let mut out = be.zeros(n);
    let mut g = c.benchmark_group("copy bandwidth (out = a + b, 64M f32)");
    g.throughput(Throughput::Bytes((12 * n) as u64));
    g.bench_function("add", |b| {
        b.iter(|| {
            be.add(&a, &b2, &mut out);
            be.synchronize();
        })
    });
    g.finish();
}

/// The decoding GEMVs against a launch that only reads the same bytes (kernels/read_floor.cu), both
/// cold: a ring of buffers (weights) of 200 MB or more, past the 50 MB L2, each launch reading the next,
/// as decoding reads each layer's weights once per token. Launches back to back (a graph replays them
/// so). Does any read-only launch of these sizes beat the GEMV's 1.3-1.8 TB/s, and with how many loads
/// in flight per thread and blocks per SM?
fn read_floor_vs_gemv(c: &mut Criterion) {
    let be = gpu();
    let mut sink = be.zeros(1);
    for (name, rows, cols) in PROJ {
        let bytes = rows * cols / 2 + rows * cols / 64 * 4;
        let ring = (200usize << 20).div_ceil(bytes).max(2);
        let mut g =
            c.benchmark_group(format!("read floor, cold, {name} ({:.1} MB) x {ring} rotating", bytes as f64 / 1e6));
        g.throughput(Throughput::Bytes(bytes as u64));
        let floats = bytes.div_ceil(16) * 4;
        let bufs: Vec<_> = (0..ring).map(|i| be.upload(&rnd(floats, 20 + i as u64, 1.0))).collect();
        for unroll in [2, 4, 8, 16] {
            for blocks_per_sm in [2, 4] {
                g.bench_function(format!("read, {unroll} loads in flight, {blocks_per_sm} blocks/SM"), |b| {
                    let mut k = 0;
                    b.iter_custom(|iters| {
                        back_to_back(be, iters, || {
                            be.read_floor(&bufs[k % ring], unroll, blocks_per_sm, &mut sink);
                            k += 1;
                        })
                    })
                });
            }
        }
        drop(bufs);
        let ws: Vec<_> = (0..ring).map(|_| weights(rows, cols).0).collect();
        let x = be.upload(&rnd(cols, 4, 1.0));
        let mut y = be.zeros(rows);
        g.bench_function("nf4 gemv", |b| {
            let mut k = 0;
            b.iter_custom(|iters| {
                back_to_back(be, iters, || {
                    be.linear(&x, &ws[k % ring], 1, &mut y);
                    k += 1;
                })
            })
        });
        g.finish();
    }
}

/// Wall time of `iters` calls of `launch` queued back to back with one synchronization after them (and
/// one before, so earlier work is not counted): device time as a CUDA-graph replay measures it, without
/// a synchronization per call (criterion's `iter_custom`).
fn back_to_back(be: &Cuda, iters: u64, mut launch: impl FnMut()) -> std::time::Duration {
    be.synchronize();
    let start = std::time::Instant::now();
    for _ in 0..iters {
        launch();
    }
    be.synchronize();
    start.elapsed()
}

/// The norm's backward at the step's shape (2048 rows of 4096 values), accumulating into the residual
/// stream's gradient as the step does: x and dy read, dx read and written, 16 bytes per value to set
/// against the copy rate.
fn norm_backward(c: &mut Criterion) {
    let be = gpu();
    let dim = 4096;
    let n = M * dim;
    let (x, dy, w) = (be.upload(&rnd(n, 11, 2.0)), be.upload(&rnd(n, 12, 1.0)), be.upload(&rnd(dim, 13, 1.0)));
    let (mut y, mut rstd, mut dx) = (be.zeros(n), be.zeros(M), be.zeros(n));
    be.rmsnorm(&x, &w, dim, 1e-5, &mut y, &mut rstd);
    let mut g = c.benchmark_group("RMSNorm backward 2048x4096");
    g.throughput(Throughput::Bytes((16 * n) as u64));
    g.bench_function("accumulating, back to back", |b| {
        b.iter_custom(|iters| back_to_back(be, iters, || be.rmsnorm_backward(&x, &w, &rstd, &dy, dim, &mut dx, true)))
    });
    g.finish();
}

fn attention(c: &mut Criterion) {
    let be = gpu();
    let sh = AttnShape::square(4, 512, 32, 32, 128);
    let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
    let (q, k, v, dout) = (
        be.upload(&rnd(nq, 7, 1.0)),
        be.upload(&rnd(nq, 8, 1.0)),
        be.upload(&rnd(nq, 9, 1.0)),
        be.upload(&rnd(nq, 10, 1.0)),
    );
    let (mut out, mut lse) = (be.zeros(nq), be.zeros(sh.batch * sh.heads * sh.q_len));
    let (mut dq, mut dk, mut dv) = (be.zeros(nq), be.zeros(nq), be.zeros(nq));
    let mut g = c.benchmark_group("attention causal 4x512, 32 heads, d128");
    // Causal FLOPs: 4·T²/2·d per head forward, 2.5× that backward.
    let fwd = 4 * sh.batch * sh.heads * sh.q_len * sh.q_len / 2 * sh.head_dim;
    g.throughput(Throughput::Elements(fwd as u64));
    g.bench_function("forward", |b| {
        b.iter(|| {
            be.attention(&q, &k, &v, sh, None, &mut out, &mut lse);
            be.synchronize();
        })
    });
    g.throughput(Throughput::Elements((fwd as f64 * 2.5) as u64));
    g.bench_function("backward", |b| {
        b.iter(|| {
            be.attention_backward(&q, &k, &v, &out, &lse, &dout, sh, None, &mut dq, &mut dk, &mut dv);
            be.synchronize();
        })
    });
    // The training step's form: q and k before RoPE, rotated inside (random angles).
    let half = sh.head_dim / 2;
    let angles = rnd(sh.batch * sh.q_len * half, 11, std::f32::consts::PI);
    let cos = be.upload(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>());
    let sin = be.upload(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>());
    let rope = RopeTables { cos: &cos, sin: &sin };
    g.throughput(Throughput::Elements(fwd as u64));
    g.bench_function("forward, RoPE inside", |b| {
        b.iter(|| {
            be.rope_attention(&q, &k, &v, rope, sh, None, &mut out, &mut lse);
            be.synchronize();
        })
    });
    g.throughput(Throughput::Elements((fwd as f64 * 2.5) as u64));
    g.bench_function("backward, RoPE inside", |b| {
        b.iter(|| {
            be.rope_attention_backward(&q, &k, &v, rope, &out, &lse, &dout, sh, None, &mut dq, &mut dk, &mut dv);
            be.synchronize();
        })
    });
    // From saved inputs (the tape's form: converted once, rotated, in bf16), and that conversion.
    let acts = be.attn_acts(q.clone(), k.clone(), v.clone(), rope, sh);
    g.throughput(Throughput::Elements(fwd as u64));
    g.bench_function("forward, saved bf16 inputs", |b| {
        b.iter(|| {
            be.rope_attention_acts(&acts, rope, sh, None, &mut out, &mut lse);
            be.synchronize();
        })
    });
    // The same launches back to back, synchronized once per iteration's batch: device time, as the
    // rival's CUDA-graph replay measures it, without each launch's synchronization. Then flash.cu's
    // mma.sync forward on the same inputs (the wgmma kernel's predecessor), both ways.
    for wgmma in [true, false] {
        be.set_flash_wgmma(wgmma, true);
        let kernel = if be.uses_flash_wgmma().0 { "wgmma" } else { "mma.sync" };
        g.bench_function(format!("forward, saved bf16 inputs, {kernel}, back to back"), |b| {
            b.iter_custom(|iters| {
                back_to_back(be, iters, || be.rope_attention_acts(&acts, rope, sh, None, &mut out, &mut lse))
            })
        });
    }
    g.throughput(Throughput::Elements((fwd as f64 * 2.5) as u64));
    for wgmma in [true, false] {
        be.set_flash_wgmma(true, wgmma);
        let kernel = if be.uses_flash_wgmma().1 { "wgmma" } else { "mma.sync" };
        g.bench_function(format!("backward, saved bf16 inputs, {kernel}, back to back"), |b| {
            b.iter_custom(|iters| {
                back_to_back(be, iters, || {
                    be.rope_attention_acts_backward(&acts, rope, &out, &lse, &dout, sh, None, &mut dq, &mut dk, &mut dv)
                })
            })
        });
    }
    be.set_flash_wgmma(true, true);
    g.bench_function("backward, saved bf16 inputs", |b| {
        b.iter(|| {
            be.rope_attention_acts_backward(&acts, rope, &out, &lse, &dout, sh, None, &mut dq, &mut dk, &mut dv);
            be.synchronize();
        })
    });
    g.throughput(Throughput::Elements(3 * nq as u64));
    g.bench_function("saving q, k, v (rotated, bf16)", |b| {
        // Fresh f32 inputs each time (the call takes them over), copied before the clock starts.
        let inputs = || {
            let qkv = (q.clone(), k.clone(), v.clone());
            be.synchronize();
            qkv
        };
        b.iter_batched(
            inputs,
            |(q, k, v)| {
                drop(be.attn_acts(q, k, v, rope, sh));
                be.synchronize();
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The LoRA branch of one 4096→4096 projection of the classic recipe (r = 64, scale 0.25) over 2048
/// token rows, with and without dropout, on the fused kernels (kernels/lora_fused.cu) and on the
/// cuBLAS TF32 path they replace. Floor: x read once, y read and written (f32): 100 MB. Each
/// iteration takes the next of three sets of x, y, dy, dx (400 MB in all), so that, as in a training
/// step, they come from memory rather than from the 50 MB L2 the previous iteration filled.
fn lora(c: &mut Criterion) {
    use llamatune::backend::Dropout;
    let be = gpu();
    let (rows, cols, r) = (4096, 4096, 64);
    let sets: Vec<_> = (0..3u64)
        .map(|i| (be.upload(&rnd(M * cols, 14 + 4 * i, 1.0)), be.upload(&rnd(M * rows, 17 + 4 * i, 1.0))))
        .collect();
    let (a, b) = (be.upload(&rnd(r * cols, 15, 0.02)), be.upload(&rnd(rows * r, 16, 0.02)));
    let mut ys: Vec<_> = (0..3).map(|_| be.zeros(M * rows)).collect();
    let mut dxs: Vec<_> = (0..3).map(|_| be.zeros(M * cols)).collect();
    let mut u = be.zeros(M * r);
    let (mut da, mut db) = (be.zeros(r * cols), be.zeros(rows * r));
    let mut g = c.benchmark_group("LoRA r=64 4096->4096, M=2048");
    g.throughput(Throughput::Bytes((3 * M * rows * 4) as u64));
    for (path, fused) in [("fused", true), ("cuBLAS", false)] {
        be.set_fused_lora(fused);
        for (label, d) in [("dropout 0.1", Dropout { p: 0.1, seed: 3 }), ("no dropout", Dropout::NONE)] {
            let mut i = 0;
            g.bench_function(format!("{path} forward, {label}"), |bch| {
                bch.iter(|| {
                    i = (i + 1) % 3;
                    be.lora_forward(&sets[i].0, &a, &b, M, r, 0.25, d, &mut u, &mut ys[i]);
                    be.synchronize();
                })
            });
            g.bench_function(format!("{path} backward, {label}"), |bch| {
                bch.iter(|| {
                    i = (i + 1) % 3;
                    let (x, dy) = &sets[i];
                    be.lora_backward(x, &a, &b, &u, dy, M, r, 0.25, d, &mut da, &mut db, &mut dxs[i]);
                    be.synchronize();
                })
            });
        }
    }
    be.set_fused_lora(true);
    g.finish();
}

fn optimizer_and_loss(c: &mut Criterion) {
    let be = gpu();
    let n = 160 << 20;
    let mut p = be.upload(&rnd(n, 11, 0.1));
    let grad = be.upload(&rnd(n, 12, 0.1));
    let (mut m, mut v) = (be.zeros(n), be.zeros(n));
    let hp = AdamWStep { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    let mut g = c.benchmark_group("AdamW 32-bit, 160M parameters");
    g.throughput(Throughput::Bytes((7 * 4 * n) as u64));
    g.bench_function("adamw", |b| {
        b.iter(|| {
            be.adamw(&mut p, &grad, &mut m, &mut v, &hp);
            be.synchronize();
        })
    });
    g.finish();
    let (rows, vocab) = (2048, 32000);
    let logits = be.upload(&rnd(rows * vocab, 13, 4.0));
    let targets: Vec<i32> = (0..rows as i32).map(|i| (i * 7919) % vocab as i32).collect();
    let mut dlogits = be.zeros(rows * vocab);
    let mut g = c.benchmark_group("cross-entropy fwd+bwd 2048x32000");
    g.throughput(Throughput::Bytes((8 * rows * vocab) as u64));
    g.bench_function("cross_entropy", |b| {
        b.iter(|| {
            be.cross_entropy(&logits, &targets, vocab, 1.0 / rows as f32, &mut dlogits);
            be.synchronize();
        })
    });
    g.finish();
    // The same kernel on bf16 logits with the gradient in bf16, as a bf16 LM head writes and its
    // input-gradient GEMM reads them (Backend::lm_head_cross_entropy): 4 bytes per logit.
    let logits16 = be.upload_bf16(&rnd(rows * vocab, 13, 4.0));
    let mut dlogits16 = be.zeros_bf16(rows * vocab);
    let mut g = c.benchmark_group("cross-entropy fwd+bwd 2048x32000, bf16 logits and gradient");
    g.throughput(Throughput::Bytes((4 * rows * vocab) as u64));
    g.bench_function("cross_entropy_bf16", |b| {
        b.iter(|| {
            be.cross_entropy_bf16(&logits16, &targets, vocab, 1.0 / rows as f32, &mut dlogits16);
            be.synchronize();
        })
    });
    g.finish();
    drop((dlogits, dlogits16, logits, logits16));
    // One 512-row chunk of the LM head's loss (Graph::lm_head_loss) for Llama-2-7B (the streaming
    // loss kernel) and for Llama-3-8B's vocabulary (the two-pass one): logits GEMM, loss,
    // input-gradient GEMM; composed from the three ops (f32 logits and dlogits, converted by the GEMM)
    // against the one op (bf16 logits from the GEMM, bf16 dlogits from the loss kernel).
    let (rows, hidden) = (512, 4096);
    for vocab in [32000, 128256] {
        let head =
            be.upload_weight(HostWeight::Dense { rows: vocab, cols: hidden, data: rnd(vocab * hidden, 18, 0.02) });
        let x = be.upload(&rnd(rows * hidden, 19, 1.0));
        let targets: Vec<i32> = (0..rows as i32).map(|i| (i * 7919) % vocab as i32).collect();
        let mut dx = be.zeros(rows * hidden);
        let mut g = c.benchmark_group(format!("LM head + loss, 512x4096 -> {vocab} (bf16 head)"));
        g.bench_function("composed (f32 dlogits)", |b| {
            b.iter(|| {
                llamatune::backend::lm_head_cross_entropy_composed(be, &x, &head, &targets, 1.0, Some(&mut dx));
                be.synchronize();
            })
        });
        g.bench_function("one op (bf16 logits and dlogits)", |b| {
            b.iter(|| {
                be.lm_head_cross_entropy(&x, &head, &targets, 1.0, Some(&mut dx));
                be.synchronize();
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = linear, dequantize, linear_by_m, gemv, read_floor_vs_gemv, bandwidth, norm_backward, attention, lora, optimizer_and_loss
}
criterion_main!(benches);
