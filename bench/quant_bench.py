"""QLoRA: LoRA r=8 all-linear on a frozen base held in fp32 / bf16 / int8 / NF4 (bitsandbytes).

Per (model, base precision, library), in a fresh process: the model is loaded (and quantized by
``lorakit.quantize``: every linear layer but the head), then the adapter is injected and a few
training steps run (AdamW; SmolLM2-135M causal LM 4x256 tokens, MiniLM seq-cls 16x128, the
batches of ``bench/model_bench.py``); then one no-grad forward of the same batch (serving).
Reported: RSS after loading, peak RSS of training and of serving (a second fresh process: one
no-grad forward of the batch) over it and in total, and s/step (median). PEFT runs on the same quantized base (its bitsandbytes LoRA layers; the model is
flagged ``is_loaded_in_4bit/8bit`` as transformers does). Quality runs: ``--quality`` trains the
``lorakit train`` tasks (same split and seed as ``bench/finetune_table.py``) with ``--quantize``.

    python bench/quant_bench.py                   # memory + step time, both models (~10 min, 2 cores)
    python bench/quant_bench.py --quality         # + exact match / accuracy per precision (long)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from model_bench import batch, load, mem_mb  # noqa: E402

PRECISIONS = ["fp32", "bf16", "int8", "nf4"]
MODELS = {"smollm2": "SmolLM2-135M causal LM 4x256", "minilm": "MiniLM seq-cls 16x128"}


def worker(args) -> None:
    common.setup(args.threads)
    import torch
    key, precision, lib, mode = args.worker.split(":")
    torch.manual_seed(0)
    model = load(key)
    with torch.no_grad():  # own storage per weight: the GGUF loader's tensors share buffers that a
        for p in model.parameters():  # surviving embedding would keep alive after quantize freed the rest
            p.data = p.data.clone()
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision in ("int8", "nf4"):
        import lorakit
        lorakit.quantize(model, precision)
        setattr(model, "is_loaded_in_8bit" if precision == "int8" else "is_loaded_in_4bit", True)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.float().sum()
    # the fp32 weights that quantize replaced are freed, but glibc keeps freed heap in RSS: give it
    # back, so RSS is what a model loaded directly in this precision holds
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out = {"rss_load_mb": mem_mb()[0], "model_mb": _model_bytes(model) / 2 ** 20}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    save = ["classifier"] if key == "minilm" else []
    if lib == "lorakit":
        import lorakit
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear", modules_to_save=save))
    else:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           modules_to_save=save or None,
                                                           task_type="SEQ_CLS" if key == "minilm" else "CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    b = batch(key, 0)
    if mode == "serve":  # a fresh process: one no-grad forward of the batch, as a server's prefill
        model.eval()
        times = []
        with torch.no_grad():
            for _ in range(2):
                t0 = time.perf_counter()
                model(**{k: v for k, v in b.items() if k != "labels"})
                times.append(time.perf_counter() - t0)
        out.update(serve_peak_mb=_hwm(), forward_s=min(times))
        print("RESULT " + json.dumps(out), flush=True)
        return
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        res = model(**b)
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(res.loss.item())
        del res
    out.update(train_peak_mb=_hwm(), step_s=statistics.median(times), steps_s=times, losses=losses)
    print("RESULT " + json.dumps(out), flush=True)


def _model_bytes(model) -> int:
    """Bytes of every parameter and buffer (packed 4/8-bit weights as stored) and of bitsandbytes'
    quantization statistics (absmax per block / per row)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scb = getattr(getattr(m, "state", None), "SCB", None)
        if scb is None:
            scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def _hwm() -> float:
    line = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")][0]
    return int(line.split()[1]) / 1024


def spawn(args, key, precision, lib, mode) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{key}:{precision}:{lib}:{mode}", "--threads",
            str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(["/bin/sh", "-c", shlex.join(argv) + "; exit $?"], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stdout[-500:] + proc.stderr[-1500:])}
    return json.loads(lines[-1][len("RESULT "):])


