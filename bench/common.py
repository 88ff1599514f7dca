"""Timing helpers for lorakit's benchmarks: variants interleaved per round in a freshly shuffled
order, gc off, medians of per-round ratios (robust to the slow load drifts of a shared machine)."""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def setup(threads: int | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def interleave(variants: dict[str, tuple[Callable, Callable | None]], rounds: int, warmup: int,
               seed: int = 0, log=print) -> dict[str, list[float]]:
    """Time each ``(run, prepare)`` variant once per round, in a shuffled order; ``prepare()``
    (untimed) makes the argument of ``run``. Returns seconds per round per variant and the
    minor page faults per call (key ``name + ':faults'``)."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[int]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(warmup + rounds):
        rng.shuffle(names)
        for name in names:
            run, prepare = variants[name]
            arg = prepare() if prepare else None
            gc.collect()
            gc.disable()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            out = run(arg)
            t = time.perf_counter() - t0
            f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            gc.enable()
            del out, arg
            if i >= warmup:
                times[name].append(t)
                faults[name].append(f1 - f0)
        if i >= warmup and (i - warmup) % 5 == 4:
            log(f"  round {i - warmup + 1}/{rounds}")
    return {**times, **{f"{n}:faults": v for n, v in faults.items()}}


def ratio(times: dict[str, list[float]], name: str, base: str) -> dict:
    """Median (p25-p75) of per-round ratios ``name/base``, and the ratio of minimum times."""
    per = sorted(a / b for a, b in zip(times[name], times[base]))
    q = statistics.quantiles(per, n=4) if len(per) > 1 else [per[0]] * 3
    return {"median": statistics.median(per), "p25": q[0], "p75": q[2],
            "min_ratio": min(times[name]) / min(times[base]), "ms": 1e3 * statistics.median(times[name])}


def fmt(r: dict) -> str:
    return f"{r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}] / {r['min_ratio']:.3f}"


def machine() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown)
