"""Energy per training step: runs a `llamatune bench` command and reads the card's energy counter (NVML's
total energy since the driver loaded, in mJ) each time the bench prints a step's line, so each timed
step gets its joules and its mean power; the SM clock is read at the same moments. Why: a step that
draws the card to its power limit is throttled, so its time follows its energy (docs/PERF.md, sessions
30 and 31); this says how many joules each variant of a step costs and at what power it ran.

    python3 scripts/step_energy.py OUT.json -- stage/llamatune bench --device cuda ... [--warmup-steps N]

Prints one line per step and a summary over the timed steps (those after the bench's warm-up steps);
writes both to OUT.json. NVML through ctypes (libnvidia-ml.so.1), device 0. On the H200 here the counter
moved about every 100 ms (session 31: a 150 ms step read ~72 or ~145 J), so one step's joules mean
little; the summary's joules per step and watts come from the counter's whole span over the timed steps,
which one update (~72 J) bounds: ±5% over 12 steps of ~110 J, less over more steps.
"""
import ctypes
import json
import re
import statistics
import subprocess
import sys
import time

STEP = re.compile(r"^step (\d+): ([0-9.]+) s")


class Nvml:
    """The three NVML queries this needs, on device 0."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.dev = ctypes.c_void_p()
        self.check(self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.dev)), "nvmlDeviceGetHandleByIndex_v2")

    @staticmethod
    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with NVML error {rc}")

    def energy_mj(self):
        v = ctypes.c_ulonglong()
        self.check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.dev, ctypes.byref(v)), "energy")
        return v.value

    def sm_mhz(self):
        v = ctypes.c_uint()
        self.check(self.lib.nvmlDeviceGetClockInfo(self.dev, 1, ctypes.byref(v)), "SM clock")  # 1: NVML_CLOCK_SM
        return v.value


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    out, cmd = sys.argv[1], sys.argv[3:]
    warmup = int(cmd[cmd.index("--warmup-steps") + 1]) if "--warmup-steps" in cmd else 0
    nvml = Nvml()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    steps, last = [], None
    for line in proc.stdout:
        now, mj, mhz = time.monotonic(), nvml.energy_mj(), nvml.sm_mhz()
        m = STEP.match(line.strip())
        if not m:
            print(line, end="", flush=True)
            continue
        # A step's bracket: from the previous step's line to its own (the bench prints each line once
        # the step's loss is back on the host, so the device is done with it). Step 0 has none.
        k, secs = int(m.group(1)), float(m.group(2))
        if last is not None:
            joules, wall = (mj - last[1]) / 1e3, now - last[0]
            steps.append(dict(step=k, step_s=secs, wall_s=wall, joules=joules, watts=joules / wall, sm_mhz=mhz))
            print(f"step {k}: {secs * 1e3:.1f} ms, {joules:.1f} J, {joules / wall:.0f} W, SM {mhz} MHz", flush=True)
        last = (now, mj)
    rc = proc.wait()
    # The bench numbers its steps from 0, the warm-up steps first.
    timed = [s for s in steps if s["step"] >= warmup]
    summary = None
    if timed:
        summary = {key: statistics.median(s[key] for s in timed) for key in ("step_s", "sm_mhz")}
        # Over all timed steps together (one counter span, see above): joules per step, watts.
        total_j, total_s = sum(s["joules"] for s in timed), sum(s["wall_s"] for s in timed)
        summary.update(mean_joules=total_j / len(timed), mean_watts=total_j / total_s)
        print(f"{len(timed)} timed steps: median {summary['step_s'] * 1e3:.1f} ms, SM {summary['sm_mhz']:.0f} MHz; "
              f"{summary['mean_joules']:.1f} J per step at {summary['mean_watts']:.0f} W")
    json.dump(dict(cmd=cmd, steps=steps, summary=summary), open(out, "w"), indent=1)
    sys.exit(rc)


if __name__ == "__main__":
    main()
