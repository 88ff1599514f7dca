"""The serving engine: continuous batching of generation requests across adapters.

One worker thread owns the model; all torch work happens there. Requests enter a bounded queue
(``submit`` raises :class:`QueueFull` when it is full). Each loop iteration of the worker:

1. runs pending commands (adapter loads, in-place reloads, deletes) between steps, and unloads
   deleted or replaced adapter versions nobody uses any more;
2. drops queued or running requests that were cancelled (client gone) or timed out;
3. admits waiting requests in arrival order while the batch has room (and up to a budget of
   prefill tokens): they are prefilled together, left-padded, under ``lorakit.mixed(model, their
   adapters)``, and sample their first tokens; only rows whose prefill and first token succeeded
   join the decode batch. A request whose adapter was reloaded in place while it waited starts
   on the new version (rows already running keep the one they started with). With a resident limit,
   a request whose adapter cannot be loaded yet (all resident ones are in use) waits, and only
   base-model requests may overtake it, so it cannot starve;
4. runs ONE decode step for every running row together, under ``lorakit.mixed(model, names)``
   (one adapter per row, None = base), samples each row with its own parameters and generator,
   and retires the rows that finished.

So a new request joins at the next step and a finished one leaves at once. Every request ends
exactly once, in ``_finish`` (its one final event; its batch pin and adapter hold released), so a
failure cannot leave rows behind or counts negative. A row whose logits are not finite (e.g. a
broken adapter) ends alone with an error; a failed forward ends the rows it ran. Internal errors
are logged with the request ids; clients get a message naming only their id. The KV cache scheme
is in :mod:`lorakit.serve.decode_batch`. Results go back through each request's ``emit`` callback
(called on the worker thread; the HTTP layer forwards them into its event loop).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..api import mixed
from ..state import has_adapters
from .adapters import Adapters, Entry
from .decode_batch import Batch, cache_tensors, full_cache, sample
from .metrics import Metrics
from .text import TextStream

__all__ = ["Engine", "Request", "Event", "QueueFull", "EngineStopped", "SEED_MODULUS"]

log = logging.getLogger("lorakit.serve")
SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes [0, 2**64); a request's seed is reduced modulo this


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""


class EngineStopped(Exception):
    """The engine is not running."""


@dataclass
class Event:
    """What a request hears from the engine: ``text`` deltas, then one ``done`` or ``error``."""

    kind: str                       # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500               # for errors: the HTTP status


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, adapter (None = base model) and sampling parameters."""

    prompt: list[int]
    emit: Callable[[Event], None]
    adapter: Entry | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    id: str = ""                    # the HTTP request id (in logs and internal-error messages)
    cancelled: bool = False         # set from any thread (client disconnected)
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")
    # worker state
    tokens: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    pinned: bool = False            # counted in adapter.rows (admitted, not yet finished)
    finished: bool = False          # _finish ran: the client heard its one final event


