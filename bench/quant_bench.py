"""QLoRA: LoRA r=8 all-linear on a frozen base held in fp32 / bf16 / int8 / NF4 (bitsandbytes).

Per (model, base precision, library), in a fresh process: the model is loaded (and quantized by
``lorakit.quantize``: every linear layer but the head), then the adapter is injected and a few
training steps run (AdamW; SmolLM2-135M causal LM 4x256 tokens, MiniLM seq-cls 16x128, the
batches of ``bench/model_bench.py``); then one no-grad forward of the same batch (serving).
Reported: RSS after loading, peak RSS of training and of serving (a second fresh process: one
no-grad forward of the batch) over it and in total, and s/step (median). PEFT runs on the same quantized base
(its bitsandbytes LoRA layers; the model is
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
    if "ckpt" in args.recipe:  # transformers' activation checkpointing of every block (non-reentrant)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if "chunked" in args.recipe:  # lorakit's causal-LM loss: labelled positions' logits a chunk at a time
        from lorakit.train.lm_loss import causal_lm_loss
        loss_fn = causal_lm_loss
    else:
        loss_fn = lambda m, b: m(**b).loss  # noqa: E731
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        del loss
    out.update(train_peak_mb=_hwm(), step_s=statistics.median(times), steps_s=times, losses=losses)
    print("RESULT " + json.dumps(out), flush=True)


def interleaved(args) -> dict:
    """lorakit and PEFT on deep copies of one quantized base in this process, training steps in
    alternating (shuffled) order per round: the median of per-round time ratios (robust to load)."""
    import copy
    import random

    import peft
    import torch

    import lorakit
    common.setup(args.threads)
    key, precision = args.interleave.split(":")
    torch.manual_seed(0)
    base = load(key)
    if precision in ("int8", "nf4"):
        lorakit.quantize(base, precision)
        setattr(base, "is_loaded_in_8bit" if precision == "int8" else "is_loaded_in_4bit", True)
    save = ["classifier"] if key == "minilm" else []
    models = {
        "lorakit": lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=8, alpha=16, targets="all-linear",
                                                                          modules_to_save=save)),
        "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=save or None,
            task_type="SEQ_CLS" if key == "minilm" else "CAUSAL_LM"))}
    del base
    b = batch(key, 0)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    times = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        order = list(models)
        random.shuffle(order)
        for k in order:
            models[k].train()
            t0 = time.perf_counter()
            models[k](**b).loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["lorakit"], times["peft"])]
    return {"times": times, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


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
            str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup), "--recipe", args.recipe]
    proc = subprocess.run(["/bin/sh", "-c", shlex.join(argv) + "; exit $?"], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stdout[-500:] + proc.stderr[-1500:])}
    return json.loads(lines[-1][len("RESULT "):])


def quality(args, key: str, precision: str) -> dict:
    """One training of the ``lorakit train`` task (fresh process) with the base in ``precision``:
    SmolLM2 causal LM (BBC headline -> topic word; exact match) or MiniLM classification (BBC News;
    accuracy), the fixed split and seed 0 of ``bench/finetune_table.py``; its summary."""
    out = Path(args.work) / f"{key}-{precision}"
    quantize = repr(precision) if precision in ("int8", "nf4") else "None"
    bf16 = precision == "bf16"
    if key == "smollm2":
        call = (f"causal_lm({str(out)!r}, lora=LoraSpec(('all-linear',), r=8), quantize={quantize}, "
                f"train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, bf16={bf16}, seed=0), "
                f"train_limit={args.train_limit}, eval_limit={args.eval_limit}, progress=False)")
    else:
        call = (f"classify({str(out)!r}, lora=LoraSpec(('all-linear',), r=8), quantize={quantize}, "
                f"train=TrainConfig(epochs={args.epochs or 3}, batch_size=16, lr=1e-3, bf16={bf16}, seed=0), "
                f"max_length=128, progress=False)")
    code = ("import torch; torch.set_num_threads(%d)\n"
            "from lorakit.train.loop import TrainConfig\n"
            "from lorakit.train.tasks import LoraSpec, causal_lm, classify\n%s" % (args.threads, call))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
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
                             + (f"{r['serve_peak_mb'] - r['serve_load_mb']:.0f} / {r['serve_peak_mb']:.0f} | "
                                if r.get("serve_load_mb") else "| ") +
                             f"{r['step_s']:.2f} | {rel} | {vs} |")
    if qual:
        lines += ["", "| model | base | metric before → after | s/step | peak MB | wall s |", "|---|---|---|---|---|---|"]
        for name, s in qual.items():
            if "error" in s:
                lines.append(f"| {name} | failed: {s['error'][-200:]!r} | | | | |")
                continue
            before = s.get("test_exact_match_before", s.get("test_accuracy_before"))
            after = s.get("test_exact_match", s.get("test_accuracy"))
            lines.append(f"| {name.split('-')[0]} | {name.split('-')[1]} | {before:.4f} → {after:.4f} | "
                         f"{s.get('seconds_per_step', 0):.2f} | {s.get('peak_memory_mb', 0):.0f} | {s['wall_s']:.0f} |")
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
    p.add_argument("--parallel", type=int, default=1, help="quality runs at a time")
    p.add_argument("--no-speed", action="store_true", help="only the quality runs")
    p.add_argument("--train-limit", type=int, default=600, help="SmolLM2 training examples (lorakit train's 600)")
    p.add_argument("--epochs", type=float, default=None, help="MiniLM epochs (default 3)")
    p.add_argument("--eval-limit", type=int, default=200, help="SmolLM2 val/test examples (lorakit train's 200)")
    p.add_argument("--work", default="/tmp/lorakit-quant-bench")
    p.add_argument("--name", default="quant_bench")
    p.add_argument("--interleave", help="MODEL:PRECISION: lorakit vs PEFT step time, interleaved in one process")
    p.add_argument("--recipe", default="plain", choices=["plain", "ckpt", "ckpt+chunked"],
                   help="training memory recipe: activation checkpointing, and lorakit's chunked causal-LM loss")
    p.add_argument("--no-serve", action="store_true", help="skip the serving runs")
    p.add_argument("--seed-runs", help="JSON of runs measured earlier (same format), kept and not rerun")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.interleave:
        r = interleaved(args)
        print(json.dumps(r))
        Path(common.RESULTS / f"{args.name}.json").write_text(json.dumps(r, indent=1))
        return None
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    runs, qual = (json.loads(Path(args.seed_runs).read_text()) if args.seed_runs else {}), {}
    if not args.no_speed:
        for key in args.models:
            for prec in args.precisions:
                for lib in (("lorakit", "peft") if prec in ("int8", "nf4") else ("lorakit",)):
                    if f"{key}:{prec}:{lib}" in runs:
                        continue
                    r = spawn(args, key, prec, lib, "train")
                    if not args.no_serve:
                        serve = spawn(args, key, prec, lib, "serve")
                        r.update({k: v for k, v in serve.items() if k in ("serve_peak_mb", "forward_s", "error")})
                        r["serve_load_mb"] = serve.get("rss_load_mb")
                    r["recipe"] = args.recipe
                    runs[f"{key}:{prec}:{lib}"] = r
                    log(f"{key} {prec} {lib}: {json.dumps({k: v for k, v in r.items() if k not in ('steps_s', 'losses')})[:300]}")
    if args.quality:
        from concurrent.futures import ThreadPoolExecutor
        jobs = [(key, prec) for key in args.models for prec in args.quality_precisions]
        with ThreadPoolExecutor(args.parallel) as pool:
            for (key, prec), s in zip(jobs, pool.map(lambda j: quality(args, *j), jobs)):
                qual[f"{key}-{prec}"] = s
                log(f"quality {key} {prec}: {json.dumps(s)[:400]}")
    md = report(runs, qual)
    print(md)
    common.write(args.name, {"runs": runs, "quality": qual, "args": vars(args), "machine": common.machine()}, md)


if __name__ == "__main__":
    main()
