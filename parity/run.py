#!/usr/bin/env python3
"""Parity of llamatune with transformers, PEFT and bitsandbytes on the same inputs.

Drives the llamatune binary (hidden `debug` subcommands dump quantized bytes, logits and LoRA
gradients as safetensors) and prints one table row per check: measured error, threshold, verdict.
Thresholds were fixed before the first run: exact (0) for quantized bytes, absmax and dequantized
values; 1e-4 relative for f32-vs-f32 logits; 2e-2 relative wherever either side multiplies in bf16.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

LT, OUT = sys.argv[1], sys.argv[2]
SKIP_7B = "--skip-7b" in sys.argv
ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
TMP = tempfile.mkdtemp(prefix="parity-")
rows = []
F32_TOL, BF16_TOL = 1e-4, 2e-2


def check(name, err, tol):
    ok = err <= tol
    rows.append((name, err, tol, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name:<62} {err:>10.3e}  (≤ {tol:.0e})", flush=True)


def rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def lt(*args):
    r = subprocess.run([LT, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llamatune {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


def tokens_arg(t):
    return ";".join(",".join(str(int(x)) for x in row) for row in t.tolist())


# ---------------------------------------------------------------- 1. quantization vs bitsandbytes
FP4_THRESH = [(0.29166667, 0.583333, 0.8333333, 0.4166667, 0.0859375, 0.20833333, 0.00260417)]


def fp4_tree(x):
    """bitsandbytes' dQuantizeFP4 on a float32 tensor (vectorized)."""
    t = [torch.tensor(v, dtype=torch.float32) for v in FP4_THRESH[0]]
    sign = (x < 0).to(torch.int64) * 8
    a = x.abs()
    hi = torch.where(a > t[1], torch.where(a > t[2], 3, 2), torch.where(a > t[3], 5, 4))
    lo = torch.where(a > t[4], torch.where(a > t[5], 7, 6), torch.where(a > t[6], 1, 0))
    return torch.where(a > t[0], hi, lo) + sign


