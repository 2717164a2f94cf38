"""Side by side on one GPU, in one run: transformers + PEFT + bitsandbytes against `llamatune bench`,
on the same model shape (random weights), recipe, batch shape and decode length. Prints the ratios
and writes them as JSON.

    python3 parity/side_by_side.py STAGE/llamatune OUT_DIR [--shape llama2-7b] [--steps 10]
        [--recipes classic,all-linear] [--decode-tokens 128] [--skip-python] [--skip-ours]
        [--keep-mlp-layers N] [--keep-attention-layers N] [--keep RECIPE=MLP,ATTENTION ...]

The Python stack follows the classic QLoRA recipe as trl's SFTTrainer runs it: NF4 base with bf16
compute, `prepare_model_for_kbit_training` (gradient checkpointing, fp32 norms), LoRA r=64 alpha=16
dropout 0.1, bitsandbytes' PagedAdamW32bit at lr 2e-4, clip 0.3, batch 4 rows of 512 tokens (every
row full, so both sides do the same work). Each stack runs in its own process, so neither sees the
other's memory; peak memory is torch's max_memory_allocated on one side and the CUDA pool's
high-water mark on ours, both counted after the weights are loaded. With --keep-mlp-layers N and/or
--keep-attention-layers N, ours runs each recipe once more with `--gradient-checkpointing-keep-mlp N`
and `--gradient-checkpointing-keep-attention N` (memory traded for time), its rows ("+keep") set against
the same Python run. `--keep RECIPE=MLP,ATTENTION` (repeatable) sets them for one recipe instead, so
each recipe can run with what fits its own memory bound (the Python stack's peak differs between them).
The Python stack's speed depends on its host as well as the card (each step is
thousands of small ops launched from Python; batch-1 decoding is almost nothing else), so its child also
times torch's eager launch of a one-element op before and after its runs, printed with the table.
And the card's clock: nvidia-smi samples the SM clock and board power every 50 ms while each stack
runs, and the table ends with each run's median SM clock and mean power over its busy samples (power
above --busy-watts). A step that draws the card to its power limit is throttled (session 30 saw ours
at a median 1.83-1.85 GHz and the Python stack's at 1.98), so the ratios partly measure power; both
stacks' joules per timed step (the board's energy counter around them, parity/nvml_energy.py on the
Python side, `llamatune bench`'s own reading on ours) are in the table too.
"""
import argparse
import atexit
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import nvml_energy  # parity/, beside this script

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, rope_theta=10000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
}
RECIPES = {"classic": ["q_proj", "v_proj"],
           "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class ClockSampler:
    """nvidia-smi's SM clock (MHz) and board power (W) every 50 ms, time-stamped, and named time windows
    to summarize them over. Without nvidia-smi (or if it fails) it records nothing and summarizes
    nothing: the side by side runs the same."""

    def __init__(self):
        self.samples, self.windows = [], []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        atexit.register(self.proc.terminate)  # also when a run fails before the summary
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                clock, power = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue  # "[N/A]" and the like
            self.samples.append((time.monotonic(), clock, power))

    @contextlib.contextmanager
    def window(self, name):
        start = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((name, start, time.monotonic()))

    def summary(self, busy_watts):
        """(name, busy samples, median MHz, min MHz, mean W) per window with busy samples."""
        if self.proc:
            self.proc.terminate()
        rows = []
        for name, start, end in self.windows:
            busy = [(c, w) for t, c, w in list(self.samples) if start <= t <= end and w > busy_watts]
            if busy:
                clocks = [c for c, _ in busy]
                rows.append((name, len(busy), statistics.median(clocks), min(clocks),
                             statistics.mean(w for _, w in busy)))
        return rows


def eager_op_us(torch):
    """Microseconds the host takes per small eager torch op (one-element add, launched back to back)."""
    x = torch.zeros(1, device="cuda")
    for _ in range(200):
        x.add_(1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5000):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 5000 * 1e6


def python_stack(a, out):
    """Runs in a child process: builds, quantizes and trains with the Python stack."""
    import torch
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt = f"/tmp/side_by_side_{a.shape}"
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        cfg = LlamaConfig(**SHAPES[a.shape], rms_norm_eps=1e-5, max_position_embeddings=4096)
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.float16)
        m.save_pretrained(ckpt)
        del m
        torch.cuda.empty_cache()
    results = {}
    nvml = nvml_energy.open_or_none()
    host_us = [eager_op_us(torch)]
    for recipe in a.recipes.split(","):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=q, device_map={"": 0},
                                                     dtype=torch.bfloat16)
        torch.cuda.synchronize()
        load_s = time.time() - t0
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none",
                                                 task_type="CAUSAL_LM", target_modules=RECIPES[recipe]))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0)
        g = torch.Generator(device="cuda").manual_seed(0)
        vocab = SHAPES[a.shape]["vocab_size"]
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, losses, energy_start = [], [], None
        for step in range(a.warmup_steps + a.steps):
            if step == a.warmup_steps and nvml:
                torch.cuda.synchronize()
                energy_start = (nvml.joules(), time.time())
            ids = torch.randint(0, vocab, (4, 512), device="cuda", generator=g)
            torch.cuda.synchronize()
            t = time.time()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= a.warmup_steps:
                times.append(time.time() - t)
            losses.append(loss.item())
        peak = torch.cuda.max_memory_allocated()
        med = statistics.median(times)
        r = dict(median_step_s=med, tokens_per_s=2048 / med, train_peak_memory_bytes=peak, load_quantize_s=load_s,
                 losses=losses)
        if energy_start:  # the steps end synchronized: the span holds their work (as `llamatune bench` counts)
            joules = nvml.joules() - energy_start[0]
            r.update(train_joules_per_step=joules / a.steps,
                     train_mean_power_watts=joules / (time.time() - energy_start[1]))
        if a.decode_tokens and recipe == a.recipes.split(",")[0]:
            model.eval()
            model.config.use_cache = True
            prompt = torch.randint(0, vocab, (1, 32), device="cuda", generator=g)
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
                torch.cuda.synchronize()
                t = time.time()
                model.generate(prompt, max_new_tokens=a.decode_tokens, min_new_tokens=a.decode_tokens,
                               do_sample=False)
                torch.cuda.synchronize()
            r["decode_tokens_per_s"] = a.decode_tokens / (time.time() - t)
        results[recipe] = r
        print(f"python {recipe}: {r['tokens_per_s']:.0f} tokens/s, peak {peak / 2**30:.2f} GiB", flush=True)
        del model, opt, params
        torch.cuda.empty_cache()
    host_us.append(eager_op_us(torch))
    results["host"] = dict(us_per_eager_torch_op=host_us)
    json.dump(results, open(os.path.join(out, "python.json"), "w"), indent=1)


