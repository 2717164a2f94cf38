"""What one launch that only streams a decoding GEMV's bytes reaches on this GPU: the floor the GEMV
bench's rows (`benches/gpu_kernels.rs`, "gemv M=1", 32 launches back to back) are measured against.
Three tuned torch kernels over the same byte counts as the 7B GEMVs' codes + f32 absmax (9.5 and 25.4
MB): a sum of uint8 bytes (a pure read), a sum of bf16 values, and a device-to-device copy (read +
write, counted as its read bytes and both). Each row: 32 launches back to back between
synchronizations, the median of 20 such runs after 5 warm-up runs; cold: the bytes rotated through
more buffers than the L2 holds. Why (docs/PERF.md, session 17): three GEMV designs with different
loops all streamed ~1.3 TB/s cold and ~1.7 TB/s L2-warm on the 25 MB shapes, so the limit may be one
launch of that size rather than any loop. Usage: python3 parity/stream_floor.py [OUT.json]"""
import json
import sys

import torch

from torch_rivals import timed  # median of 20 synchronized runs after 5 warm-up runs

REPS = 32


def main():
    dev = "cuda"
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, nbytes in [("4096x4096 codes + absmax", 4096 * 4096 // 2 + 4096 * 4096 // 64 * 4),
                         ("11008x4096 codes + absmax", 11008 * 4096 // 2 + 11008 * 4096 // 64 * 4)]:
        # Enough buffers that rotating through them leaves none in L2 (cold), and one reused (warm).
        copies = max(2, 3 * l2 // nbytes + 1)
        bufs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev) for _ in range(copies)]
        outs = [torch.empty_like(b) for b in bufs]
        for kind in ["warm", "cold"]:
            pick = (lambda i: 0) if kind == "warm" else (lambda i: i % copies)

            def sum_u8():
                for i in range(REPS):
                    bufs[pick(i)].sum(dtype=torch.int64)

            def sum_bf16():
                for i in range(REPS):
                    bufs[pick(i)].view(torch.bfloat16).sum(dtype=torch.float32)

            def copy():
                for i in range(REPS):
                    outs[pick(i)].copy_(bufs[pick(i)])

            for op, fn, moved in [("sum uint8", sum_u8, nbytes), ("sum bf16", sum_bf16, nbytes),
                                  ("copy (read + write)", copy, 2 * nbytes)]:
                s = timed(fn) / REPS
                rows.append({"bytes": nbytes, "shape": name, "op": op, "cache": kind, "us": s * 1e6,
                             "GB/s read": nbytes / s / 1e9, "GB/s moved": moved / s / 1e9})
                print(f"{name:28} {op:20} {kind}: {s * 1e6:7.2f} us per launch, "
                      f"{nbytes / s / 1e9:7.0f} GB/s read, {moved / s / 1e9:7.0f} GB/s moved", flush=True)
        del bufs, outs
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(0), "reps_per_sync": REPS, "rows": rows}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
