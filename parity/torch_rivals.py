"""The torch rivals of two kernel targets of issue 6, timed on this GPU in the run that times ours
(`benches/gpu_kernels.rs`): causal scaled_dot_product_attention forward+backward at 4 × 32 heads ×
512 × 128 in bf16 (and, as transformers' Llama runs it under bf16 autocast, with RoPE applied to f32 q
and k first, like-for-like with our RoPE-inside form), and fp32 cross-entropy forward+backward over 2048 × 32000 logits (its gradient in
f32, and cast to bf16 as a bf16 LM head reads it). Each figure is
the median of 20 timed runs after 5 warm-up runs, each run ending with a synchronization (as our
criterion iterations do), and each also replayed from a CUDA graph (`timed_graph`), which leaves out
the host's dispatch. Usage: python3 parity/torch_rivals.py [OUT.json]"""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, runs=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def capture_graph(fn, reps=1):
    """A CUDA graph of `reps` calls of fn, captured after three warm-up calls on a side stream (as
    torch's capture wants)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return g


def timed_graph(fn):
    """`timed` of fn captured in a CUDA graph (`capture_graph`): its replay runs the same kernels
    without Python or autograd dispatch, so the figure is the GPU's time plus one launch. Why: the
    plain timing of SDPA forward+backward moved 222-300 µs between fresh hosts on the same card
    (2026-11-29) while our kernels moved 0.2%; where the host dispatches slower than the GPU runs, the
    plain figure times the host. None if capture fails."""
    try:
        g = capture_graph(fn)
    except RuntimeError as e:
        print(f"graph capture failed: {e}", file=sys.stderr)
        return None
    return timed(g.replay)


def main():
    dev = "cuda"
    torch.manual_seed(0)
    b, h, t, d = 4, 32, 512, 128
    q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)

    def attn_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    # As for the cross-entropy below: autograd.grad, so no run adds its gradients into the .grad of
    # the runs before it (sessions before 2026-11-28h timed that extra pass too).
    def attn_fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), dout)

    # transformers' path in the step: q, k, v f32 projections (batch, heads, T, d), RoPE by
    # rotate_half on q and k in f32, SDPA casting to bf16 under autocast; gradients to the f32
    # un-rotated q, k and to v.
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ang = torch.rand(t, d // 2, device=dev) * 6.283
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1)

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    def rope_attn_fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            qr, kr = q32 * cos + rotate_half(q32) * sin, k32 * cos + rotate_half(k32) * sin
            o = F.scaled_dot_product_attention(qr, kr, v32, is_causal=True)
        torch.autograd.grad(o, (q32, k32, v32), dout)

    rows, vocab = 2048, 32000
    logits = (torch.randn(rows, vocab, device=dev) * 4).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), device=dev)

    # autograd.grad returns the gradient without adding it into logits.grad: `.backward()` would
    # accumulate into the .grad of earlier runs, an extra pass over 2048 × 32000 that is not the
    # cross-entropy's.
    def ce():
        torch.autograd.grad(F.cross_entropy(logits, targets), logits)

    # What transformers runs after a bf16 LM head (its loss casts the logits to f32): bf16 logits in,
    # through the cast, the gradient back in bf16 as the head's input-gradient GEMM reads it; the
    # like-for-like rival of our kernel on bf16 logits.
    logits16 = logits.detach().to(torch.bfloat16).requires_grad_(True)

    def ce_from_bf16_logits():
        torch.autograd.grad(F.cross_entropy(logits16.float(), targets), logits16)

    res = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "sdpa_fwd_s": timed(attn_fwd),
        "sdpa_fwd_bwd_s": timed(attn_fwd_bwd),
        "sdpa_fwd_graph_s": timed_graph(attn_fwd),
        "sdpa_fwd_bwd_graph_s": timed_graph(attn_fwd_bwd),
        "rope_f32_then_sdpa_autocast_fwd_bwd_s": timed(rope_attn_fwd_bwd),
        "cross_entropy_fp32_fwd_bwd_s": timed(ce),
        "cross_entropy_fp32_fwd_bwd_graph_s": timed_graph(ce),
        "cross_entropy_bf16_logits_fwd_bwd_s": timed(ce_from_bf16_logits),
        "cross_entropy_bf16_logits_fwd_bwd_graph_s": timed_graph(ce_from_bf16_logits),
    }
    print(json.dumps(res, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
