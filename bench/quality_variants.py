"""LoRA variants at r=8 on all-MiniLM-L6-v2 + BBC News: accuracy (3 seeds), s/step and peak memory.

The protocol of ``bench/finetune_table.py`` (the built-in task of ``lorakit train``: fixed split
1777/227/221 from ``lorakit.builtin.bbc_split(seed=0)``, query+value adapters, classifier head
trained, batch 16, max_length 128, best-validation checkpoint), one row per variant:

    LoRA        init kaiming, s = α/r                       lr 1e-3
    rsLoRA      s = α/√r (``use_rslora``)                    lr 1e-3
    LoRA+       B's learning rate × 16 (``--lora-plus-ratio``) lr 5e-4 (PEFT: halve lr with LoRA+)
    PiSSA       A, B from W's top-8 SVD, W keeps the residual lr 1e-3
    OLoRA       A, B from W's QR, W keeps the residual        lr 1e-3
    DoRA        ``--dora``, once LoraConfig has ``use_dora`` (issue 14's DoRA part)

    python bench/quality_variants.py                       # 3 seeds, 3 epochs, each run in a subprocess
    python bench/quality_variants.py --epochs 1 --train-limit 320 --max-length 64   # shortened (the table says so)
    python bench/quality_variants.py --in-process --device cuda     # GPU: one process, peak = CUDA's

Writes ``bench/results/quality_variants.md`` and ``.json`` (``--tag`` adds a suffix).
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
CONFIGS = {  # name -> (label, LoraSpec kwargs, lr, lora_plus_ratio)
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
    from lorakit.train.tasks import LoraSpec, classify
    label, kw, lr, ratio = CONFIGS[spec["config"]]
    if "dora" in kw and "dora" not in LoraSpec.__dataclass_fields__:
        sys.exit("--dora: this lorakit has no DoRA yet (LoraSpec(dora=...) / LoraConfig(use_dora=...))")
    lora = LoraSpec(targets=("query", "value"), r=8, alpha=16.0, **kw)
    train = TrainConfig(epochs=spec["epochs"], batch_size=16, lr=lr, lora_plus_ratio=ratio, seed=spec["seed"])
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = classify(spec["out"], lora=lora, train=train, max_length=spec["max_length"], train_limit=spec["train_limit"],
                      progress=False, overwrite=True, device=spec["device"], log=lambda *a, **k: None)
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


def table(rows: dict, args, device_name: str) -> str:
    n_train = f"first {args.train_limit} of 1777" if args.train_limit else "all 1777"
    lines = [f"all-MiniLM-L6-v2 on BBC News (5 topics; test 221 articles), LoRA r=8 α=16 on query,value + "
             f"classifier head, {args.epochs:g} epoch(s) over {n_train} training articles, batch 16, "
             f"max_length {args.max_length}, seeds {' '.join(map(str, args.seeds))}, {device_name}.", "",
             "| variant | lr | test accuracy (%) | per seed | s/step | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        if not runs:
            continue
        acc = [100 * r["test_accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {CONFIGS[name][0]} | {CONFIGS[name][2]:g} | {statistics.mean(acc):.2f} ± {sd:.2f} | "
                     f"{' / '.join(f'{a:.1f}' for a in acc)} | "
                     f"{statistics.median(r['seconds_per_step'] for r in runs):.3f} | "
                     f"{max(r['peak_memory_mb'] for r in runs):.0f} |")
    if "dora" not in rows:
        lines.append("| DoRA | | (not run: `--dora` once lorakit has DoRA) | | | |")
    lines += ["", "Accuracy: mean ± sample std over seeds of the best-validation checkpoint (the protocol of "
              "`lorakit train`). s/step: median over seeds of training wall time (incl. one validation pass per "
              "epoch) / optimizer steps. Peak memory: " + ("CUDA's peak allocation of the run." if args.in_process
                                                           and args.device == "cuda" else
                                                           "the worker process's maximum RSS.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT)
    p.add_argument("--dora", action="store_true", help="add the DoRA row")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--train-limit", type=int, default=0, help="train on the first N articles (0: all)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per article")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads per run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--in-process", action="store_true", help="run every training in this process")
    p.add_argument("--work", default="runs/quality_variants", help="folder for the individual runs")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the table and JSON")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run(json.loads(args.worker))
        return
    configs = args.configs + (["dora"] if args.dora and "dora" not in args.configs else [])
    if args.device == "cuda":
        import torch
        device_name = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    else:
        device_name = f"CPU, {args.threads} threads per run (measured under load)"
    rows, t0 = {name: [] for name in configs}, time.perf_counter()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "quality_variants" + (f"_{args.tag}" if args.tag else "")
    for seed in args.seeds:  # seed-major: a complete table for the first seed comes first
        for name in configs:
            out = Path(args.work) / f"{name}_s{seed}"
            out.parent.mkdir(parents=True, exist_ok=True)
            spec = dict(config=name, seed=seed, epochs=args.epochs, train_limit=args.train_limit, max_length=args.max_length,
                        threads=args.threads, device=args.device, out=str(out))
            r = run(spec) if args.in_process else _subprocess(spec)
            rows[name].append(r)
            print(f"{CONFIGS[name][0]} seed {seed}: test accuracy {100 * r['test_accuracy']:.2f}%, "
                  f"{r['seconds_per_step']:.3f} s/step, peak {r['peak_memory_mb']:.0f} MB "
                  f"({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
            keep = ("config", "seed", "test_accuracy", "test_accuracy_before", "test_loss", "trainable_params",
                    "seconds_per_step", "steps", "peak_memory_mb", "train", "lora")
            raw = {"epochs": args.epochs, "train_limit": args.train_limit, "max_length": args.max_length, "seeds": args.seeds,
                   "device": device_name, "total_seconds": time.perf_counter() - t0,
                   "runs": [{k: x[k] for k in keep if k in x} for runs in rows.values() for x in runs]}
            (results / f"{stem}.json").write_text(json.dumps(raw, indent=2))  # after every run: partial results
            (results / f"{stem}.md").write_text(table(rows, args, device_name))
    print("\n" + table(rows, args, device_name))


if __name__ == "__main__":
    main()
