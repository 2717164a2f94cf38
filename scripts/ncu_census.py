#!/usr/bin/env python3
"""Every kernel of a run, summed by name, from ncu's raw CSV (`scripts/gpu-session.sh census`).

Usage: ncu_census.py CSV[.gz] [ROWS] [--from KERNEL]

--from KERNEL counts only the launches after KERNEL's first, up to and including its last, and prints
each kernel's time per period between two of its launches too: for a decode, `--from argmax_f32`
leaves out the prompt's prefill and whatever follows the last whole token, and gives the time per
generated token (each token ends with one argmax).

The CSV is what `ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,
dram__bytes_write.sum,lts__t_bytes.sum` wrote (its own warnings first). Prints the kernels' total
time, then per kernel name (cuBLAS's kernels under one "cuBLAS" prefix, their tile names kept):
launches, total and per-launch time, DRAM bytes moved per launch and the rate they were moved at, and
L2 bytes per launch. ncu runs each kernel alone (serialized, the GPU idle between them), so the total
is the device's kernel time without launch gaps, host waits or the clock drop of a busy card.
"""
import collections
import csv
import gzip
import re
import sys

METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum")
SCALE = {"ns": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3, "nsecond": 1e-9,
         "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}


def rows_of(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = [line for line in f if not line.startswith("==")]
    rows = list(csv.reader(lines))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    missing = [m for m in METRICS if m not in col]
    if missing or "Kernel Name" not in col:
        sys.exit(f"{path}: no column {missing or 'Kernel Name'} (run ncu with --csv --page raw and the census metrics)")
    scale = {m: SCALE.get(units[col[m]], 1.0) for m in METRICS}
    for r in data:
        values = []
        for m in METRICS:
            text = r[col[m]].replace(",", "")
            values.append(float(text) * scale[m] if text else 0.0)
        yield r[col["Kernel Name"]], values


def kernel_label(name):
    name = re.sub(r"\(.*", "", name).strip()
    if name.startswith("nvjet") or "gemm" in name.lower() or "cublas" in name.lower():
        return "cuBLAS " + name[:44]
    return name


def main():
    args = sys.argv[1:]
    start = None
    if "--from" in args:
        i = args.index("--from")
        if i + 1 >= len(args):
            sys.exit(__doc__)
        start = args[i + 1]
        del args[i : i + 2]
    if not args:
        sys.exit(__doc__)
    top = int(args[1]) if len(args) > 1 else 40
    totals = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # launches, seconds, DRAM bytes, L2 bytes
    launches, seconds = 0, 0.0
    rows = [(kernel_label(name), values) for name, values in rows_of(args[0])]
    if start is not None:
        marks = [i for i, (label, _) in enumerate(rows) if label == start]
        if len(marks) < 2:
            sys.exit(f"{args[0]}: fewer than two launches of {start}")
        rows = rows[marks[0] + 1 : marks[-1] + 1]
    periods = len(marks) - 1 if start is not None else 0
    for label, (t, dram_read, dram_write, l2) in rows:
        k = totals[label]
        k[0] += 1
        k[1] += t
        k[2] += dram_read + dram_write
        k[3] += l2
        launches += 1
        seconds += t
    per = max(periods, 1)
    print(f"{launches} kernels, {seconds * 1e3:.1f} ms of kernel time", end="")
    print(f"; {periods} {start} periods: {seconds * 1e3 / per:.3f} ms each" if start else "")
    head = f"{'kernel':52s} {'launches':>8s} {'total ms':>9s} {'µs each':>8s} {'DRAM MB':>8s} {'TB/s':>6s} {'L2 MB':>8s}"
    print(head + (f" {'µs/period':>9s}" if start else ""))
    for label, (n, t, dram, l2) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        rate = dram / t / 1e12 if t else 0.0
        line = f"{label[:52]:52s} {n:8d} {t * 1e3:9.2f} {t / n * 1e6:8.1f} {dram / n / 1e6:8.1f} {rate:6.2f} {l2 / n / 1e6:8.1f}"
        print(line + (f" {t / per * 1e6:9.1f}" if start else ""))


if __name__ == "__main__":
    main()
