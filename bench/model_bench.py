"""Model-level training cost: lorakit vs PEFT vs full fine-tuning, plus injection time.

    python bench/model_bench.py                      # 3 rounds x 6 steps, both models (~30 min at 1 thread)
    python bench/model_bench.py --quick              # smoke run: 1 round, 2 steps, 3 injection rounds
    python bench/model_bench.py --models minilm --skip-inject

fp32, AdamW lr 1e-4, LoRA r=8 alpha=16 dropout 0 (kaiming A, zero B in both libraries), one seed. Models:
minilm = all-MiniLM-L6-v2 + 5-label head (AutoModelForSequenceClassification), batch 16 x 128 random ids/labels,
head trained in every variant (modules_to_save=["classifier"]), BERT's own dropout 0.1 left on; smollm2 =
SmolLM2-135M-Instruct (AutoModelForCausalLM), batch 4 x 256, labels = input_ids. Variants: lorakit and PEFT on
(q,v) [query,value | q_proj,v_proj] and on "all-linear", full fine-tuning, and a floor: the frozen model with
gradients only for the input embeddings, i.e. the activations every backward through all layers keeps, which
bounds what any LoRA implementation can save (its memory ratio is given against PEFT q,v).

1. Step = forward + backward + AdamW.step + zero_grad. Each (model, variant) runs in a FRESH process (forked by an
   intermediate /bin/sh, so ru_maxrss is not inherited): seed, load, page the weights in (transformers keeps fp32
   weights in a lazy private mmap of the checkpoint; unread, their first touch would count as training memory),
   current RSS (/proc/self/statm), reset of the RSS high-water mark (/proc/self/clear_refs "5"), inject,
   eval-mode loss (sanity), --warmup + --steps timed steps; step time = their median. Peak memory over load =
   ru_maxrss at the end (peak since the reset: load transients excluded) minus the RSS after loading, i.e. what
   injection + training add (grads, AdamW state, activations, allocator high water); VmHWM is a cross-check.
   Every round runs each process once in a fresh seeded shuffle; figures are medians over rounds, ratios medians
   of per-round ratios vs PEFT with the same targets.
2. Injection: all-linear r=8 on SmolLM2, lorakit.inject vs peft.get_peft_model on fresh deepcopies of one loaded
   model (copy untimed), interleaved (common.interleave); ratio = PEFT time / lorakit time.
Sanity: B = 0, so each LoRA variant's eval-mode step-0 loss must equal full FT's within 1e-4, or the script stops.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {"lk_qv": "lorakit q,v", "lk_all": "lorakit all-linear", "peft_qv": "PEFT q,v",
            "peft_all": "PEFT all-linear", "full": "full FT", "floor": "floor: frozen, grads to inputs"}
REF = {"lk_qv": "peft_qv", "lk_all": "peft_all"}
QV = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}
LABEL = {"minilm": "MiniLM seq-cls 16x128", "smollm2": "SmolLM2-135M causal LM 4x256"}
TARGETS = {"step": 0.9, "mem": 0.8, "inject": 5.0}
MB = 2 ** 20


def mem_mb() -> tuple[float, float, float]:
    """(current RSS from /proc/self/statm, peak RSS = ru_maxrss, VmHWM as a cross-check), in MB."""
    hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")]
    return (int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, int(hwm[0].split()[1]) / 1024)


def load(key: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorakit.builtin import minilm_path, smollm2_path
    transformers.utils.logging.disable_progress_bar()
    if key == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


def batch(key: str, seed: int) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    if key == "minilm":
        ids = torch.randint(1000, 30000, (16, 128), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                "labels": torch.randint(0, 5, (16,), generator=g)}
    ids = torch.randint(100, 49000, (4, 256), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "use_cache": False}


def adapt(model, key: str, variant: str):
    """Apply a variant in place (full FT: nothing) and return the model to train."""
    if variant == "full":
        return model
    if variant == "floor":  # nothing trainable; backward still runs through every layer, as LoRA's must
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
        return model
    targets = QV[key] if variant.endswith("qv") else "all-linear"
    save = ["classifier"] if key == "minilm" else []
    if variant.startswith("lk"):
        import lorakit
        return lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=targets, modules_to_save=save))
    import peft
    return peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=save or None,
        task_type="SEQ_CLS" if key == "minilm" else "CAUSAL_LM"))


def worker(args) -> None:
    """One (model, variant) in this fresh process; prints one RESULT line of JSON."""
    common.setup(args.threads)
    import torch
    key, variant = args.worker.split(":")
    torch.manual_seed(args.seed)  # the same head/pooler init in every variant
    t0 = time.perf_counter()
    model = load(key)
    with torch.no_grad():  # transformers maps the weights file lazily: page every weight in before measuring
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    out = dict(zip(("load_s", "rss_load_mb", "peak_load_mb"), (time.perf_counter() - t0, *mem_mb()[:2])))
    try:
        out["hwm_reset"] = bool(Path("/proc/self/clear_refs").write_text("5"))
    except OSError:
        out["hwm_reset"] = False  # then the peak may include load transients
    t0 = time.perf_counter()
    model = adapt(model, key, variant)
    out["inject_s"] = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    if variant.startswith("lk"):
        import lorakit
        assert lorakit.summary(model).trainable == out["trainable"]
    b = batch(key, args.seed)
    model.eval()
    with torch.no_grad():
        out["eval_loss"] = model(**b).loss.item()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times, losses, faults = [], [], []
    torch.manual_seed(args.seed + 1)  # the same dropout masks at step 0
    for i in range(args.warmup + args.steps):
        gc.collect()
        gc.disable()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        res = model(**b)
        res.loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = time.perf_counter() - t0
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        gc.enable()
        losses.append(res.loss.item())
        del res
        if i >= args.warmup:
            times.append(t)
            faults.append(f1 - f0)
    _, out["peak_mb"], out["vmhwm_mb"] = mem_mb()
    out.update(step_s=statistics.median(times), steps_s=times, faults=faults, losses=losses,
               threads=torch.get_num_threads())
    out["over_load_mb"] = out["peak_mb"] - out["rss_load_mb"]
    print("RESULT " + json.dumps(out), flush=True)


def spawn(args, key: str, variant: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{key}:{variant}", "--threads",
            str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    # sh forks the worker (the trailing "; exit" keeps it from exec'ing in place): ru_maxrss starts clean
    proc = subprocess.run(["/bin/sh", "-c", shlex.join(argv) + "; exit $?"], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"worker {key}:{variant} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def inject_bench(args, log) -> dict:
    import peft

    import lorakit
    base = load("smollm2")
    ours = lambda m: lorakit.inject(m, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear"))  # noqa: E731
    theirs = lambda m: peft.get_peft_model(m, peft.LoraConfig(  # noqa: E731
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    counts = [sum(p.numel() for p in f(copy.deepcopy(base)).parameters() if p.requires_grad) for f in (ours, theirs)]
    assert counts[0] == counts[1], f"trainable params differ: lorakit {counts[0]} vs PEFT {counts[1]}"
    prep = lambda: copy.deepcopy(base)  # noqa: E731
    times = common.interleave({"lorakit": (ours, prep), "PEFT": (theirs, prep)}, args.inject_rounds, 1,
                              seed=args.seed, log=log)
    r = common.ratio(times, "PEFT", "lorakit")
    return {"lorakit_ms": 1e3 * statistics.median(times["lorakit"]), "peft_ms": r["ms"], "peft_over_lorakit": r,
            "trainable": counts[0], "times": times}


def report(args, runs: dict, inj: dict | None) -> str:
    rounds = len(next(iter(runs.values())))
    lines = [f"Training step (fwd + bwd + AdamW.step + zero_grad), fp32, {args.threads} thread(s), {rounds} round(s) x "
             f"{args.steps} timed steps (+{args.warmup} warmup), each variant in a fresh process per round.",
             "Ratios: median [p25-p75] / ratio of minima, of per-round ratios vs PEFT with the same targets. "
             f"Targets: step <= {TARGETS['step']}x PEFT, peak memory over load <= {TARGETS['mem']}x PEFT (✓/✗ on "
             "the median). Peak memory over load = ru_maxrss since just after loading minus the RSS right after "
             "loading (MB = 2^20 bytes).", "",
             "| model | variant | trainable params | step ms (median) | step time / PEFT same targets "
             "| peak memory over load (MB) | memory / PEFT |", "|---|---|---|---|---|---|---|"]
    for key in args.models:
        step = {v: [r["step_s"] for r in runs[(key, v)]] for v in VARIANTS}
        mem = {v: [r["over_load_mb"] for r in runs[(key, v)]] for v in VARIANTS}
        for v, name in VARIANTS.items():
            st, mt = ("1 (ref)" if v.startswith("peft") else "—",) * 2
            if v == "floor":  # what any adapter library must keep for the backward (LoRA adds A, B, h, x)
                mt = f"{common.fmt(common.ratio(mem, v, 'peft_qv'))} of PEFT q,v"
            if v in REF:
                st, mt = (f"{common.fmt(r)} {'✓' if r['median'] <= TARGETS[k] else '✗'}"
                          for r, k in ((common.ratio(step, v, REF[v]), "step"), (common.ratio(mem, v, REF[v]), "mem")))
            lines.append(f"| {LABEL[key]} | {name} | {runs[(key, v)][0]['trainable']:,} | "
                         f"{1e3 * statistics.median(step[v]):.0f} | {st} | {statistics.median(mem[v]):.0f} | {mt} |")
    lines += ["", "Sanity, step-0 loss (same seed, weights, batch; B = 0): max |LoRA variant - full FT| over all rounds "
              "(asserted <= 1e-4 in eval mode; train mode, with the same dropout seed, for information):"]
    for key in args.models:
        diff = lambda f: max(abs(f(r) - f(q)) for v in REF.keys() | REF.values()  # noqa: E731
                             for r, q in zip(runs[(key, v)], runs[(key, "full")]))
        lines.append(f"- {key}: full FT loss {runs[(key, 'full')][0]['eval_loss']:.6f}; eval mode "
                     f"{diff(lambda r: r['eval_loss']):.1e}, train mode {diff(lambda r: r['losses'][0]):.1e}")
    if inj:
        r = inj["peft_over_lorakit"]
        lines += ["", f"Injection, SmolLM2 all-linear r=8 ({inj['trainable']:,} LoRA params), {args.inject_rounds} "
                  f"rounds: lorakit.inject {inj['lorakit_ms']:.1f} ms, peft.get_peft_model {inj['peft_ms']:.1f} ms; "
                  f"PEFT / lorakit = {common.fmt(r)} (target >= {TARGETS['inject']}x: "
                  f"{'✓' if r['median'] >= TARGETS['inject'] else '✗'})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every worker (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="training rounds (each: every variant once)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--models", nargs="+", choices=list(QV), default=list(QV))
    p.add_argument("--inject-rounds", type=int, default=10)
    p.add_argument("--skip-inject", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 steps, 1 warmup, 3 injection rounds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.inject_rounds = 1, 2, 1, 3
    log = lambda s: print(s, flush=True)  # noqa: E731
    jobs = [(k, v) for k in args.models for v in VARIANTS]
    runs: dict = {j: [] for j in jobs}
    rng = random.Random(args.seed)
    for rnd in range(args.rounds):
        rng.shuffle(jobs)
        for key, v in jobs:
            r = spawn(args, key, v)
            runs[(key, v)].append(r)
            log(f"  round {rnd + 1}/{args.rounds} {key:8s} {VARIANTS[v]:19s} step {1e3 * r['step_s']:7.0f} ms  "
                f"rss load {r['rss_load_mb']:5.0f} MB  peak over load {r['over_load_mb']:5.0f} MB (VmHWM "
                f"{r['vmhwm_mb'] - r['rss_load_mb']:5.0f})  faults/step {statistics.median(r['faults']):.0f}  "
                f"loss0 {r['eval_loss']:.6f} (train mode {r['losses'][0]:.6f})")
        for (key, v), rs in runs.items():  # the B = 0 check: every LoRA variant starts at full FT's loss
            d = abs(rs[-1]["eval_loss"] - runs[(key, "full")][-1]["eval_loss"])
            if not d <= 1e-4:
                sys.exit(f"{key} {VARIANTS[v]}: step-0 loss differs from full FT's by {d:.2e}")
    common.setup(args.threads)
    inj = None
    if not args.skip_inject:
        log("injection: SmolLM2 all-linear r=8")
        inj = inject_bench(args, log)
    md = report(args, runs, inj)
    log("\n" + md)
    data = {"machine": common.machine(), "config": vars(args), "inject": inj,
            "runs": {f"{k}:{v}": rs for (k, v), rs in runs.items()}}
    common.write(f"model_bench_t{args.threads}" + ("_quick" if args.quick else ""), data, md)


if __name__ == "__main__":
    main()
