"""Joules per TFLOP of each cuBLASLt algorithm for the 7B step's bf16 GEMMs, at the board's power limit.

Why: our step runs at the H200's 700 W limit, so its GEMMs' time is their joules over that limit
(docs/PERF.md, sessions 31-32), and cuBLAS picks its kernel for speed on a card at full clock. If another
of the algorithms its heuristic offers spent fewer joules per FLOP (larger tiles, less L2 traffic), it
would be the faster one inside the step. This times each of the heuristic's top algorithms back to back
for a few seconds per shape, with NVML's energy counter (parity/nvml_energy.py) around the run.

    python3 parity/gemm_algo_energy.py OUT.json [--seconds 3] [--algos 8]

Row-major Y (M, N) = X (M, K) · W (N, K)ᵀ is the forward ("TN" in cuBLAS's column-major terms) and
dX (M, K) = dY (M, N) · W (N, K) the input gradient ("NN"), as src/backend/cuda/blas.rs passes them;
bf16 operands and output, f32 accumulation (CUBLAS_COMPUTE_32F). cuBLASLt through ctypes: the library
torch itself loaded, else libcublasLt from the system.
"""
import argparse
import ctypes
import json

import nvml_energy

CUBLAS_COMPUTE_32F = 68
CUDA_R_32F, CUDA_R_16BF = 0, 14
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
# cublasLtMatmulAlgoConfigAttributes_t, printed to tell the algorithms apart.
CONFIG = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6,
          "inner": 7, "cluster": 8}
WORKSPACE = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt():
    names = []
    try:
        with open("/proc/self/maps") as f:
            names = sorted({line.split()[-1] for line in f if "libcublasLt.so" in line})
    except OSError:
        pass
    for name in names + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
        try:
            return ctypes.CDLL(name), name
        except OSError:
            continue
    raise SystemExit("no libcublasLt found")


