"""The board's energy counter from Python: NVML's total energy since the driver loaded (ctypes over
libnvidia-ml.so.1, which comes with the driver), and its SM clock. `llamatune bench` reads the same
counter around its timed steps (src/backend/cuda/energy.rs); parity/side_by_side.py reads it around the
Python stack's, so both stacks' joules per step are counted alike. Why: a step that draws the card to its
power limit runs in its joules over that limit (docs/PERF.md, session 31). On the H200 the counter moves
about every 100 ms, so a span of several steps is good to about one update (~70 J at 700 W).
"""
import ctypes


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