def rcp_approx(x):
    """rcp.approx.ftz.f32 (the SFU reciprocal that --use_fast_math gives 1.0f/x) of a CUDA f32 tensor,
    through Triton's inline PTX; None when Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        print("   (no triton: rcp.approx check skipped)")
        return None

    @triton.jit
    def k(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(x_ptr + i, mask=m, other=1.0)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(y_ptr + i, r, mask=m)

    x = x.float().contiguous().cuda()
    y = torch.empty_like(x)
    k[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def quant_variants(w, bs, st, packed):
    """Which scaling (x/absmax or x*(1/absmax)) and which 8-bit search reproduce bitsandbytes."""
    import bitsandbytes.functional as F
    flat = w.float().flatten().cuda()
    theirs_codes = torch.stack([(packed.flatten() >> 4) & 15, packed.flatten() & 15], 1).flatten()[: flat.numel()].to(torch.int64)
    am = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.state2 is not None else st.absmax
    am = am.flatten()
    idx = torch.arange(flat.numel(), device=flat.device) // bs
    if st.state2 is None:
        for name, scaled in [("div", flat / am[idx]), ("mul", flat * (1.0 / am[idx]))]:
            print(f"   variant fp4 scaling={name}: {(fp4_tree(scaled) != theirs_codes).sum().item()} code mismatches")
        bad = (fp4_tree(flat * (1.0 / am[idx])) != theirs_codes).nonzero().flatten()
        scaled = (flat * (1.0 / am[idx]))[bad].abs()
        print(f"   fp4 mismatches: {len(bad)} of {flat.numel()}; distinct |scaled| values: {sorted(set(round(x, 9) for x in scaled.tolist()))[:8]}")
        # bitsandbytes' kernel scales by MUFU.RCP (rcp.approx: --use_fast_math), not by a correctly
        # rounded 1/absmax (seen in the SASS of kQuantizeBlockwise<bf16, 64, 2, 0, FP4>).
        inv = rcp_approx(am)
        if inv is not None:
            n = (fp4_tree(flat * inv[idx]) != theirs_codes).sum().item()
            check(f"cause: fp4 codes with rcp.approx(absmax) scaling vs bitsandbytes ({st.quant_type} {bs})", float(n), 0)
    else:
        code = st.state2.code.cuda()
        raw = F.quantize_4bit(w.cuda(), blocksize=bs, compress_statistics=False, quant_type=st.quant_type)[1].absmax.flatten()
        a = raw - st.offset
        s2 = st.state2.absmax.flatten()
        j = torch.arange(a.numel(), device=a.device) // 256
        for name, v in [("div", a / s2[j]), ("mul", a * (1.0 / s2[j]))]:
            d = (v[:, None] - code[None, :]).abs()
            first = d.argmin(1)
            last = 255 - d.flip(1).argmin(1)
            th = st.absmax.flatten().to(torch.int64)
            print(f"   variant 8-bit scaling={name}: nearest-first {(first != th).sum().item()}, nearest-last {(last != th).sum().item()} mismatches of {a.numel()}")


def quantization():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    for shape in [(333, 200), (1024, 4096)]:
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        wpath = f"{TMP}/w.safetensors"
        save_file({"w": w.float().contiguous()}, wpath)
        for qt in ["nf4", "fp4"]:
            for bs in [64, 128]:
                for dq in [False, True]:
                    packed, st = F.quantize_4bit(w.cuda(), blocksize=bs, compress_statistics=dq, quant_type=qt)
                    o = f"{TMP}/q.safetensors"
                    lt("debug", "quantize", "--input", wpath, "--output", o, "--quant-type", qt, "--blocksize", bs,
                       *(["--double-quant"] if dq else []))
                    ours = load_file(o)
                    tag = f"{qt} bs={bs} dq={dq} {shape[0]}x{shape[1]}"
                    theirs = packed.flatten().cpu()
                    bad_bytes = (ours["w.packed"] != theirs).nonzero().flatten()
                    check(f"quant bytes {tag}", float(len(bad_bytes)), 0)
                    if len(bad_bytes) and shape[0] == 333 and bs == 64 and not dq:
                        am = st.absmax.flatten().cpu()
                        flat = w.float().flatten()
                        for bi in bad_bytes[:6].tolist():
                            for e in (2 * bi, 2 * bi + 1):
                                x = (flat[e] * (1.0 / am[e // bs])).item()
                                o, t_ = int(ours["w.packed"][bi]), int(theirs[bi])
                                sh = 4 if e % 2 == 0 else 0
                                print(f"   diag {qt}: elem {e} scaled {x:.9g} ours {(o >> sh) & 15} theirs {(t_ >> sh) & 15}")
                    if shape[0] == 1024 and bs == 64 and (dq or qt == "fp4"):
                        quant_variants(w, bs, st, packed)
                    if dq and shape[0] == 333 and bs == 64:
                        print(f"   diag offset ours {ours['w.offset'].item()!r} theirs {st.offset.item()!r}")
                        print(f"   diag absmax2 ours {ours['w.absmax2'].tolist()} theirs {st.state2.absmax.flatten().tolist()}")
                        print(f"   diag absmax_q ours {ours['w.absmax_q'][:12].tolist()} theirs {st.absmax.flatten()[:12].tolist()}")
                        print(f"   diag code[:6] {st.state2.code[:6].tolist()} code[250:] {st.state2.code[250:].tolist()}")
                    if dq:
                        bad = (ours["w.absmax_q"] != st.absmax.flatten().cpu()).sum().item()
                        bad += (ours["w.absmax2"] != st.state2.absmax.flatten().cpu()).sum().item()
                        bad += int(ours["w.offset"].item() != st.offset.item())
                        check(f"quant nested absmax {tag}", float(bad), 0)
                    else:
                        check(f"quant absmax {tag}", float((ours["w.absmax"] != st.absmax.flatten().cpu()).sum()), 0)
                    deq = F.dequantize_4bit(packed, st).flatten().cpu()
                    mine = ours["w.dequant"].to(torch.bfloat16)
                    check(f"dequant values {tag}", float((mine != deq).sum()), 0)


# ---------------------------------------------------------------- 2. forward logits
def small_model(path, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1001, hidden_size=204, intermediate_size=333, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=34, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=256, tie_word_embeddings=tied,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.8, 1.2)
    m.save_pretrained(path, safe_serialization=True)
    # A word-level tokenizer so that llamatune's model loader (which wants one) accepts the directory.
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(f"{path}/tokenizer.json")
    return m


def hidden_states(name, d, toks, dtype=torch.float32):
    """Per-layer agreement, to localize a logits difference."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).cuda().eval()
    with torch.no_grad():
        hs = m(toks.cuda(), output_hidden_states=True).hidden_states
    del m
    torch.cuda.empty_cache()
    o = f"{TMP}/hid.safetensors"
    lt("debug", "hidden", "--model", d, "--tokens", tokens_arg(toks), "--output", o, "--device", "cpu")
    ours = load_file(o)["hidden"]
    n = min(len(hs), ours.shape[0])
    errs = [rel(ours[i], hs[i].reshape(ours.shape[1], -1).cpu()) for i in range(n)]
    print(f"   {name} hidden states ({len(hs)} from transformers, {ours.shape[0]} ours), rel err by index: "
          + " ".join(f"{e:.1e}" for e in errs), flush=True)


def bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=False)


def logits():
    from transformers import AutoModelForCausalLM

    d = f"{TMP}/small"
    m = small_model(d)
    torch.manual_seed(2)
    toks = torch.randint(0, 1001, (2, 100))
    with torch.no_grad():
        ref = m.cuda().eval()(toks.cuda()).logits.float().cpu()
    hidden_states("small", d, toks)
    for dev, tol in [("cpu", F32_TOL), ("cuda", BF16_TOL)]:
        o = f"{TMP}/l.safetensors"
        lt("debug", "logits", "--model", d, "--tokens", tokens_arg(toks), "--output", o, "--device", dev)
        check(f"logits small odd GQA llama3-rope untied, {dev} vs transformers f32", rel(load_file(o)["logits"], ref), tol)
    q = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_config(), device_map={"": 0})
    with torch.no_grad():
        qref = q.eval()(toks.cuda()).logits.float().cpu()
    for dev in ["cpu", "cuda"]:
        o = f"{TMP}/lq.safetensors"
        lt("debug", "logits", "--model", d, "--tokens", tokens_arg(toks), "--output", o, "--device", dev,
           "--use-4bit", "--bnb-4bit-compute-dtype", "bfloat16")
        check(f"logits small NF4 bf16-compute, {dev} vs transformers+bitsandbytes", rel(load_file(o)["logits"], qref), BF16_TOL)
    return d, toks


