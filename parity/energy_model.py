"""What the card spends in joules per unit of work, so a step's joules can be split into its parts: the
board's energy counter (parity/nvml_energy.py) around a few seconds each of idling, bf16 GEMMs (the
8192³ shape and the 7B step's 2048 × 4096 × 4096) and a streaming copy, each with its mean power and
median SM clock (nvidia-smi is not needed: NVML's clock is read between launches). Why: our 7B step runs
at the board's 700 W limit, so its time is its joules over 700 W (docs/PERF.md, session 31), and which
work to cut depends on what each kind costs.

    python3 parity/energy_model.py OUT.json [--seconds 3]

Prints a line per workload: seconds, joules, mean watts, and the joules per TFLOP or per GB moved with
and without the idle board's power (measured first) subtracted.
"""
import argparse
import json
import time

import nvml_energy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    import torch

    nvml = nvml_energy.Nvml()
    rows = []
    time.sleep(2)  # let the board settle after torch's start
    j0, t0 = nvml.joules(), time.monotonic()
    time.sleep(a.seconds)
    idle_s, idle_j = time.monotonic() - t0, nvml.joules() - j0
    idle_w = idle_j / idle_s
    rows.append(dict(what="idle", seconds=idle_s, joules=idle_j, watts=idle_w))
    print(f"idle: {idle_w:.0f} W over {idle_s:.1f} s", flush=True)

    def report(what, calls, secs, joules, mhz, unit, per_call):
        work = calls * per_call
        w = joules / secs
        row = dict(what=what, calls=calls, seconds=secs, joules=joules, watts=w, sm_mhz=mhz, unit=unit,
                   work=work, joules_per_unit=joules / work, marginal_joules_per_unit=(joules - idle_w * secs) / work,
                   rate=work / secs)
        rows.append(row)
        print(f"{what}: {w:.0f} W at a median {mhz:.0f} MHz, {work / secs:.0f} {unit}/s; "
              f"{row['joules_per_unit']:.3f} J per {unit}, {row['marginal_joules_per_unit']:.3f} above idle", flush=True)

    for m, n, k in [(8192, 8192, 8192), (2048, 4096, 4096), (2048, 11008, 4096)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        calls, secs, joules, mhz = nvml_energy.measure(nvml, torch, lambda: x @ w.t(), a.seconds)
        report(f"bf16 GEMM {m}x{n}x{k}", calls, secs, joules, mhz, "TFLOP", 2 * m * n * k / 1e12)
        del x, w
    src = torch.empty(2**28, device="cuda", dtype=torch.float32).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    calls, secs, joules, mhz = nvml_energy.measure(nvml, torch, lambda: dst.copy_(src), a.seconds)
    report("copy 1 GiB (read + write)", calls, secs, joules, mhz, "GB", 2 * src.numel() * 4 / 1e9)
    json.dump(dict(card=torch.cuda.get_device_name(0), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