def ours(a, exe, out, clocks):
    results = {}
    for i, recipe in enumerate(a.recipes.split(",")):
        j = os.path.join(out, f"llamatune-{recipe}.json")
        cmd = [exe, "bench", "--device", "cuda", "--shape", a.shape, "--steps", str(a.steps),
               "--warmup-steps", str(a.warmup_steps), "--target-modules", ",".join(RECIPES[recipe]),
               "--lora-r", "64", "--lora-alpha", "16", "--lora-dropout", "0.1", "--optim", "paged_adamw_32bit",
               "--decode-tokens", str(a.decode_tokens if i == 0 else 0), "--json", j]
        print("+", " ".join(cmd), flush=True)
        with clocks.window(f"llamatune {recipe}"):
            subprocess.run(cmd, check=True)
        results[recipe] = json.load(open(j))
        if recipe in a.keeps:
            keep_mlp, keep_attention = a.keeps[recipe]
            jk = os.path.join(out, f"llamatune-{recipe}-keep.json")
            cmd = [*cmd[:cmd.index("--decode-tokens")], "--decode-tokens", "0",
                   "--gradient-checkpointing-keep-mlp", str(keep_mlp),
                   "--gradient-checkpointing-keep-attention", str(keep_attention), "--json", jk]
            print("+", " ".join(cmd), flush=True)
            with clocks.window(f"llamatune {recipe}+keep"):
                subprocess.run(cmd, check=True)
            results[f"{recipe}+keep"] = json.load(open(jk))
    return results