def logits_smollm2(gguf):
    """The real SmolLM2-135M-Instruct (GQA 9/3, tied embeddings): converted from its GGUF by
    `llamatune merge` (no adapter), loaded by transformers, on chat-templated tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = f"{TMP}/smollm2"
    lt("merge", "--model", gguf, "--output-dir", d, "--dtype", "float32")
    tok = AutoTokenizer.from_pretrained(d)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write one sentence about llamas and alpacas."}]]
    rows = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    rows = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    n = min(map(len, rows))
    toks = torch.tensor([r[:n] for r in rows])
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    with torch.no_grad():
        ref = m(toks).logits.float()
    del m
    for dev, tol in [("cpu", F32_TOL), ("cuda", BF16_TOL)]:
        o = f"{TMP}/ls.safetensors"
        lt("debug", "logits", "--model", d, "--tokens", tokens_arg(toks), "--output", o, "--device", dev)
        check(f"logits SmolLM2-135M-Instruct, {dev} vs transformers (f64 reference)", rel(load_file(o)["logits"], ref), tol)
    q = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_config(), device_map={"": 0})
    with torch.no_grad():
        qref = q.eval()(toks.cuda()).logits.float().cpu()
    del q
    torch.cuda.empty_cache()
    for dev in ["cpu", "cuda"]:
        o = f"{TMP}/lsq.safetensors"
        lt("debug", "logits", "--model", d, "--tokens", tokens_arg(toks), "--output", o, "--device", dev,
           "--use-4bit", "--bnb-4bit-compute-dtype", "bfloat16")
        check(f"logits SmolLM2 NF4 bf16-compute, {dev} vs transformers+bitsandbytes", rel(load_file(o)["logits"], qref), BF16_TOL)


def logits_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    d = f"{TMP}/llama7b"
    cfg = LlamaConfig()  # the Llama-2-7B shape
    t0 = time.time()
    with torch.device("cuda"):
        torch.manual_seed(3)
        m = LlamaForCausalLM(cfg).half()
    m.save_pretrained(d, safe_serialization=True)
    torch.manual_seed(4)
    toks = torch.randint(0, cfg.vocab_size, (2, 16))
    del m
    torch.cuda.empty_cache()
    # The reference is the saved checkpoint reloaded by transformers, in f64: both sides read the
    # same file. (The in-memory model that produced the file differed from it by ~1e-3 in the
    # logits, which first looked like our error; layer-by-layer comparison showed it was not.)
    from transformers import AutoModelForCausalLM
    refs = {}
    for dt in (torch.float32, torch.float64):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=dt).cuda().eval()
        with torch.no_grad():
            refs[dt] = m(toks.cuda()).logits.double().cpu()
        del m
        torch.cuda.empty_cache()
    ref = refs[torch.float64]
    print(f"(7B checkpoint made and references run in {time.time() - t0:.0f}s; transformers f32 vs f64: {rel(refs[torch.float32], ref):.3e})", flush=True)
    for dev, tol in [("cuda", BF16_TOL), ("cpu", F32_TOL)]:
        o = f"{TMP}/l7.safetensors"
        t0 = time.time()
        lt("debug", "logits", "--model", d, "--tokens", tokens_arg(toks), "--output", o, "--device", dev)
        check(f"logits Llama-2-7B shape (fp16 ckpt), {dev} vs transformers f64 [{time.time() - t0:.0f}s]",
              rel(load_file(o)["logits"], ref), tol)


# ---------------------------------------------------------------- 3+5. gradients and files vs PEFT
def peft_checks(d, toks):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_config(), device_map={"": 0})
    pc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(base, pc)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adir = f"{TMP}/peft_adapter"
    pm.save_pretrained(adir)
    t = toks[:, :48].cuda()
    out = pm(input_ids=t, labels=t)
    out.loss.backward()
    theirs = {n.replace(".default", ""): p.grad.float().cpu() for n, p in pm.named_parameters() if p.requires_grad}
    for dev in ["cpu", "cuda"]:
        g = f"{TMP}/g_{dev}.safetensors"
        lt("debug", "grads", "--model", d, "--adapter", adir, "--tokens", tokens_arg(t.cpu()), "--output", g,
           "--device", dev, "--use-4bit", "--bnb-4bit-compute-dtype", "bfloat16", "--save-adapter", f"{TMP}/ours_{dev}")
        ours = load_file(g)
        check(f"loss, {dev} vs PEFT on the 4-bit model", abs(ours["loss"].item() - out.loss.item()) / out.loss.item(), BF16_TOL)
        worst = max(rel(ours[n].view_as(v), v) for n, v in theirs.items())
        check(f"LoRA grads ({len(theirs)} tensors), worst per-tensor, {dev} vs PEFT", worst, BF16_TOL)
        missing = set(theirs) - set(ours)
        check(f"LoRA grad tensor names match PEFT's, {dev}", float(len(missing)), 0)

    # An adapter written by llamatune loads in PEFT and gives llamatune's logits.
    base2 = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_config(), device_map={"": 0})
    pm2 = PeftModel.from_pretrained(base2, f"{TMP}/ours_cpu")
    with torch.no_grad():
        plog = pm2.eval()(toks.cuda()).logits.float().cpu()
    o = f"{TMP}/la.safetensors"
    lt("debug", "logits", "--model", d, "--adapter", f"{TMP}/ours_cpu", "--tokens", tokens_arg(toks), "--output", o,
       "--device", "cpu", "--use-4bit", "--bnb-4bit-compute-dtype", "bfloat16")
    check("our adapter in PeftModel.from_pretrained: logits vs ours (4-bit)", rel(load_file(o)["logits"], plog), BF16_TOL)

    # A merged model loads in transformers and gives base+adapter's logits (f32 end to end).
    mdir = f"{TMP}/merged"
    lt("merge", "--model", d, "--adapter", adir, "--output-dir", mdir, "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(mdir, torch_dtype=torch.float32).cuda().eval()
    fbase = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).cuda()
    pf = PeftModel.from_pretrained(fbase, adir).eval()
    with torch.no_grad():
        a = merged(toks.cuda()).logits.float().cpu()
        b = pf(toks.cuda()).logits.float().cpu()
    check("merged model (AutoModelForCausalLM) vs base+adapter (PEFT), f32", rel(a, b), F32_TOL)


# ---------------------------------------------------------------- 4. a 100-step loss curve
def train_curve(d):
    """100 steps of the classic recipe (LoRA r=64 alpha=16 on q,v, dropout 0, paged AdamW 32-bit, lr 2e-4,
    linear schedule with 3% warm-up, clip 0.3, weight decay 0.001, batch 4) on the same token batches
    from the same initial adapter: transformers + PEFT + bitsandbytes (NF4, bf16 compute, as
    prepare_model_for_kbit_training leaves it) against llamatune on the CPU and on the GPU."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    steps, warmup, lr = 100, 3, 2e-4  # warm-up: ceil(0.03 · 100)
    g = torch.Generator().manual_seed(11)
    # 25 batches, seen 4 times each: rows cycle through 8 tokens from a random phase, so there is
    # something to learn (pure random tokens leave the loss flat at ln(vocab) in both stacks).
    phase = torch.randint(0, 8, (25, 4, 1), generator=g)
    batches = (torch.arange(64)[None, None, :] + phase) % 8 + 3
    base = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_config(), device_map={"": 0})
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    pm = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "v_proj"]))
    adir = f"{TMP}/curve_init"
    pm.save_pretrained(adir)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=0.001)
    sched = get_linear_schedule_with_warmup(opt, warmup, steps)
    pm.train()
    theirs = []
    for step in range(steps):
        t = batches[step % len(batches)].cuda()
        loss = pm(input_ids=t, labels=t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        theirs.append(loss.item())
    bfile = f"{TMP}/curve_batches.json"
    json.dump(batches.tolist(), open(bfile, "w"))
    curves = {"transformers+peft+bnb": theirs}
    for dev in ["cpu", "cuda"]:
        o = f"{TMP}/curve_{dev}.json"
        lt("debug", "train-curve", "--model", d, "--adapter", adir, "--batches", bfile, "--steps", steps,
           "--learning-rate", lr, "--warmup-steps", warmup, "--max-grad-norm", 0.3, "--weight-decay", 0.001,
           "--optim", "paged_adamw_32bit", "--device", dev, "--use-4bit", "--bnb-4bit-compute-dtype", "bfloat16",
           "--output", o)
        ours = [e["loss"] for e in json.load(open(o))]
        curves[f"llamatune {dev}"] = ours
        gap = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
        check(f"100-step loss curve, {dev} vs the Python stack: largest gap", gap, BF16_TOL)
    check("100-step loss curve goes down (last / first, Python stack)", theirs[-1] / theirs[0], 0.9)
    json.dump(curves, open(f"{OUT}/loss_curves.json", "w"), indent=1)
    print("step  " + "  ".join(f"{k:>22}" for k in curves))
    for i in list(range(0, steps, 10)) + [steps - 1]:
        print(f"{i:>4}  " + "  ".join(f"{v[i]:>22.5f}" for v in curves.values()))


# ---------------------------------------------------------------- 5. tokenizer ids vs AutoTokenizer
CHATS = [
    {"messages": [{"role": "user", "content": "Hello world"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a llama?"},
                  {"role": "assistant", "content": "A South American camelid."},
                  {"role": "user", "content": "And an alpaca?"}], "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "  leading spaces, tabs\tand\nnewlines  "},
                  {"role": "assistant", "content": "Got it:\n\n- one\n- two"}]},
    {"messages": [{"role": "user", "content": "Unicode: 镇 🦙Ꙋ café naïve — “quotes” 1234567890"},
                  {"role": "assistant", "content": "Noted. 42 + 58 = 100."}]},
    {"messages": [{"role": "user", "content": "### Human: nested markers [INST] <s> </s> inside text"},
                  {"role": "assistant", "content": "They are plain text here."}]},
]


def tokenizer_ids(name, tdir):
    """llamatune's chat template rendering and encoding vs transformers' AutoTokenizer on the same files."""
    from transformers import AutoTokenizer

    cfile, o = f"{TMP}/chats.json", f"{TMP}/tok_{name}.json"
    json.dump(CHATS, open(cfile, "w"))
    lt("debug", "tokenize", "--tokenizer", tdir, "--chats", cfile, "--output", o)
    ours = json.load(open(o))
    tok = AutoTokenizer.from_pretrained(tdir)
    text_bad = ids_bad = 0
    for c, u in zip(CHATS, ours):
        text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=c.get("add_generation_prompt", False))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        text_bad += text != u["text"]
        ids_bad += ids != u["ids"]
        if ids != u["ids"]:
            print(f"  {name}: ids differ for {text!r}:\n    theirs {ids}\n    ours   {u['ids']}")
    check(f"{name} tokenizer: chat-templated texts differing from AutoTokenizer's ({len(CHATS)} chats)", float(text_bad), 0)
    check(f"{name} tokenizer: token id sequences differing from AutoTokenizer's", float(ids_bad), 0)


