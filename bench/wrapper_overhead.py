"""What lorakit's wrappers cost before any adapter runs: SmolLM2 decode steps (B rows, 1 token on a
KV cache of 128) of a plain model vs the same model with N all-linear r=8 adapters injected, run
with no adapter active (``set_active(model, [])``, once, outside the timing), and as a steady mixed
step (row i uses adapter i mod N, the routing kept open as during ``generate``), and that step with
the kernel's call replaced by nothing (what the routing costs besides the op); interleaved rounds
in one process, medians, 2 threads. (``lorakit.disabled`` and opening ``lorakit.mixed`` walk the
model's modules, a cost of their own, so neither is timed here.)

    python bench/wrapper_overhead.py 16 16      # N adapters, B rows
    python bench/wrapper_overhead.py 64 64 --rounds 12

Prints each variant's median step time and its ratio to the plain model (higher is better), then
what surrounds a step: the machine's read bandwidth (``x.sum()`` over 640 MB), the CPU time a new
routing's plans take (thread time of the first step minus a steady step, 1 thread), and the wall
time of opening ``lorakit.mixed`` (with and without base rows) and ``lorakit.disabled``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", type=int)
    p.add_argument("rows", type=int)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch
    from mixed_bench import _lorakit_only
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit import routing as routing_state
    from lorakit.batching import rowlora
    from lorakit.builtin import smollm2_path
    torch.set_num_threads(args.threads)
    n, B = args.adapters, args.rows
    model = _lorakit_only(n)
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    names = [f"a{i % n}" for i in range(B)]
    prompt = torch.randint(100, 20000, (B, 128), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pre = plain(input_ids=prompt, use_cache=True)
    cache0, tok = pre.past_key_values, pre.logits[:, -1].argmax(-1, keepdim=True)
    with torch.inference_mode(), lorakit.mixed(model, names):
        model(input_ids=tok, past_key_values=copy.deepcopy(cache0))
        routing = routing_state.ROUTING.get()  # kept with its plans: the steady state

    def steady(kw):
        token = routing_state.ROUTING.set(routing)
        try:
            model(**kw)
        finally:
            routing_state.ROUTING.reset(token)

    def without_op(kw):  # the same steady step with the kernel's call replaced by nothing: all but the op
        op = rowlora.add_rows_unchecked_
        rowlora.add_rows_unchecked_ = lambda *args, **kwargs: None
        try:
            steady(kw)
        finally:
            rowlora.add_rows_unchecked_ = op

    lorakit.set_active(model, [])  # no adapter: each wrapper runs its base layer (the routing ignores this)
    variants = {"plain": lambda kw: plain(**kw), "no adapter active": lambda kw: model(**kw), "steady mixed": steady,
                "steady mixed, no-op kernel": without_op}
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, fn in variants.items():
            kw = {"input_ids": tok, "past_key_values": copy.deepcopy(cache0), "use_cache": True}
            t = time.perf_counter()
            with torch.inference_mode():
                fn(kw)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    print(f"N={n} B={B}, {args.rounds} rounds: " +
          ", ".join(f"{v} {m:.1f} ms ({med['plain'] / m:.3f})" for v, m in med.items()))
    _surroundings(model, names, tok, args.threads)


def _surroundings(model, names: list, tok, threads: int) -> None:
    """Bandwidth, planning CPU time and the cost of opening blocks (medians)."""
    import torch

    import lorakit
    from lorakit import routing as routing_state

    def median_ms(fn, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3
    big = torch.randn(160_000_000)  # 640 MB
    read = median_ms(big.sum, 5)
    del big
    torch.set_num_threads(1)  # thread time sees all of a step's work only with one thread

    def cpu(fn):
        t = time.thread_time()
        fn()
        return time.thread_time() - t

    def first():
        with torch.inference_mode(), lorakit.mixed(model, names):
            model(input_ids=tok)
    with torch.inference_mode(), lorakit.mixed(model, names):
        model(input_ids=tok)
        routing = routing_state.ROUTING.get()

    def steady():
        token = routing_state.ROUTING.set(routing)
        try:
            with torch.inference_mode():
                model(input_ids=tok)
        finally:
            routing_state.ROUTING.reset(token)
    pairs = [(cpu(first), cpu(steady)) for _ in range(7)]
    planning = statistics.median(f for f, _ in pairs) - statistics.median(s for _, s in pairs)
    torch.set_num_threads(threads)

    def opened(rows):
        with lorakit.mixed(model, rows):
            pass

    def disabled():
        with lorakit.disabled(model):
            pass
    with_base = [None] + list(names[1:])
    print(f"read bandwidth {0.64 / read * 1e3:.1f} GB/s ({read:.1f} ms for 640 MB); a new routing's planning "
          f"{planning * 1e3:.1f} ms CPU (first step minus steady, no KV cache, 1 thread); opening lorakit.mixed "
          f"{median_ms(lambda: opened(names), 50):.2f} ms, with a base row {median_ms(lambda: opened(with_base), 50):.2f}"
          f" ms; lorakit.disabled {median_ms(disabled, 50):.2f} ms")


if __name__ == "__main__":
    main()