class Lt:
    def __init__(self):
        self.lib, self.path = load_cublaslt()
        self.handle = ctypes.c_void_p()
        self.check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "create")

    @staticmethod
    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"cublasLt {what}: status {rc}")

    def layout(self, rows, cols, ld):
        lay = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), CUDA_R_16BF, ctypes.c_uint64(rows),
                                                       ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
        return lay

    def problem(self, transa, transb, m, n, k):
        """Column-major C (m, n) = op(A) · op(B): its descriptors and the heuristic's algorithms."""
        desc = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc")
        for attr, t in ((DESC_TRANSA, transa), (DESC_TRANSB, transb)):
            v = ctypes.c_int32(t)
            self.check(self.lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), ctypes.c_size_t(4)), "trans")
        a = self.layout(k, m, k) if transa else self.layout(m, k, m)
        b = self.layout(n, k, n) if transb else self.layout(k, n, k)
        c = self.layout(m, n, m)
        pref = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(WORKSPACE)
        self.check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                                 ctypes.c_size_t(8)),
                   "workspace")
        return desc, a, b, c, pref

    def heuristics(self, desc, a, b, c, pref, count):
        results = (Heuristic * count)()
        got = ctypes.c_int()
        self.check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, c, c, pref, count, results,
                                                           ctypes.byref(got)), "heuristic")
        return [results[i] for i in range(got.value) if results[i].state == 0]

    def config(self, algo):
        out = {}
        get = self.lib.cublasLtMatmulAlgoConfigGetAttribute
        for name, attr in CONFIG.items():
            v, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            # Size 0 asks for the attribute's size first (some are 16-bit, some 32).
            if get(ctypes.byref(algo), attr, None, ctypes.c_size_t(0), ctypes.byref(size)) != 0 or not 0 < size.value <= 8:
                continue
            if get(ctypes.byref(algo), attr, ctypes.byref(v), size, ctypes.byref(size)) == 0:
                out[name] = v.value
        return out

    def matmul(self, desc, a_ptr, a, b_ptr, b, c_ptr, c, algo, ws_ptr, stream):
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.check(self.lib.cublasLtMatmul(self.handle, desc, ctypes.byref(alpha), ctypes.c_void_p(a_ptr), a,
                                           ctypes.c_void_p(b_ptr), b, ctypes.byref(beta), ctypes.c_void_p(c_ptr), c,
                                           ctypes.c_void_p(c_ptr), c, ctypes.byref(algo), ctypes.c_void_p(ws_ptr),
                                           ctypes.c_size_t(WORKSPACE), ctypes.c_void_p(stream)), "matmul")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--algos", type=int, default=8)
    a = p.parse_args()
    import torch

    nvml = nvml_energy.open_or_none()
    if nvml is None:
        raise SystemExit("no NVML energy counter")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    torch.ones(64, 64, device=dev, dtype=torch.bfloat16) @ torch.ones(64, 64, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()  # torch has loaded its cuBLASLt, which Lt() then finds in the process
    lt = Lt()
    ws = torch.empty(WORKSPACE, dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    M = 2048
    # (label, transa, transb, rows of W, cols of W): forward Y = X·Wᵀ is TN with m = N, n = M, k = K;
    # the input gradient dX = dY·W is NN with m = K, n = M, k = N.
    cases = [("fwd 4096x4096", 1, 0, 4096, 4096), ("fwd 11008x4096 (gate/up)", 1, 0, 11008, 4096),
             ("fwd 4096x11008 (down)", 1, 0, 4096, 11008), ("dgrad 4096x4096", 0, 0, 4096, 4096),
             ("dgrad 11008x4096 (gate/up)", 0, 0, 11008, 4096)]
    print(f"cuBLASLt: {lt.path}; torch {torch.__version__}; {torch.cuda.get_device_name()}")
    rows = []

    def record(label, rank, name, flop, calls, secs, joules, mhz, **extra):
        """One measured kernel: its row (rate, joules per TFLOP, power, clock) kept and printed."""
        tflop = calls * flop / 1e12
        row = {"case": label, "rank": rank, **extra, "us_per_call": secs / calls * 1e6, "tflops": tflop / secs,
               "joules_per_tflop": joules / tflop, "watts": joules / secs, "sm_mhz": mhz}
        rows.append(row)
        print(f"{label:<28} {name}: {row['us_per_call']:7.1f} us, {row['tflops']:6.1f} TFLOP/s, "
              f"{row['joules_per_tflop']:.3f} J/TFLOP, {row['watts']:5.0f} W, {mhz:.0f} MHz", flush=True)

    for label, ta, tb, n_out, k_in in cases:
        w = (torch.randn(n_out, k_in, device=dev) * 0.02).to(torch.bfloat16)
        if ta:  # forward: X (M, K) in, Y (M, N) out
            m, n, k = n_out, M, k_in
            x = torch.randn(M, k_in, device=dev).to(torch.bfloat16)
            y = torch.empty(M, n_out, device=dev, dtype=torch.bfloat16)
        else:  # input gradient: dY (M, N) in, dX (M, K) out
            m, n, k = k_in, M, n_out
            x = torch.randn(M, n_out, device=dev).to(torch.bfloat16)
            y = torch.empty(M, k_in, device=dev, dtype=torch.bfloat16)
        desc, la, lb, lc, pref = lt.problem(ta, tb, m, n, k)
        flop = 2.0 * m * n * k
        for rank, h in enumerate(lt.heuristics(desc, la, lb, lc, pref, a.algos)):
            algo = h.algo
            run = lambda: lt.matmul(desc, w.data_ptr(), la, x.data_ptr(), lb, y.data_ptr(), lc, algo,
                                    ws.data_ptr(), stream)
            try:
                measured = nvml_energy.measure(nvml, torch, run, a.seconds)
            except RuntimeError as e:
                print(f"{label} algo {rank}: {e}")
                continue
            config = lt.config(algo)
            record(label, rank, f"algo {rank} {config}", flop, *measured, config=config, waves=h.waves)
        # torch's own choice, the rival every row is read against.
        wt = w.t()
        if ta:
            run = lambda: torch.matmul(x, wt, out=y)
        else:
            run = lambda: torch.matmul(x, w, out=y)
        record(label, "torch", "torch.matmul", flop, *nvml_energy.measure(nvml, torch, run, a.seconds))
    json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
