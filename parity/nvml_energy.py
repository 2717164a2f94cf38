"""The board's energy counter from Python: NVML's total energy since the driver loaded (ctypes over
libnvidia-ml.so.1, which comes with the driver), and its SM clock. `llamatune bench` reads the same
counter around its timed steps (src/backend/cuda/energy.rs); parity/side_by_side.py reads it around the
Python stack's, so both stacks' joules per step are counted alike. Why: a step that draws the card to its
power limit runs in its joules over that limit (docs/PERF.md, session 31). On the H200 the counter moves
about every 100 ms, so a span of several steps is good to about one update (~70 J at 700 W); `measure`
(parity/energy_model.py, parity/gemm_algo_energy.py) aligns its span to the updates instead.
"""
import ctypes
import statistics
import time
from collections import deque


class Nvml:
    """Device `index` in NVML's numbering (PCI order; the GPU hosts here show one device)."""

    def __init__(self, index=0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.dev = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.dev)), "device handle")

    @staticmethod
    def _check(rc, what):
        if rc != 0:
            raise RuntimeError(f"NVML {what} failed with error {rc}")

    def joules(self):
        v = ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.dev, ctypes.byref(v)), "energy")
        return v.value / 1e3

    def sm_mhz(self):
        v = ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetClockInfo(self.dev, 1, ctypes.byref(v)), "SM clock")  # NVML_CLOCK_SM
        return v.value


def open_or_none(index=0):
    """An Nvml, or None where the library or the counter is missing (the callers then count nothing)."""
    try:
        nvml = Nvml(index)
        nvml.joules()
        return nvml
    except (OSError, RuntimeError, AttributeError):
        return None


def measure(nvml, torch, run_once, seconds):
    """Runs run_once() back to back (the queue kept two batches deep, never drained) for about
    `seconds`, the span aligned to the energy counter's updates at both ends (it moves about every
    100 ms: a span of a few seconds between two reads at arbitrary times is off by up to 4%):
    (calls, seconds, joules, median SM MHz) over whole counter intervals."""
    pending = deque()

    def batch():
        for _ in range(10):
            run_once()
        e = torch.cuda.Event()
        e.record()
        pending.append(e)
        if len(pending) > 2:
            pending.popleft().synchronize()

    warm_until = time.monotonic() + 0.5  # the board at its steady power before the span starts
    while time.monotonic() < warm_until:
        batch()
    j = nvml.joules()
    while (j0 := nvml.joules()) == j:
        batch()
    t0, calls, clocks = time.monotonic(), 0, []
    while time.monotonic() - t0 < seconds:
        batch()
        calls += 10
        clocks.append(nvml.sm_mhz())
    j = nvml.joules()
    while (j1 := nvml.joules()) == j:
        batch()
        calls += 10
    t1 = time.monotonic()
    torch.cuda.synchronize()
    return calls, t1 - t0, j1 - j0, statistics.median(clocks) if clocks else 0
