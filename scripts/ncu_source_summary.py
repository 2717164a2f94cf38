#!/usr/bin/env python3
"""Where a kernel's warps wait, by SASS instruction: a summary of ncu's source view.

Input: the CSV that `ncu --import REPORT --page source --csv --print-source sass` prints for a report
taken with `--section SourceCounters`. Prints the share of warp-state samples per stall reason, then per
run of BUCKET consecutive instructions (its top three reasons and most frequent opcodes, runs under 1%
left out), then every instruction holding at least THRESHOLD percent of the samples.

Usage: ncu_source_summary.py SASS.csv [BUCKET=64] [THRESHOLD=1.0]
"""
import csv
import sys


def main():
    path = sys.argv[1]
    bucket = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    rows = list(csv.reader(open(path)))
    header, data = rows[1], rows[2:]  # rows[0] names the kernel
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    col = {h: header.index(h) for h in reasons}
    samples_col = header.index("Warp Stall Sampling (All Samples)")
    executed_col = header.index("Instructions Executed")

    def num(r, c):
        return float(r[c] or 0)

    total = sum(num(r, samples_col) for r in data)
    print("instructions", len(data), "samples", total)
    by_reason = {h: sum(num(r, col[h]) for r in data) for h in reasons}
    print({k[6:]: round(v / total * 100, 1) for k, v in sorted(by_reason.items(), key=lambda x: -x[1]) if v / total > 0.003})
    for i in range(0, len(data), bucket):
        chunk = data[i : i + bucket]
        share = sum(num(r, samples_col) for r in chunk) / total
        if share < 0.01:
            continue
        top = sorted(((h, sum(num(r, col[h]) for r in chunk)) for h in reasons), key=lambda x: -x[1])[:3]
        ops = {}
        for r in chunk:
            words = r[1].split()
            op = (words[1] if r[1].startswith("@") else words[0]).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
        print(i, f"{share * 100:5.1f}%", chunk[0][executed_col], [(h[6:], round(v / total * 100, 1)) for h, v in top],
              sorted(ops.items(), key=lambda x: -x[1])[:5])
    for i, r in enumerate(data):
        share = num(r, samples_col) / total * 100
        if share >= threshold:
            top = sorted(((h[6:], num(r, col[h]) / total * 100) for h in reasons), key=lambda x: -x[1])[:2]
            print(i, f"{share:4.1f}", r[executed_col], r[1][:60], [(h, round(v, 1)) for h, v in top])


if __name__ == "__main__":
    main()
