"""Kernel-variant harness for the fused 4-bit matmul (kernels/nf4_gemm.cu), run on the GPU host: loads
cubins of variants that keep gemm_4bit's signature through the driver API, checks each against torch
(NF4, blocksize 64, plain absmax, W 4096 x 4096, bf16) and times it against torch's bf16 matmul
(cuBLAS) in the same process: median of 7 means of 20 launches back to back, kernel time only.
Used for the session-6 ablations in docs/PERF.md; build a variant with e.g.
  $NVCC -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -cubin -DSOME_FLAG -o v.cubin kernels/nf4_gemm.cu
usage: MS=512,2048 python3 parity/fused_4bit_harness.py CUBIN:KERNEL:DGRAD:SMEM:TOKENS:WROWS[:THREADS[:BLOCKS_PER_SM]] ...
  DGRAD 0/1 (forward / input grad), SMEM the dynamic shared memory in bytes, TOKENS x WROWS the tile,
  BLOCKS_PER_SM for the split-K choice (the host's splits_to_fill, 132 SMs)."""
import ctypes
import os
import statistics
import sys

import torch

cuda = ctypes.CDLL("libcuda.so.1")
torch.zeros(1, device="cuda")  # primary context current
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
dev = "cuda"


def ck(r, what):
    if r != 0:
        raise SystemExit(f"{what}: CUresult {r}")


def load(cubin, name, smem):
    mod = ctypes.c_void_p()
    ck(cuda.cuModuleLoadData(ctypes.byref(mod), open(cubin, "rb").read()), "load " + cubin)
    fn = ctypes.c_void_p()
    ck(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), "get " + name)
    ck(cuda.cuFuncSetAttribute(fn, 8, smem), "smem attr")
    return fn


def launcher(fn, grid, threads, smem, args):
    """Arguments marshalled once; the returned closure only calls cuLaunchKernel."""
    vals = []
    for a in args:
        if isinstance(a, torch.Tensor):
            vals.append(ctypes.c_void_p(a.data_ptr()))
        elif a is None:
            vals.append(ctypes.c_void_p(0))
        elif isinstance(a, float):
            vals.append(ctypes.c_float(a))
        else:
            vals.append(ctypes.c_int(a))
    ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    g0, g1, g2 = grid
    f = cuda.cuLaunchKernel

    def go():
        f(fn, g0, g1, g2, threads, 1, 1, smem, stream, ptrs, None)
    go.keep = (vals, ptrs)
    return go


def timed(f, reps=7, batch=20):
    """Median over reps of the mean time of `batch` back-to-back calls (the queue stays full)."""
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(batch):
            f()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1000 / batch)
    return statistics.median(ts)


def problem(m, rows, cols, seed=1):
    g = torch.Generator(device=dev).manual_seed(seed)
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, device=dev, generator=g)
    absmax = torch.rand(rows * cols // 64, device=dev, generator=g) + 0.5
    code = torch.tensor(NF4, device=dev)
    hi, lo = (packed >> 4).long(), (packed & 15).long()
    w = torch.stack([code[hi], code[lo]], 1).reshape(rows, cols)
    w = (w * absmax.repeat_interleave(64).reshape(rows, cols)).to(torch.bfloat16)
    return packed, absmax, code, w


def main():
    ms = [int(x) for x in os.environ.get("MS", "2048").split(",")]
    for m in ms:
        run(m)


def run(m):
    rows, cols = 4096, 4096
    packed, absmax, code, w = problem(m, rows, cols)
    code256 = torch.zeros(256, device=dev)  # the dynamic map: unused with plain absmax
    for dgrad in (False, True):
        red, n_out = (rows, cols) if dgrad else (cols, rows)
        a = torch.randn(m, red, device=dev).to(torch.bfloat16)
        ref = (a @ w if dgrad else a @ w.t()).float()
        t = timed(lambda: (a @ w if dgrad else a @ w.t()))
        print(f"cuBLAS bf16 {'dgrad' if dgrad else 'fwd'} M={m}: {t:.1f} us", flush=True)
        for spec in sys.argv[1:]:
            p = spec.split(":")
            cubin, name, dg, smem, tokens, wrows = p[0], p[1], p[2] == "1", int(p[3]), int(p[4]), int(p[5])
            threads = int(p[6]) if len(p) > 6 else 256
            bps = int(p[7]) if len(p) > 7 else 2
            if dg != dgrad:
                continue
            fn = load(cubin, name, smem)
            out = torch.full((m, n_out), float("nan"), device=dev)
            grid_xy = ((n_out + wrows - 1) // wrows, (m + tokens - 1) // tokens)
            splits = max(1, min(132 * bps // (grid_xy[0] * grid_xy[1]), red // 64 // 4))
            grid = (*grid_xy, splits)
            part = torch.empty((splits, m, n_out), device=dev) if splits > 1 else None
            args = [packed, absmax, None, None, code256, 0.0, code, 64, a, out, part, m, rows, cols, 0]
            k = launcher(fn, grid, threads, smem, args)

            def go():
                k()
                if part is not None:  # split-K: the partial sums added (the host rounds them too)
                    torch.sum(part, 0, out=out)
            go()
            torch.cuda.synchronize()
            got = out.to(torch.bfloat16).float() if part is not None else out
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            us = timed(go)
            print(f"M={m} splits={splits} {spec.split('/')[-1]}: {us:.1f} us  rel.err {err:.2e}  (cuBLAS {t:.1f}: {t/us:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