# ---------------------------------------------------------------- 6. TensorBoard files
def tensorboard(d):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = f"{TMP}/data.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": " ".join(f"t{(i * 7 + j) % 1000 + 1}" for j in range(20))}) + "\n")
    odir = f"{TMP}/run"
    lt("train", "--model", d, "--dataset", data, "--output-dir", odir, "--max-steps", 4, "--logging-steps", 1,
       "--lora-r", 4, "--max-seq-length", 32, "--use-4bit", "false", "--device", "cpu", "--per-device-train-batch-size", 2)
    runs = os.listdir(f"{odir}/runs")
    ea = EventAccumulator(f"{odir}/runs/{runs[0]}")
    ea.Reload()
    tags = ea.Tags()["scalars"]
    want = ["train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/peak_memory_gib"]
    missing = [t for t in want if t not in tags]
    steps = [e.step for e in ea.Scalars("train/loss")] if "train/loss" in tags else []
    check(f"TensorBoard EventAccumulator: scalars {want} at steps 1..4", float(len(missing) + (steps != [1, 2, 3, 4])), 0)
    logged = [json.loads(l)["loss"] for l in open(f"{odir}/log.jsonl")]
    tb = [e.value for e in ea.Scalars("train/loss")]
    check("TensorBoard train/loss equals log.jsonl", max(abs(a - b) / abs(b) for a, b in zip(tb, logged)), 1e-6)


