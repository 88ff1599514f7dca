"""Serving under traffic: requests arrive as a Poisson process; lorakit's continuous batching vs one
request at a time vs a merged adapter swapped per request.

    python bench/serve_traffic.py            # N = 8 and 64, rates 0.25-4/s, 25 s traces (~15 min, 2 cores)
    python bench/serve_traffic.py --quick    # N = 8, rates 1 and 3, 8 s traces: a smoke run (< 2 min)

SmolLM2-135M fp32, N random all-linear r=8 adapters (seeded, saved once), greedy, ``--threads``
torch threads for the server (and the in-process baseline). One fixed, seeded trace per (rate, N):
exponential gaps at ``rate`` requests/s for ``--duration`` seconds (at most ``--max-requests``; the
same requests at every rate, only closer together), the adapter uniform over the N, a prompt of
8-200 tokens (log-uniform; a slice of a fixed text, sent as token ids) and ``max_tokens`` uniform in
4-48 (EOS may end one earlier). The same trace is replayed against each variant:

* **batched**: ``lorakit serve --max-batch 32`` (a subprocess on 127.0.0.1), continuous batching;
* **one at a time**: the same server with ``--max-batch 1``;
* **merged swap**: in-process, no HTTP (which favours it): a FIFO served one request at a time,
  each ``set_active`` -> ``merge`` -> ``generate`` -> ``unmerge``; a request starts no earlier
  than its arrival, and its TTFT includes its merge.

Clients: one thread per request, started at its arrival time, streaming (SSE, stdlib http.client).
TTFT = first token (first streamed chunk) - scheduled arrival; TPOT = (last token - first token) /
(tokens - 1); E2E = last token - arrival. Tokens/s = output tokens of completed requests / makespan
(first arrival to the last completion, or to the cut-off). Cut-off: ``--grace`` seconds after the
last arrival every request still running is abandoned (its connection closed, which cancels it in
the server) and counted as unfinished; a percentile that falls on an unfinished request is shown as
"cut". Variants run in a rotated order per rate and round; with ``--rounds`` > 1 the table shows
medians over rounds. Before timing, the first ``--check`` requests of a trace go to all three
variants (concurrently to the batched server, so they share batches): their greedy texts are compared.

Run it on a quiet machine. With 2 torch threads on 2 cores, another busy process stalls every
multi-row matmul at its thread barrier (seen here while another job ran: a 576->1536 linear took a
median 8 ms on 2 rows, 0.08 ms on 1 row), which slows the batched server far more than the others;
the .md records the load average and the cores other jobs kept busy just before the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from serve_bench import make_adapters, server  # noqa: E402

VARIANTS = ("batched", "one at a time", "merged swap")
METRICS = ("ttft", "tpot", "e2e")
QUANTILES = (50, 95, 99)
TEXT = ("The river rises in the hills to the north, where rain falls on most days of the year and the "
        "streams run fast over grey stone. By the time it reaches the town it is wide and slow, and boats "
        "carry timber, grain and wool down to the sea. The old bridge has seven arches; the newest was "
        "rebuilt after the flood, when the water stood a metre deep in the market square for three days. "
        "People still talk about that spring: the bakers kept their ovens going on the upper floors, the "
        "school moved into the church, and the ferryman made more money in a week than in the year before. "
        "Engineers later raised the embankments, dug a second channel through the meadows and built sluices "
        "that can be opened when the gauge at the mill passes a painted line. Since then the meadows have "
        "flooded several times, as they were meant to, and the town has stayed dry. In summer the channel is "
        "almost empty and children catch small fish in the pools; in winter herons stand along its banks. ")


@dataclasses.dataclass(frozen=True)
class Job:
    arrival: float       # seconds after the start of the trace
    adapter: str
    prompt: list[int]
    max_tokens: int


@dataclasses.dataclass
class Outcome:
    first: float | None = None   # seconds after the start of the trace
    last: float | None = None
    tokens: int = 0
    text: str = ""
    done: bool = False           # finished normally (not cut off, no error)
    error: str | None = None


def make_trace(rate: float, n: int, duration: float, cap: int, seed: int, ids: list[int]) -> list[Job]:
    """Poisson arrivals at ``rate``/s over ``duration`` s (at most ``cap``). One seeded sequence per
    (seed, n) of unit-rate gaps and request shapes, the gaps divided by ``rate``: every rate replays
    the same requests in the same order, only closer together (a unit Poisson process scaled in time)."""
    rng = random.Random(f"{seed}:{n}")
    jobs, t = [], 0.0
    while len(jobs) < cap:
        t += rng.expovariate(1.0)
        length = round(math.exp(rng.uniform(math.log(8), math.log(200))))
        start = rng.randrange(len(ids) - length)
        job = Job(t / rate, f"a{rng.randrange(n)}", ids[start:start + length], rng.randint(4, 48))
        if job.arrival > duration:
            break
        jobs.append(job)
    return jobs


# -- the HTTP variants ------------------------------------------------------------------------------
def replay_http(port: int, jobs: list[Job], grace: float) -> list[Outcome]:
    """Each job streamed by its own thread from its arrival time; connections still open ``grace``
    seconds after the last arrival are closed (the server then cancels those requests)."""
    outcomes = [Outcome() for _ in jobs]
    socks: list[socket.socket | None] = [None] * len(jobs)
    lock, cut = threading.Lock(), threading.Event()
    t0 = time.perf_counter()

    def one(i: int) -> None:
        job, out = jobs[i], outcomes[i]
        body = json.dumps({"model": job.adapter, "prompt": job.prompt, "max_tokens": job.max_tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
        conn = HTTPConnection("127.0.0.1", port)
        try:
            conn.connect()
            with lock:
                if cut.is_set():
                    raise ConnectionAbortedError("cut off")
                socks[i] = conn.sock
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                out.error = f"HTTP {resp.status}"
                return
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk, now = json.loads(line[6:]), time.perf_counter() - t0
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    return
                if chunk.get("choices"):
                    choice = chunk["choices"][0]
                    out.first = now if out.first is None else out.first
                    out.text += choice["text"]
                    if choice.get("finish_reason"):
                        out.last = now
                if chunk.get("usage"):
                    out.tokens, out.done = chunk["usage"]["completion_tokens"], out.last is not None
        except (OSError, ValueError) as e:
            out.error = out.error or ("cut off" if cut.is_set() else f"client: {type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = []
    for i, job in enumerate(jobs):
        time.sleep(max(0.0, job.arrival - (time.perf_counter() - t0)))
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    deadline = t0 + jobs[-1].arrival + grace
    for th in threads:
        th.join(max(0.0, deadline - time.perf_counter()))
    with lock:
        cut.set()
        for i, th in enumerate(threads):
            if th.is_alive() and socks[i] is not None:
                try:
                    socks[i].shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    for i, th in enumerate(threads):
        th.join(10)
        if th.is_alive() or not outcomes[i].done:
            outcomes[i].done = False
            outcomes[i].error = outcomes[i].error or "cut off"
    return outcomes


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {name with labels: value}."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def wait_idle(url: str, limit: float = 120.0) -> bool:
    """Wait until the server has no queued or running request (cancelled ones drain); False if not in time."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        m = scrape(url)
        if not m["lorakit_queue_depth"] and not m["lorakit_active_requests"]:
            return True
        time.sleep(0.2)
    return False


