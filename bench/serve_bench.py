"""Serving many adapters: lorakit's batching server vs one request at a time vs a merged adapter
swapped per request.

    python bench/serve_bench.py              # 32 requests over 8 adapters, 16 tokens each (~5 min, 2 cores)
    python bench/serve_bench.py --quick      # 16 requests, 8 tokens: a smoke run

SmolLM2-135M fp32, 8 random all-linear r=8 adapters, greedy. All requests arrive at once
(one client thread per request) and asks for ``--max-tokens`` tokens; EOS may end one early,
so token counts come from the responses' usage.

* **batched**: ``lorakit serve`` (a subprocess on 127.0.0.1, HTTP + SSE streaming), continuous
  batching across adapters (``--max-batch 32``).
* **one at a time**: the same server with ``--max-batch 1``: requests queue and run alone.
* **merged swap**: in-process, no HTTP (which favours it): per request ``set_active`` ->
  ``merge`` -> ``generate`` -> ``unmerge``, requests served in arrival order.

Time to first token (TTFT) is measured from the moment every request has been sent (client
side for the servers, arrival = start of the run for the merged variant), so it includes queueing.
Also measured: one batched decode step (32 rows, 8 adapters) with the routing kept open vs
re-gathering the adapters' factors each step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite food is",
           "The sky is blue because", "Water boils at", "In 1492, Columbus", "The best way to learn is"]


def make_adapters(root: Path, n: int) -> None:
    import torch

    import lorakit
    from lorakit.train.tasks import load_model
    model, _ = load_model("builtin:smollm2", "causal-lm")
    for i in range(n):
        torch.manual_seed(i)
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear"), adapter=f"a{i}")
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                if f"a{i}" in layer.lora_B:
                    layer.lora_B[f"a{i}"].normal_(0, 0.05)
        lorakit.save(model, root / f"a{i}", adapter=f"a{i}")


def plan(requests: int, adapters: int) -> list[tuple[str, str]]:
    return [(f"a{i % adapters}", PROMPTS[(i // adapters) % len(PROMPTS)] + f" ({i})") for i in range(requests)]


def server(root: Path, max_batch: int, threads: int, extra: tuple[str, ...] = ()):
    """``lorakit serve`` over the adapters in ``root`` (a subprocess on a free port; ``extra``: more
    options); returns ``(process, url)`` once /health answers."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--adapters", str(root), "--port",
                             str(port), "--threads", str(threads), "--max-batch", str(max_batch),
                             "--log-level", "warning", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError("the server did not start")
        time.sleep(0.2)
    raise RuntimeError("the server did not start in 120 s")


def http_run(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    """All jobs at once, streaming; per request TTFT, latency, tokens and text."""
    import httpx
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=len(jobs)))
    start = [0.0]

    def one(job):
        model, prompt = job
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        ttft, text, tokens = None, "", 0
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    ttft = ttft or time.perf_counter() - start[0]
                    text += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return ttft, time.perf_counter() - start[0], tokens, text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        start[0] = time.perf_counter()
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start[0]
    client.close()
    return summarize(results, wall)


