"""LoRA variants at r=8 on all-MiniLM-L6-v2 + BBC News (or SmolLM2): quality (3 seeds), s/step, peak memory.

``--task classify`` (the default) follows the protocol of ``bench/finetune_table.py`` (the built-in task of ``lorakit train``: fixed split
1777/227/221 from ``lorakit.builtin.bbc_split(seed=0)``, query+value adapters, classifier head
trained, batch 16, max_length 128, best-validation checkpoint), one row per variant:

    LoRA        init kaiming, s = α/r                       lr 1e-3
    rsLoRA      s = α/√r (``use_rslora``)                    lr 1e-3
    LoRA+       B's learning rate × 16 (``--lora-plus-ratio``) lr 5e-4 (PEFT: halve lr with LoRA+)
    PiSSA       A, B from W's top-8 SVD, W keeps the residual lr 1e-3
    OLoRA       A, B from W's QR, W keeps the residual        lr 1e-3
    DoRA        ``--dora`` (LoraConfig's ``use_dora``)

``--task causal-lm`` trains the same rows on the causal-LM task of ``lorakit train --task causal-lm``
(SmolLM2-135M-Instruct, BBC headline -> topic word, all-linear adapters, batch 8, its defaults:
1 epoch over the first 600 headlines, max_length 96, exact match of greedy answers on the first 50
test headlines, the best-validation checkpoint); the metric is test exact match, before and after.

    python bench/quality_variants.py                       # 3 seeds, 3 epochs, each run in a subprocess
    python bench/quality_variants.py --epochs 1 --train-limit 320 --max-length 64   # shortened (the table says so)
    python bench/quality_variants.py --in-process --device cuda     # GPU: one process, peak = CUDA's
    python bench/quality_variants.py --task causal-lm --dora --threads 1 --train-limit 240 --eval-limit 100

Writes ``bench/results/quality_variants.md`` and ``.json``, ``quality_variants_causal.*`` for the
causal LM (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# per task: default epochs, train limit (0: all), max_length, targets, batch size, metric of the result
TASKS = {"classify": dict(epochs=3, train_limit=0, max_length=128, targets=("query", "value"), batch=16,
                          metric="test_accuracy"),
         "causal-lm": dict(epochs=1, train_limit=600, max_length=96, targets=("all-linear",), batch=8,
                           metric="test_exact_match")}
CONFIGS = {  # name -> (label, LoraSpec kwargs, lr, lora_plus_ratio); 1e-3 is both tasks' default lr
    "lora": ("LoRA", dict(), 1e-3, 1.0),
    "rslora": ("rsLoRA", dict(rslora=True), 1e-3, 1.0),
    "loraplus": ("LoRA+ (ratio 16)", dict(), 5e-4, 16.0),
    "pissa": ("PiSSA", dict(init="pissa"), 1e-3, 1.0),
    "olora": ("OLoRA", dict(init="olora"), 1e-3, 1.0),
    "dora": ("DoRA", dict(dora=True), 1e-3, 1.0),
}
DEFAULT = ["lora", "rslora", "loraplus", "pissa", "olora"]


def run(spec: dict) -> dict:
    """One training in this process; returns its summary (also written to spec['out']/summary.json)."""
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from lorakit.train.loop import TrainConfig
    from lorakit.train.tasks import LoraSpec, causal_lm, classify
    task = TASKS[spec["task"]]
    label, kw, lr, ratio = CONFIGS[spec["config"]]
    lora = LoraSpec(targets=task["targets"], r=8, alpha=16.0, **kw)
    train = TrainConfig(epochs=spec["epochs"], batch_size=task["batch"], lr=lr, lora_plus_ratio=ratio,
                        seed=spec["seed"])
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common = dict(lora=lora, train=train, max_length=spec["max_length"], train_limit=spec["train_limit"],
                  progress=False, overwrite=True, device=spec["device"], log=lambda *a, **k: None)
    if spec["task"] == "causal-lm":
        result = causal_lm(spec["out"], eval_limit=spec["eval_limit"], **common)
    else:
        result = classify(spec["out"], **common)
    result["config"], result["seed"] = spec["config"], spec["seed"]
    Path(spec["out"], "summary.json").write_text(json.dumps(result, indent=2))
    return result


def _subprocess(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = Path(spec["out"]).with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{spec['config']} seed {spec['seed']} failed (exit {proc.returncode}); see {log}:\n"
                 + log.read_text()[-2000:])
    return json.loads(Path(spec["out"], "summary.json").read_text())


def _protocol(args, device_name: str, first: dict) -> str:
    """The table's first line: what was trained and evaluated (``first``: one run's summary)."""
    seeds = " ".join(map(str, args.seeds))
    if args.task == "causal-lm":
        n_train = f"the first {first['train_examples']} of 1777" if args.train_limit else "all 1777"
        return (f"SmolLM2-135M-Instruct, BBC headline -> topic word (5 topics), LoRA r=8 α=16 on all linear "
                f"layers, {args.epochs:g} epoch(s) over {n_train} training headlines, batch 8, max_length "
                f"{args.max_length}, validation loss and test exact match on the first {first['test_examples']} "
                f"validation / test headlines, seeds {seeds}, {device_name}.")
    n_train = f"first {args.train_limit} of 1777" if args.train_limit else "all 1777"
    return (f"all-MiniLM-L6-v2 on BBC News (5 topics; test 221 articles), LoRA r=8 α=16 on query,value + "
            f"classifier head, {args.epochs:g} epoch(s) over {n_train} training articles, batch 16, "
            f"max_length {args.max_length}, seeds {seeds}, {device_name}.")


def table(rows: dict, args, device_name: str) -> str:
    """The Markdown table of the runs so far: one row per variant, the quality metric over seeds."""
    metric = TASKS[args.task]["metric"]
    name = "test exact match" if args.task == "causal-lm" else "test accuracy"
    first = next(runs[0] for runs in rows.values() if runs)
    lines = [_protocol(args, device_name, first), "",
             f"| variant | lr | {name} (%) | per seed | before training (%) | s/step | peak memory (MB) | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    for config, runs in rows.items():
        if not runs:
            continue
        after = [100 * r[metric] for r in runs]
        before = sorted({round(100 * r[metric + "_before"], 1) for r in runs})
        sd = statistics.stdev(after) if len(after) > 1 else 0.0
        lines.append(f"| {CONFIGS[config][0]} | {CONFIGS[config][2]:g} | {statistics.mean(after):.2f} ± {sd:.2f} | "
                     f"{' / '.join(f'{a:.1f}' for a in after)} | {' / '.join(f'{b:.1f}' for b in before)} | "
                     f"{statistics.median(r['seconds_per_step'] for r in runs):.3f} | "
                     f"{max(r['peak_memory_mb'] for r in runs):.0f} | {runs[0]['trainable_params']:,} |")
    what = ("Exact match: share of test headlines whose greedy answer's first word is the topic (case and "
            "punctuation ignored), of the best-validation-loss checkpoint" if args.task == "causal-lm" else
            "Accuracy: of the best-validation checkpoint (the protocol of `lorakit train`)")
    lines += ["", f"{what}; mean ± sample std over seeds. Before training: the same metric before the adapter "
              "trains (each distinct value over seeds). s/step: median over seeds of training wall time (incl. one "
              "validation pass per epoch) / optimizer steps. Peak memory: "
              + ("CUDA's peak allocation of the run." if args.in_process and args.device == "cuda" else
                 "the worker process's maximum RSS.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="classify",
                   help="MiniLM sequence classification, or the SmolLM2 causal-LM task of lorakit train")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT)
    p.add_argument("--dora", action="store_true", help="add the DoRA row")
    p.add_argument("--epochs", type=float, default=None, help="default: 3 classify, 1 causal-lm")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on the first N examples (0: all; default: all classify, 600 causal-lm)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: 128 classify, "
                   "96 causal-lm)")
    p.add_argument("--eval-limit", type=int, default=50,
                   help="causal-lm: exact match on the first N test prompts, validation on the first N (0: all)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads per run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--in-process", action="store_true", help="run every training in this process")
    p.add_argument("--work", default=None, help="folder for the individual runs (default: runs/<result stem>)")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the table and JSON")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run(json.loads(args.worker))
        return
    for key in ("epochs", "train_limit", "max_length"):
        if getattr(args, key) is None:
            setattr(args, key, TASKS[args.task][key])
    configs = args.configs + (["dora"] if args.dora and "dora" not in args.configs else [])
    if args.device == "cuda":
        import torch
        device_name = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    else:
        device_name = f"CPU, {args.threads} thread(s) per run (measured under load)"
    rows, t0 = {name: [] for name in configs}, time.perf_counter()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "quality_variants" + ("_causal" if args.task == "causal-lm" else "") + (f"_{args.tag}" if args.tag else "")
    metric = TASKS[args.task]["metric"]
    for seed in args.seeds:  # seed-major: a complete table for the first seed comes first
        for name in configs:
            out = Path(args.work or Path("runs") / stem) / f"{name}_s{seed}"
            out.parent.mkdir(parents=True, exist_ok=True)
            spec = dict(task=args.task, config=name, seed=seed, epochs=args.epochs, train_limit=args.train_limit,
                        max_length=args.max_length, eval_limit=args.eval_limit, threads=args.threads,
                        device=args.device, out=str(out))
            r = run(spec) if args.in_process else _subprocess(spec)
            rows[name].append(r)
            print(f"{CONFIGS[name][0]} seed {seed}: {metric} {100 * r[metric + '_before']:.2f}% -> "
                  f"{100 * r[metric]:.2f}%, {r['seconds_per_step']:.3f} s/step, peak {r['peak_memory_mb']:.0f} MB "
                  f"({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
            keep = ("config", "seed", metric, metric + "_before", "test_loss", "val_loss", "val_loss_before",
                    "trainable_params", "train_examples", "test_examples", "seconds_per_step", "train_seconds",
                    "steps", "peak_memory_mb", "train", "lora")
            raw = {"task": args.task, "epochs": args.epochs, "train_limit": args.train_limit,
                   "max_length": args.max_length, "eval_limit": args.eval_limit if args.task == "causal-lm" else None,
                   "seeds": args.seeds, "device": device_name, "total_seconds": time.perf_counter() - t0,
                   "runs": [{k: x[k] for k in keep if k in x} for runs in rows.values() for x in runs]}
            (results / f"{stem}.json").write_text(json.dumps(raw, indent=2))  # after every run: partial results
            (results / f"{stem}.md").write_text(table(rows, args, device_name))
    print("\n" + table(rows, args, device_name))


if __name__ == "__main__":
    main()