def main():
    import transformers, peft, bitsandbytes
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
    print(versions, "on", torch.cuda.get_device_name(0), flush=True)
    def section(name, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # one broken section must not hide the others' results
            import traceback
            traceback.print_exc()
            check(f"{name}: raised {type(e).__name__}: {str(e)[:80]}", float("inf"), 0)

    want = lambda n: ONLY is None or n in ONLY
    if want("quant"):
        section("quantization", quantization)
    got = section("logits", logits) if want("small") else None
    if got:
        d, toks = got
        section("peft", peft_checks, d, toks)
        section("tensorboard", tensorboard, d)
        if want("curve"):
            section("train curve", train_curve, d)
    for a in sys.argv:
        if a.startswith("--smollm2-gguf="):
            section("smollm2 logits", logits_smollm2, a.split("=", 1)[1])
        if a.startswith("--tokenizer="):  # NAME=DIR (a Hugging Face tokenizer directory)
            name, tdir = a.split("=", 1)[1].split(":", 1)
            section(f"tokenizer {name}", tokenizer_ids, name, tdir)
    if not SKIP_7B and want("7b"):
        section("7b", logits_7b)
    with open(f"{OUT}/parity.md", "w") as f:
        f.write(f"{versions}; {torch.cuda.get_device_name(0)}; {time.strftime('%Y-%m-%d')}\n\n| check | error | threshold | |\n|---|---|---|---|\n")
        for n, e, t, ok in rows:
            f.write(f"| {n} | {e:.3e} | {t:.0e} | {'pass' if ok else 'FAIL'} |\n")
    failed = [r for r in rows if not r[3]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
