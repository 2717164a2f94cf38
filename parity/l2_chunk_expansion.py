"""Does expanding a 4-bit weight in L2-sized pieces, each consumed by its GEMM right away, hide the
expansion's DRAM writes? A torch stand-in for the engine's second path (docs/PERF.md, session 43).

Why: at M = 2048 our 4-bit product is an expansion into bf16 (12.9 µs at 4096², writing 33.5 MB) and
then cuBLAS (112.5 µs). The expansion runs at DRAM speed because its output goes out to DRAM. If the
weight is expanded a few thousand rows at a time into one small scratch buffer that the GEMM of those
rows reads at once, the scratch's lines can stay in L2 (rewritten in place by the next piece before
they are ever written back), so the expansion is bound by L2, not DRAM.

The stand-in for the expansion is an int8 -> bf16 conversion (1 byte read per weight, where NF4 reads
half a byte plus absmax; 2 bytes written either way). Times are CUDA-graph replays of 10 calls.

    python3 parity/l2_chunk_expansion.py OUT.json
"""
import json
import statistics
import sys

import torch
from torch_rivals import capture_graph

M = 2048
SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008)}


def graph_us(fn, reps=10, rounds=25):
    """µs per call of fn: the median over `rounds` replays, timed by CUDA events, of a graph of `reps` calls."""
    graph = capture_graph(fn, reps)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def main():
    out_path = sys.argv[1]
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "m": M, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda")
        w16 = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(M, k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(M, n, dtype=torch.bfloat16, device="cuda")
        w16.copy_(codes)
        row = {}
        row["gemm"] = graph_us(lambda: torch.mm(x, w16.t(), out=y))
        row["expand"] = graph_us(lambda: w16.copy_(codes))
        row["expand+gemm"] = graph_us(lambda: (w16.copy_(codes), torch.mm(x, w16.t(), out=y)))
        for pieces in (2, 3, 4, 8):
            rows = -(-n // pieces)
            bounds = [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]
            outs = [torch.empty(M, r1 - r0, dtype=torch.bfloat16, device="cuda") for r0, r1 in bounds]
            scratch = torch.empty(rows, k, dtype=torch.bfloat16, device="cuda")

            def gemms_only():
                for (r0, r1), o in zip(bounds, outs):
                    torch.mm(x, w16[r0:r1].t(), out=o)

            def reused():  # one scratch piece, rewritten by each piece's expansion
                for (r0, r1), o in zip(bounds, outs):
                    s = scratch[: r1 - r0]
                    s.copy_(codes[r0:r1])
                    torch.mm(x, s.t(), out=o)

            def in_place():  # each piece expanded into its own rows of the full buffer
                for (r0, r1), o in zip(bounds, outs):
                    w16[r0:r1].copy_(codes[r0:r1])
                    torch.mm(x, w16[r0:r1].t(), out=o)

            row[f"{pieces} pieces: gemms only"] = graph_us(gemms_only)
            row[f"{pieces} pieces: reused scratch"] = graph_us(reused)
            row[f"{pieces} pieces: full buffer"] = graph_us(in_place)
        results["shapes"][name] = row
        print(name, json.dumps({key: round(v, 1) for key, v in row.items()}, indent=1), flush=True)
        del codes, w16, x, y
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