def quality(args, key: str, precision: str) -> dict:
    """One `lorakit train` run (fresh process) with the base in ``precision``; its summary.json."""
    out = Path(args.work) / f"{key}-{precision}"
    task = ["--task", "causal-lm", "--train-limit", str(args.train_limit)] if key == "smollm2" else []
    prec = ["--quantize", precision] if precision in ("int8", "nf4") else ["--bf16"] if precision == "bf16" else []
    argv = [sys.executable, "-m", "lorakit.cli", "train", *task, *prec, "--targets", "all-linear", "--rank", "8",
            "--out", str(out), "--no-progress", "--threads", str(args.threads), "--seed", "0",
            *(["--epochs", str(args.epochs)] if args.epochs else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def report(runs: dict, qual: dict) -> str:
    lines = ["| model | base | library | weights MB | load MB | train peak MB (over load / total) | serve peak MB (over / total) "
             "| s/step | / fp32 LoRA mem (train total) | lorakit / PEFT (time, train mem over load) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in MODELS.items():
        fp32 = runs.get(f"{key}:fp32:lorakit", {})
        for prec in PRECISIONS:
            for lib in ("lorakit", "peft"):
                r = runs.get(f"{key}:{prec}:{lib}")
                if not r:
                    continue
                if "error" in r:
                    lines.append(f"| {label} | {prec} | {lib} | failed: {r['error'][-120:]!r} | | | | | | |")
                    continue
                over, total = r["train_peak_mb"] - r["rss_load_mb"], r["train_peak_mb"]
                rel = f"{total / fp32['train_peak_mb']:.2f}x" if fp32.get("train_peak_mb") else ""
                vs = ""
                other = runs.get(f"{key}:{prec}:peft")
                if lib == "lorakit" and other and "error" not in other:
                    vs = (f"{r['step_s'] / other['step_s']:.2f} / "
                          f"{over / max(other['train_peak_mb'] - other['rss_load_mb'], 1):.2f}")
                lines.append(f"| {label} | {prec} | {lib} | {r['model_mb']:.0f} | {r['rss_load_mb']:.0f} | {over:.0f} / {total:.0f} | "
                             f"{r['serve_peak_mb'] - r['serve_load_mb']:.0f} / {r['serve_peak_mb']:.0f} | "
                             f"{r['step_s']:.2f} | {rel} | {vs} |")
    if qual:
        lines += ["", "| model | base | metric before → after | s/step | wall s |", "|---|---|---|---|---|"]
        for name, s in qual.items():
            if "error" in s:
                lines.append(f"| {name} | failed: {s['error'][-200:]!r} | | | |")
                continue
            before = s.get("test_exact_match_before", s.get("test_accuracy_before"))
            after = s.get("test_exact_match", s.get("test_accuracy"))
            lines.append(f"| {name.split('-')[0]} | {name.split('-')[1]} | {before} → {after} | "
                         f"{s.get('s_per_step', '')} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=PRECISIONS)
    p.add_argument("--quality", action="store_true", help="also train the lorakit train tasks per precision")
    p.add_argument("--quality-precisions", nargs="+", default=PRECISIONS)
    p.add_argument("--no-speed", action="store_true", help="only the quality runs")
    p.add_argument("--train-limit", type=int, default=600, help="SmolLM2 training examples (lorakit train's 600)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--work", default="/tmp/lorakit-quant-bench")
    p.add_argument("--name", default="quant_bench")
    p.add_argument("--seed-runs", help="JSON of runs measured earlier (same format), kept and not rerun")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    runs, qual = (json.loads(Path(args.seed_runs).read_text()) if args.seed_runs else {}), {}
    if not args.no_speed:
        for key in args.models:
            for prec in args.precisions:
                for lib in (("lorakit", "peft") if prec in ("int8", "nf4") else ("lorakit",)):
                    if f"{key}:{prec}:{lib}" in runs:
                        continue
                    r = spawn(args, key, prec, lib, "train")
                    serve = spawn(args, key, prec, lib, "serve")
                    r.update({k: v for k, v in serve.items() if k in ("serve_peak_mb", "forward_s", "error")})
                    r["serve_load_mb"] = serve.get("rss_load_mb")
                    runs[f"{key}:{prec}:{lib}"] = r
                    log(f"{key} {prec} {lib}: {json.dumps({k: v for k, v in r.items() if k not in ('steps_s', 'losses')})[:300]}")
    if args.quality:
        for key in args.models:
            for prec in args.quality_precisions:
                qual[f"{key}-{prec}"] = s = quality(args, key, prec)
                log(f"quality {key} {prec}: {json.dumps(s)[:400]}")
    md = report(runs, qual)
    print(md)
    common.write(args.name, {"runs": runs, "quality": qual, "args": vars(args), "machine": common.machine()}, md)


if __name__ == "__main__":
    main()