def server_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """The server's own count and mean of TTFT (from its arrival) and tokens generated over a run."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    ttft = "lorakit_time_to_first_token_seconds"
    return {"first_tokens": d[f"{ttft}_count"], "ttft_mean_s": d[f"{ttft}_sum"] / max(1.0, d[f"{ttft}_count"]),
            "tokens": d["lorakit_generation_tokens_total"]}


# -- the merged-swap baseline -----------------------------------------------------------------------
def replay_merged(model, tok, jobs: list[Job], grace: float) -> list[Outcome]:
    """FIFO one at a time, in-process: per job set_active -> merge -> generate -> unmerge, never
    before the job's arrival; nothing starts, and a running generation stops, at the cut-off."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    import lorakit
    t0 = time.perf_counter()
    deadline = jobs[-1].arrival + grace

    class Clock(BaseStreamer, StoppingCriteria):
        def __init__(self, out: Outcome):
            self.out, self.calls = out, 0

        def put(self, value):  # call 1: the prompt; then one call per new token
            self.calls += 1
            if self.calls > 1:
                now = time.perf_counter() - t0
                self.out.first = now if self.out.first is None else self.out.first
                self.out.last = now

        def end(self):
            pass

        def __call__(self, input_ids, scores, **kwargs):  # stop at the cut-off
            return torch.full((input_ids.shape[0],), time.perf_counter() - t0 > deadline, dtype=torch.bool)

    outcomes = [Outcome() for _ in jobs]
    with torch.no_grad():
        for job, out in zip(jobs, outcomes):
            now = time.perf_counter() - t0
            if now > deadline:
                out.error = "cut off"
                continue
            time.sleep(max(0.0, job.arrival - now))
            ids = torch.tensor([job.prompt])
            clock = Clock(out)
            lorakit.set_active(model, job.adapter)
            lorakit.merge(model)
            try:
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id, streamer=clock,
                                     stopping_criteria=StoppingCriteriaList([clock]))
            finally:
                lorakit.unmerge(model)
            new = gen[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
            out.tokens = len(new)
            out.text = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            out.done = len(new) == job.max_tokens or tok.eos_token_id in new  # else the cut-off stopped it
            out.error = None if out.done else "cut off"
    return outcomes


# -- metrics ----------------------------------------------------------------------------------------
def pct(values: list[float], q: int) -> float:
    """Nearest-rank percentile (inf = an unfinished request)."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summarize(jobs: list[Job], outs: list[Outcome], grace: float) -> dict:
    inf = math.inf
    done = [(j, o) for j, o in zip(jobs, outs) if o.done]
    cut = len(done) < len(jobs)
    end = jobs[-1].arrival + grace if cut else max(o.last for _, o in done)
    tokens = sum(o.tokens for _, o in done)
    series = {"ttft": [o.first - j.arrival if o.first is not None else inf for j, o in zip(jobs, outs)],
              "tpot": [(o.last - o.first) / (o.tokens - 1) for _, o in done if o.tokens > 1],
              "e2e": [o.last - j.arrival if o.done else inf for j, o in zip(jobs, outs)]}
    errors = sorted({o.error for o in outs if o.error})
    firsts = [t for t in series["ttft"] if t != inf]
    return {"requests": len(jobs), "completed": len(done), "tokens": tokens, "first_tokens": len(firsts),
            "ttft_mean_s": statistics.fmean(firsts) if firsts else math.nan,
            "makespan_s": end - jobs[0].arrival, "tokens_per_s": tokens / (end - jobs[0].arrival),
            **{f"{m}_p{q}_s": pct(v, q) for m, v in series.items() for q in QUANTILES}, "errors": errors}


def median_rounds(rounds: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in rounds) for k, v in rounds[0].items() if isinstance(v, (int, float))}
    out["errors"] = sorted({e for r in rounds for e in r["errors"]})
    out["rounds"] = len(rounds)
    return out


def finite(x):
    """``x`` with every infinite number (an unfinished request's percentile) as None, for JSON."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def cpu_busy(seconds: float = 2.0) -> float:
    """Cores busy on the machine over ``seconds`` (from /proc/stat), measured while this script is idle."""
    def sample():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(f) - f[3] - f[4], sum(f)
    (b0, t0), _ = sample(), time.sleep(seconds)
    b1, t1 = sample()
    return os.cpu_count() * (b1 - b0) / max(1, t1 - t0)


# -- report -----------------------------------------------------------------------------------------
def cell(v: float) -> str:
    return "cut" if v == math.inf else "-" if math.isnan(v) else f"{v:.3f}" if v < 1 else f"{v:.2f}"


def markdown(results: dict, args) -> str:
    m = results["machine"]
    head = ("| N | rate req/s | variant | completed | tokens/s | TTFT p50 / p95 / p99 s | TPOT p50 / p95 / p99 s "
            "| E2E p50 / p95 / p99 s |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for run in results["runs"]:
        r = run["median"]
        trio = lambda k: " / ".join(cell(r[f"{k}_p{q}_s"]) for q in QUANTILES)  # noqa: E731
        other = [e for e in r["errors"] if e != "cut off"]
        rows.append(f"| {run['n']} | {run['rate']:g} | {run['variant']} | {r['completed']:.0f}/{r['requests']:.0f}"
                    f"{' (errors: ' + '; '.join(other) + ')' if other else ''} "
                    f"| {r['tokens_per_s']:.1f} | {trio('ttft')} | {trio('tpot')} | {trio('e2e')} |")
    checks = "; ".join(f"N={c['n']}: batched = one at a time {c['batched']}/{c['requests']}, merged swap = one at "
                       f"a time {c['merged swap']}/{c['requests']}" for c in results["checks"])
    http = [r for run in results["runs"] for r in run["rounds"] if "server" in r]
    same = sum(r["first_tokens"] == r["server"]["first_tokens"] for r in http)
    gap = statistics.median(1e3 * (r["ttft_mean_s"] - r["server"]["ttft_mean_s"]) for r in http
                            if r["first_tokens"]) if http else math.nan
    cross = (f"Cross-check against the servers' own /metrics (TTFT from the request's arrival in the server): the "
             f"number of first tokens agrees with the client's in {same}/{len(http)} HTTP runs, and the client's "
             f"mean TTFT exceeds the server's by a median {gap:.0f} ms (HTTP, JSON and client-thread overhead; a count "
             "can differ when a first token is made just as the cut-off closes its connection).")
    return (f"Poisson traffic over N adapters (SmolLM2-135M fp32, all-linear r=8, greedy, {args.threads} torch "
            f"threads, `--max-batch {args.max_batch}` for the batched server): {args.duration:g} s of arrivals per "
            f"trace (at most {args.max_requests} requests), prompts 8-200 tokens, max_tokens 4-48, cut-off "
            f"{args.grace:g} s after the last arrival; {args.rounds} round(s), medians over rounds. "
            f"Command: `{results['command']}`; {results['wall_s'] / 60:.1f} min. Started {m['date']}, load average "
            f"{m['loadavg'][0]:.2f} / {m['loadavg'][1]:.2f} / {m['loadavg'][2]:.2f}, "
            f"{results['other_cores_busy']:.2f} cores busy with other jobs before the run"
            f"{' (other jobs were running: figures under load)' if results['other_cores_busy'] > 0.3 else ''}.\n\n"
            f"Greedy outputs agree ({args.check} requests per N, the batched ones sharing batches): {checks}.\n\n"
            f"{head}\n" + "\n".join(rows) + "\n\n"
            "\"cut\": that percentile falls on a request unfinished at the cut-off. TTFT and E2E count from the "
            "scheduled arrival; tokens/s counts completed requests only; the merged swap runs in-process (no HTTP). "
            f"{cross}\n\n"
            f"What it shows: {results['summary']}\n")


def summary_sentence(results: dict) -> str:
    """The highest rate each variant completed with TTFT p95 under 2 s, per N."""
    parts = []
    for n in sorted({r["n"] for r in results["runs"]}):
        best = {}
        for run in results["runs"]:
            r = run["median"]
            if run["n"] == n and r["completed"] == r["requests"] and r["ttft_p95_s"] < 2:
                best[run["variant"]] = max(best.get(run["variant"], 0), run["rate"])
        parts.append(f"N={n}: " + ", ".join(f"{v} up to {best[v]:g} req/s" if v in best else f"{v} at no rate tried"
                                            for v in VARIANTS))
    return ("highest offered load served completely with TTFT p95 < 2 s — " + "; ".join(parts) + ".")


def plot(results: dict, path: Path) -> None:
    """TTFT p50/p95 and TPOT p50 vs offered load, one line per variant, one panel per N; a percentile
    that fell on an unfinished request is an x at the top of its panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ns = sorted({r["n"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 5), squeeze=False, sharey=True)
    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")))
    lines = (("ttft_p50_s", "o-", "TTFT p50"), ("ttft_p95_s", "s--", "TTFT p95"), ("tpot_p50_s", "^:", "TPOT p50"))
    for ax, n in zip(axes[0], ns):
        for j, v in enumerate(VARIANTS):
            runs = sorted((r for r in results["runs"] if r["n"] == n and r["variant"] == v), key=lambda r: r["rate"])
            rates = [r["rate"] for r in runs]
            for k, (key, style, label) in enumerate(lines):
                ys = [r["median"][key] for r in runs]
                ax.plot(rates, [y if math.isfinite(y) else math.nan for y in ys], style, color=colours[v],
                        label=f"{v}: {label}")
                cut = [x for x, y in zip(rates, ys) if y == math.inf]
                ax.plot(cut, [0.97 - 0.03 * (3 * j + k)] * len(cut), "x", color=colours[v],
                        transform=ax.get_xaxis_transform())
        ax.set(xscale="log", yscale="log", xlabel="offered load (requests/s)", title=f"{n} adapters")
        ax.set_xticks(sorted({r["rate"] for r in results["runs"]}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    low, high = axes[0][0].get_ylim()
    axes[0][0].set_ylim(low, high * 10)  # room for the x marks above the data
    axes[0][0].set_ylabel("seconds (x at the top: unfinished at the cut-off)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("lorakit serve under Poisson traffic (SmolLM2-135M fp32, CPU)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, nargs="+", default=[8, 64], help="N values")
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 1.0, 2.0, 4.0], help="offered loads, req/s")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of arrivals per trace")
    p.add_argument("--max-requests", type=int, default=150, help="at most this many requests per trace")
    p.add_argument("--grace", type=float, default=10.0, help="cut-off: seconds after the last arrival")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads (server and in-process)")
    p.add_argument("--check", type=int, default=6, help="requests whose outputs are compared across variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="N=8, rates 1 and 3, 8 s traces: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.adapters, args.rates, args.duration, args.grace, args.check = [8], [1.0, 3.0], 8.0, 8.0, 3
    command = "python bench/serve_traffic.py " + " ".join(sys.argv[1:])
    common.setup(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    started = time.perf_counter()
    results = {"args": vars(args), "command": command.strip(), "runs": [], "checks": []}
    import lorakit
    from lorakit.train.tasks import load_model
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        log(f"making {max(args.adapters)} adapters")
        make_adapters(root / "all", max(args.adapters))
        model, tok = load_model("builtin:smollm2", "causal-lm")
        for i in range(max(args.adapters)):
            lorakit.load(model, root / "all" / f"a{i}", adapter=f"a{i}")
        model.eval()
        ids = tok(TEXT * 3)["input_ids"]
        results["other_cores_busy"] = cpu_busy()
        results["machine"] = common.machine()
        log(f"load average {results['machine']['loadavg']}, {results['other_cores_busy']:.2f} cores busy before")
        timeout = "86400"  # the server's own timeout must not end a request: the cut-off (or the check) decides
        for n in args.adapters:
            folder = root / f"n{n}"
            for i in range(n):
                shutil.copytree(root / "all" / f"a{i}", folder / f"a{i}", copy_function=os.link)
            servers = {}
            try:
                for v, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
                    servers[v] = server(folder, max_batch, args.threads, ("--timeout", timeout))
                ports = {k: int(url.rsplit(":", 1)[1]) for k, (_, url) in servers.items()}
                traces = {rate: make_trace(rate, n, args.duration, args.max_requests, args.seed, ids)
                          for rate in args.rates}
                if not all(traces.values()):
                    raise SystemExit(f"no arrival within --duration {args.duration:g} s at some rate of {args.rates}")
                probe = [dataclasses.replace(j, arrival=0.0) for j in traces[max(args.rates)][:args.check]]
                replay_merged(model, tok, probe[:2], 60)  # warm-up
                outs = {"batched": replay_http(ports["batched"], probe, 600),
                        "one at a time": replay_http(ports["one at a time"], probe, 600),
                        "merged swap": replay_merged(model, tok, probe, 600)}
                errors = sorted({f"{v}: {o.error}" for v, os_ in outs.items() for o in os_ if not o.done})
                if errors:  # a text cut short is no evidence either way
                    raise SystemExit(f"the output check did not complete within 600 s: {errors}")
                base = [o.text for o in outs["one at a time"]]
                check = {v: sum(o.text == b for o, b in zip(outs[v], base)) for v in ("batched", "merged swap")}
                results["checks"].append({"n": n, "requests": len(probe), **check})
                log(f"N={n}: outputs equal to one at a time: {check} of {len(probe)}")
                for k, rate in enumerate(args.rates):
                    jobs = traces[rate]
                    per = {v: [] for v in VARIANTS}
                    for rnd in range(args.rounds):
                        shift = (k + rnd) % len(VARIANTS)
                        for v in VARIANTS[shift:] + VARIANTS[:shift]:
                            t = time.perf_counter()
                            if v == "merged swap":
                                s = summarize(jobs, replay_merged(model, tok, jobs, args.grace), args.grace)
                            else:
                                url = servers[v][1]
                                before = scrape(url)
                                s = summarize(jobs, replay_http(ports[v], jobs, args.grace), args.grace)
                                if not wait_idle(url):
                                    raise RuntimeError(f"{v} server still busy 120 s after the cut-off")
                                s["server"] = server_side(before, scrape(url))
                            per[v].append(s)
                            log(f"N={n} rate {rate:g} ({len(jobs)} requests) {v}: {s['completed']}/{s['requests']} "
                                f"done, {s['tokens_per_s']:.1f} tok/s, TTFT p50 {cell(s['ttft_p50_s'])} p95 "
                                f"{cell(s['ttft_p95_s'])}, TPOT p50 {cell(s['tpot_p50_s'])} "
                                f"({time.perf_counter() - t:.0f} s)")
                    for v in VARIANTS:
                        results["runs"].append({"n": n, "rate": rate, "variant": v, "median": median_rounds(per[v]),
                                                "rounds": per[v]})
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(30)
    results["wall_s"] = time.perf_counter() - started
    results["summary"] = summary_sentence(results)
    name = "serve_traffic" + ("_quick" if args.quick else "")
    md = markdown(results, args)
    log(md)
    common.write(name, finite(results), md)
    plot(results, common.RESULTS / f"{name}.png")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