class Engine:
    """Continuous-batching generation over one base model and many adapters (see module doc)."""

    def __init__(self, model: nn.Module, tokenizer, adapters: Adapters, max_batch: int = 32,
                 max_queue: int = 256, timeout: float = 120.0, metrics: Metrics | None = None,
                 prefill_tokens: int = 4096) -> None:
        self.model, self.tok, self.adapters = model.eval(), tokenizer, adapters
        self.device = next(model.parameters()).device  # inputs are built on the CPU and moved there
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.prefill_tokens = prefill_tokens  # padded tokens per prefill forward (one long prompt may exceed it)
        self.pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.metrics = metrics or Metrics()
        self.metrics.gauges.update(lorakit_queue_depth=lambda: len(self._waiting),
                                   lorakit_active_requests=lambda: len(self._rows),
                                   lorakit_adapters_resident=lambda: len(self.adapters.resident))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[Request] = []
        self._batch = Batch(model.config)
        self._routing = contextlib.ExitStack()
        self._routing_key: tuple | None = None
        self._thread: threading.Thread | None = None
        self._running = False

    # -- any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the worker: running and waiting requests end with a 503 "shutting down" error.
        ``wait=False`` returns at once (safe on an event loop); the worker finishes its current step."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if wait and self._thread:
            self._thread.join(timeout=30)

    def pending(self) -> tuple[int, int]:
        """(running rows, waiting requests) now."""
        return len(self._rows), len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue a request (its adapter entry already acquired). Raises QueueFull / EngineStopped."""
        if not self.alive:
            raise EngineStopped("the engine is not running")
        request.deadline = request.arrival + self.timeout
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread between two steps; its result or exception in a Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    # -- worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while self._running:
            try:
                self._iteration()
            except Exception:  # noqa: BLE001 - a bug must fail the running requests, not the server
                log.exception("engine iteration failed; failing the running requests %s",
                              [r.id for r in self._rows])
                self._fail_running(None)
        with self._wake:  # shutting down: nobody is left waiting forever
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._fail_running("the server is shutting down", status=503)
        for r in waiting:
            self._finish(r, "error", "the server is shutting down", status=503)

    def _iteration(self) -> None:
        with self._wake:
            if not (self._rows or self._waiting or self._commands):
                self._wake.wait(timeout=0.5)
            commands = list(self._commands)
            self._commands.clear()
        for fn, future in commands:
            self._close_routing()
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
        self.adapters.collect()
        self._expire()
        self._admit()
        if self._rows:
            self._decode()

    def _fail_running(self, message: str | None, status: int = 500) -> None:
        """End every running row with an error (``None``: an internal error, details in the log)."""
        self._close_routing()
        rows, self._rows, self._batch = self._rows, [], Batch(self.model.config)
        for r in rows:
            self._finish(r, "error", message, status)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled or now > r.deadline]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled" if r.cancelled else "timeout")
        done = [i for i, r in enumerate(self._rows) if r.cancelled or now > r.deadline]
        if done:
            self._retire({i: "cancelled" if self._rows[i].cancelled else "timeout" for i in done})

    def _admit(self) -> None:
        """Take waiting requests in arrival order (within the batch size and the prefill token
        budget) and prefill them together."""
        with self._wake:
            waiting = list(self._waiting)
        group: list[Request] = []
        blocked, longest = False, 0
        for r in waiting:
            if len(self._rows) + len(group) >= self.max_batch:
                break
            if blocked and r.adapter is not None:
                continue  # first come, first served: nobody overtakes a request waiting for a slot
            if group and max(longest, len(r.prompt)) * (len(group) + 1) > self.prefill_tokens:
                break
            if r.adapter is not None and r.adapter.replaced_by is not None:
                r.adapter = self.adapters.current(r.adapter)  # reloaded in place: starts on the new version
            try:  # outside the lock: loading an adapter from disk must not block submit()
                if r.adapter is not None and not self.adapters.ensure(r.adapter):
                    blocked = True  # every resident adapter is in use by running rows; only base rows pass
                    continue
            except Exception as e:  # noqa: BLE001 - e.g. the adapter's files vanished or became invalid
                if self._take(r):
                    if getattr(e, "message", None) is None:
                        log.exception("request %s: loading its adapter failed", r.id)
                    self._finish(r, "error", getattr(e, "message", None))  # AdapterError: a safe message
                continue
            if self._take(r):
                if r.adapter is not None:
                    r.adapter.rows += 1  # pinned: the next ensure() cannot evict it
                    r.pinned = True
                group.append(r)
                longest = max(longest, len(r.prompt))
        if not group:
            return
        try:
            self._prefill(group)
        except Exception:  # noqa: BLE001 - bad requests must not stop the server
            log.exception("prefill failed for requests %s", [r.id for r in group])
            for r in group:  # none of them joined the batch (rows are added only after a clean prefill)
                self._finish(r, "error", None)

    def _take(self, r: Request) -> bool:
        with self._wake:
            if r not in self._waiting:
                return False
            self._waiting.remove(r)
            return True

    def _prefill(self, group: list[Request]) -> None:
        """Prefill new requests in one forward (left-padded, explicit positions), sample their first
        tokens and add them to the decode batch."""
        length = max(len(r.prompt) for r in group)
        ids = torch.full((len(group), length), self.pad_id)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, length - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, length - len(r.prompt):] = 1
            r.text = TextStream(self.tok, r.stop)
            seed = r.seed % SEED_MODULUS if r.seed is not None else random.getrandbits(63)
            r.generator = torch.Generator().manual_seed(seed)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with self._route([r.adapter.internal if r.adapter else None for r in group], persistent=False):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             cache=full_cache(), use_cache=True, logits_to_keep=1)
        self.metrics.inc("lorakit_prompt_tokens_total", sum(len(r.prompt) for r in group))
        firsts = {i: self._sample(r, out.logits[i, -1]) for i, r in enumerate(group)}
        ok = [i for i, t in firsts.items() if t is not None]  # rows that failed to sample are finished already
        if not ok:
            return
        kv = cache_tensors(out.cache)
        if len(ok) < len(group):
            idx = torch.tensor(ok, device=self.device)
            kv, mask = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in kv], mask.index_select(0, idx)
        self._batch.add(kv, mask)
        first = len(self._rows)
        self._rows.extend(group[i] for i in ok)
        finished = {}
        for j, i in enumerate(ok):
            reason = self._accept(group[i], firsts[i])
            if reason:
                finished[first + j] = reason
        if finished:
            self._retire(finished)

    def _sample(self, r: Request, logits: torch.Tensor) -> int | None:
        """The row's next token; on a failure (non-finite logits, e.g. from a broken adapter) the
        request is finished with an error and None is returned."""
        try:
            return sample(logits, r.temperature, r.top_p, r.generator)
        except Exception as e:  # noqa: BLE001 - one bad row must not fail the others
            log.warning("request %s: sampling failed: %s", r.id, e)
            self._finish(r, "error", f"generation failed: {e}")
            return None

    def _decode(self) -> None:
        live = [i for i, r in enumerate(self._rows) if not r.finished]
        if len(live) < len(self._rows):  # rows an error already finished (e.g. mid-prefill) leave first
            self._rows = [self._rows[i] for i in live]
            self._batch.keep(live)
            if not self._rows:
                return
        rows = self._rows
        tokens = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        try:
            self._route([r.adapter.internal if r.adapter else None for r in rows])
            logits = self._batch.step(self.model, tokens)
        except Exception:  # noqa: BLE001
            log.exception("decode step failed for requests %s", [r.id for r in rows])
            self._fail_running(None)
            return
        self.metrics.inc("lorakit_decode_steps_total")
        self.metrics.observe("lorakit_batch_size", len(rows))
        finished = {}
        for i, r in enumerate(rows):
            token = self._sample(r, logits[i])
            reason = "error" if token is None else self._accept(r, token)
            if reason:
                finished[i] = reason
        if finished:
            self._retire(finished)

    def _accept(self, r: Request, token: int) -> str | None:
        """Record a sampled token and send its text; returns a finish reason or None."""
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
            self.metrics.observe("lorakit_time_to_first_token_seconds", r.first_token_at - r.arrival)
        r.tokens.append(token)
        self.metrics.inc("lorakit_generation_tokens_total")
        if token in self.eos:
            return "stop"
        delta = r.text.add(token)
        if delta:
            r.emit(Event("text", delta))
        if r.text.stopped:
            return "stop"
        return "length" if len(r.tokens) >= r.max_tokens else None

    def _retire(self, reasons: dict[int, str]) -> None:
        """Remove rows (index -> finish reason) from the batch and tell their clients."""
        keep = [i for i in range(len(self._rows)) if i not in reasons]
        for i, reason in reasons.items():
            self._finish(self._rows[i], reason)  # no-op for rows already finished ("error" from _sample)
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    def _finish(self, r: Request, reason: str, message: str | None = "", status: int = 500) -> None:
        """Tell the client its one final event and release the request's batch pin and adapter hold.
        The single place that does so; idempotent. ``message=None``: an internal error (details in
        the log), answered with a generic text naming the request id."""
        if r.finished:
            return
        r.finished = True
        if r.pinned:
            r.adapter.rows -= 1
            r.pinned = False
        if r.adapter is not None:
            self.adapters.release(r.adapter)
        if message is None:
            message = f"internal error while generating (request id {r.id or 'unknown'}); see the server log"
        outcome = {"stop": "ok", "length": "ok"}.get(reason, reason)
        self.metrics.inc("lorakit_requests_total", outcome=outcome)
        self.metrics.observe("lorakit_request_latency_seconds", time.monotonic() - r.arrival)
        if reason in ("stop", "length"):
            tail = r.text.flush() if r.text else ""
            if tail:
                r.emit(Event("text", tail))
            r.emit(Event("done", finish_reason=reason, prompt_tokens=len(r.prompt),
                         completion_tokens=len(r.tokens)))
        elif reason == "timeout":
            r.emit(Event("error", f"the request timed out after {self.timeout:g} s", status=504))
        elif reason == "error":
            r.emit(Event("error", message, status=status))
        # cancelled: nobody is listening

    def _route(self, names: list[str | None], persistent: bool = True):
        """Enter ``lorakit.mixed`` for these rows. Persistent routings stay open (their gathered
        factors cached) while the batch's adapters and the model's adapter set are unchanged."""
        if not has_adapters(self.model):  # no adapters at all: the plain model
            self._close_routing()
            return contextlib.nullcontext()
        if not persistent:  # nested inside the open routing, which it overrides
            return mixed(self.model, names)
        if all(n is None for n in names):  # only base rows: no adapter is active, no routing needed
            self._close_routing()
            return None
        key = (tuple(names), self.adapters.version)
        if key != self._routing_key:
            self._close_routing()
            self._routing.enter_context(mixed(self.model, names))
            self._routing_key = key
        return None

    def _close_routing(self) -> None:
        self._routing.close()
        self._routing, self._routing_key = contextlib.ExitStack(), None