def merged_run(model, tok, jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    import lorakit

    class First(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.at is None:  # call 1 is the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    results, start = [], time.perf_counter()
    with torch.no_grad():
        for model_name, prompt in jobs:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            first = First()
            lorakit.set_active(model, model_name)
            lorakit.merge(model)
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 streamer=first)
            lorakit.unmerge(model)
            new = out[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
            results.append((first.at - start, time.perf_counter() - start, len(new),
                            tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)))
    return summarize(results, time.perf_counter() - start)


def summarize(results: list[tuple], wall: float) -> dict:
    ttft = sorted(r[0] for r in results)
    q = statistics.quantiles(ttft, n=20)
    tokens = sum(r[2] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": q[18], "latency_p50_s": statistics.median(r[1] for r in results),
            "texts": [r[3] for r in results]}


def routing_cost(model, tok, rows: int, adapters: int, steps: int = 5) -> dict:
    """One decode step of ``rows`` rows: routing kept open vs a new lorakit.mixed per step."""
    import torch
    from transformers import DynamicCache

    import lorakit
    from lorakit.serve.decode_batch import Batch, cache_tensors
    names = [f"a{i % adapters}" for i in range(rows)]
    batch = Batch(model.config)
    with torch.no_grad():
        for i, name in enumerate(names):
            ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt")["input_ids"]
            with lorakit.mixed(model, [name]):
                out = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
            batch.add(cache_tensors(out.cache), torch.ones(1, ids.shape[1], dtype=torch.long))
        tokens = torch.full((rows,), 5)
        times = {"kept open": [], "re-gathered": []}
        for _ in range(steps):
            saved = (batch.kv, batch.mask, batch.positions)
            with lorakit.mixed(model, names):
                batch.step(model, tokens)  # warm the gathered factors
                batch.kv, batch.mask, batch.positions = saved
                t0 = time.perf_counter()
                batch.step(model, tokens)
                times["kept open"].append(time.perf_counter() - t0)
            batch.kv, batch.mask, batch.positions = saved
            t0 = time.perf_counter()
            with lorakit.mixed(model, names):
                batch.step(model, tokens)
            times["re-gathered"].append(time.perf_counter() - t0)
            batch.kv, batch.mask, batch.positions = saved
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (server and in-process)")
    p.add_argument("--quick", action="store_true", help="16 requests, 8 tokens")
    args = p.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 16, 8
    common.setup(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    jobs = plan(args.requests, args.adapters)
    results = {"machine": common.machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_adapters(root, args.adapters)
        for label, max_batch in (("batched", 32), ("one at a time", 1)):
            log(f"{label}: lorakit serve --max-batch {max_batch}")
            proc, url = server(root, max_batch, args.threads)
            try:
                http_run(url, jobs[:2], 2)  # warm-up
                results[label] = http_run(url, jobs, args.max_tokens)
            finally:
                proc.terminate()
                proc.wait(30)
            log(f"  {results[label]['tokens_per_s']:.1f} tokens/s")
        log("merged swap (in-process)")
        from lorakit import load
        from lorakit.train.tasks import load_model
        model, tok = load_model("builtin:smollm2", "causal-lm")
        for i in range(args.adapters):
            load(model, root / f"a{i}", adapter=f"a{i}")
        model.eval()
        merged_run(model, tok, jobs[:2], 2)  # warm-up
        results["merged swap"] = merged_run(model, tok, jobs, args.max_tokens)
        log(f"  {results['merged swap']['tokens_per_s']:.1f} tokens/s")
        results["routing_ms"] = routing_cost(model, tok, args.requests, args.adapters)
    base = results["one at a time"]["texts"]
    rows = ["| variant | tokens/s | speed-up | wall s | TTFT p50 s | TTFT p95 s | outputs = one at a time |",
            "|---|---|---|---|---|---|---|"]
    for label in ("batched", "one at a time", "merged swap"):
        r = results[label]
        same = sum(a == b for a, b in zip(r["texts"], base))
        speedup = r["tokens_per_s"] / results["one at a time"]["tokens_per_s"]
        rows.append(f"| {label} | {r['tokens_per_s']:.1f} | {speedup:.2f}x "
                    f"| {r['wall_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {same}/{len(base)} |")
    rt = results["routing_ms"]
    md = (f"{args.requests} concurrent requests over {args.adapters} adapters (SmolLM2-135M fp32, all-linear r=8), "
          f"{args.max_tokens} new tokens each, greedy, {args.threads} torch thread(s), one run "
          f"(load average {results['machine']['loadavg'][0]:.1f} at start).\n\n" + "\n".join(rows) +
          f"\n\nOne decode step, {args.requests} rows over {args.adapters} adapters: {rt['kept open']:.0f} ms with "
          f"the routing kept open, {rt['re-gathered']:.0f} ms when factors are re-gathered each step.\n")
    log(md)
    for label in ("batched", "one at a time", "merged swap"):
        results[label].pop("texts")
    common.write("serve_bench" + ("_quick" if args.quick else ""), results, md)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
