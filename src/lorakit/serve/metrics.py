"""Counters, gauges and histograms in Prometheus' text exposition format (no dependency).

Thread-safe: the engine's worker thread records, the HTTP side renders ``GET /metrics``.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """The server's metrics; ``gauges`` are read at render time from callables."""

    HELP = {
        "lorakit_requests_total": ("counter", "Finished generation requests by outcome."),
        "lorakit_http_responses_total": ("counter", "HTTP responses by status code."),
        "lorakit_prompt_tokens_total": ("counter", "Prompt tokens processed."),
        "lorakit_generation_tokens_total": ("counter", "Tokens generated."),
        "lorakit_adapter_loads_total": ("counter", "Adapters loaded from disk (including reloads)."),
        "lorakit_adapter_evictions_total": ("counter", "Adapters evicted by the resident limit."),
        "lorakit_decode_steps_total": ("counter", "Batched decode steps run."),
        "lorakit_batch_size": ("histogram", "Rows per decode step."),
        "lorakit_request_latency_seconds": ("histogram", "Time from arrival to the last token."),
        "lorakit_time_to_first_token_seconds": ("histogram", "Time from arrival to the first token."),
        "lorakit_queue_depth": ("gauge", "Requests waiting for a batch slot."),
        "lorakit_active_requests": ("gauge", "Requests in the decode batch."),
        "lorakit_adapters_resident": ("gauge", "Adapters loaded in memory."),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.histograms = {"lorakit_batch_size": _Histogram(BATCH_BUCKETS),
                           "lorakit_request_latency_seconds": _Histogram(LATENCY_BUCKETS),
                           "lorakit_time_to_first_token_seconds": _Histogram(LATENCY_BUCKETS)}
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 if never incremented)."""
        with self._lock:
            return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in self.HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    rows = [(lb, v) for (n, lb), v in sorted(self.counters.items()) if n == name] or [((), 0.0)]
                    lines += [f"{name}{_labels(lb)} {_num(v)}" for lb, v in rows]
                elif kind == "gauge":
                    lines.append(f"{name} {_num(self.gauges[name]()) if name in self.gauges else 0}")
                else:
                    h = self.histograms[name]
                    lines += [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(h.buckets, h.counts)]
                    lines += [f'{name}_bucket{{le="+Inf"}} {h.count}', f"{name}_sum {_num(h.sum)}",
                              f"{name}_count {h.count}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