def keep_settings(a, parser):
    """{recipe: (mlp layers, attention layers)} for the recipes whose extra run keeps activations:
    --keep-mlp-layers / --keep-attention-layers for every recipe, then each --keep for its own."""
    recipes = a.recipes.split(",")
    keeps = {r: (a.keep_mlp_layers, a.keep_attention_layers) for r in recipes
             if a.keep_mlp_layers or a.keep_attention_layers}
    for item in a.keep:
        recipe, _, layers = item.partition("=")
        try:
            mlp, attention = (int(v) for v in layers.split(","))
        except ValueError:
            parser.error(f"--keep {item!r}: expected RECIPE=MLP,ATTENTION, e.g. all-linear=31,12")
        if recipe not in recipes:
            parser.error(f"--keep {item!r}: {recipe!r} is not one of --recipes ({a.recipes})")
        if mlp < 0 or attention < 0 or mlp + attention == 0:
            parser.error(f"--keep {item!r}: layer counts must be >= 0 and not both 0")
        keeps[recipe] = (mlp, attention)
    return keeps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("exe")
    p.add_argument("out")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--recipes", default="classic,all-linear")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--skip-python", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--keep-mlp-layers", type=int, default=0)
    p.add_argument("--keep-attention-layers", type=int, default=0)
    p.add_argument("--keep", action="append", default=[], metavar="RECIPE=MLP,ATTENTION",
                   help="layers whose MLP / attention activations one recipe's extra run keeps")
    p.add_argument("--busy-watts", type=float, default=300.0, help="power above which a clock sample counts")
    p.add_argument("--python-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.keeps = keep_settings(a, p)
    os.makedirs(a.out, exist_ok=True)
    if a.python_child:
        return python_stack(a, a.out)
    clocks = ClockSampler()
    if not a.skip_python:
        args = [sys.executable, __file__, *sys.argv[1:], "--python-child"]
        with clocks.window("python (all recipes and decode)"):
            subprocess.run(args, check=True)
    py = json.load(open(os.path.join(a.out, "python.json"))) if os.path.exists(os.path.join(a.out, "python.json")) else {}
    us = {} if a.skip_ours else ours(a, a.exe, a.out, clocks)
    import torch
    card = torch.cuda.get_device_name(0)
    rows = []
    print(f"\n{card}, shape {a.shape}, batch 4 x 512, NF4 bf16 compute, checkpointing, paged AdamW 32-bit")
    host_us = py.get("host", {}).get("us_per_eager_torch_op")
    if host_us:
        print("host: torch's eager launch of a small op " + " / ".join(f"{v:.1f}" for v in host_us)
              + " us (before / after the Python runs)")
    print(f"{'what':<34}{'python':>14}{'llamatune':>14}{'ratio':>10}")
    keep = [f"{r}+keep" for r in a.recipes.split(",") if r in a.keeps]
    for recipe in a.recipes.split(",") + keep:
        P, U = py.get(recipe.split("+")[0], {}), us.get(recipe, {})
        for key, label in [("tokens_per_s", f"{recipe} tokens/s"),
                           ("train_peak_memory_bytes", f"{recipe} peak GiB (ratio < 1: ours smaller)"),
                           ("train_joules_per_step", f"{recipe} J per step (ratio < 1: ours less)"),
                           ("decode_tokens_per_s", "decode tokens/s (batch 1)")]:
            pv, uv = P.get(key), U.get(key)
            if uv is None and (pv is None or "+" in recipe):  # the settings' extra runs decode nothing
                continue
            scale = 2**30 if "memory" in key else 1
            ratio = uv / pv if pv and uv else None
            rows.append(dict(recipe=recipe, what=key, python=pv, llamatune=uv, ratio=ratio))
            f = lambda v: "-" if v is None else f"{v / scale:.2f}" if scale > 1 else f"{v:.1f}"
            print(f"{label:<34}{f(pv):>14}{f(uv):>14}{'-' if ratio is None else f'{ratio:.2f}x':>10}")
    clock_rows = clocks.summary(a.busy_watts)
    for name, n, median, low, watts in clock_rows:
        print(f"clock, {name}: median {median:.0f} MHz (min {low:.0f}), mean {watts:.0f} W over {n} samples above {a.busy_watts:.0f} W")
    json.dump(dict(card=card, shape=a.shape, rows=rows, python=py, llamatune=us,
                   clocks=[dict(run=r[0], busy_samples=r[1], median_sm_mhz=r[2], min_sm_mhz=r[3], mean_watts=r[4])
                           for r in clock_rows]),
              open(os.path.join(a.out, "side_by_side.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
