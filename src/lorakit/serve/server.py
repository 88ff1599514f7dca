"""Build and run ``lorakit serve``: load the base model, check every adapter, then uvicorn.

Connections: a request must arrive completely (headers and body) within ``read_timeout`` seconds
of the connection opening or of the previous response, and an idle keep-alive connection is closed
after ``keep_alive`` seconds; so idle and half-sent connections cannot pile up.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes and every new request gets a 503; running
and queued requests may finish for up to ``shutdown_timeout`` seconds, then the ones left end with a
503 error (streams: an SSE error event, then ``[DONE]``); the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import sys
from pathlib import Path

import h11
import torch
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import LoraError
from ..distributed import resolve_device
from .adapters import AdapterError, Adapters, discover
from .app import MAX_BODY_BYTES, create_app
from .engine import Engine
from .metrics import Metrics

__all__ = ["build", "run", "server", "http_protocol", "base_name"]

log = logging.getLogger("lorakit.serve")


def base_name(spec: str) -> str:
    """The name clients use for the base model: ``builtin:smollm2`` -> ``smollm2``, a folder -> its name."""
    return spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec).resolve().name


def build(model: str = "builtin:smollm2", adapters: str | os.PathLike | None = None, admin_token: str | None = None,
          max_batch: int = 32, max_queue: int = 256, timeout: float = 120.0, max_adapters: int = 0,
          max_context: int | None = None, name: str | None = None, prefill_tokens: int = 4096,
          max_body: int = MAX_BODY_BYTES, log=print, quantize: str | None = None,
          device: str | torch.device | None = None, skip_bad: bool = False,
          allow_precision_change: bool = False) -> FastAPI:
    """The app serving ``model`` and every adapter folder directly under ``adapters``.

    The base is held in the precision the adapters were trained on (their files' record, see
    :func:`lorakit.pretrained.plan_base_precision`; adapters needing different ones are refused,
    one base per server), or in ``quantize`` ("none", "nf4", "fp4", "int8"); ``device``: where the
    model runs (moved after loading and quantizing, as ``lorakit train`` does; None: the CPU it
    loads on). Every adapter folder is checked completely now (config, tensor names and shapes,
    finite values, base precision), whatever ``max_adapters`` is. One that cannot be served raises
    LoraError naming each such adapter and why, unless ``skip_bad``: then each is reported through
    ``log`` and listed with its reason in ``/v1/models`` and ``/health``. With ``max_adapters`` > 0,
    the first ``max_adapters`` good ones (by name) are loaded now and the rest on first use."""
    from ..pretrained import apply_base_precision, load_model, plan_base_precision
    root = Path(adapters).resolve() if adapters else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--adapters {adapters}: not a folder")
    net, tok = load_model(model, "causal-lm")
    bad: dict[str, str] = {}
    found = discover(root, log, bad) if root else {}
    plan = plan_base_precision(net, found, quantize, allow_precision_change)
    bad.update(plan.refused)
    apply_base_precision(net, plan)
    if device is not None:
        net.to(device)
    metrics = Metrics()
    registry = Adapters(net, root, max_adapters, metrics, allow_precision_change)
    for key, path in found.items():
        if key in bad:
            continue
        try:
            if not max_adapters or len(registry.resident) < max_adapters:
                registry.add(key, path)
            else:
                registry.register(key, path)
        except AdapterError as e:
            bad[key] = e.message.removeprefix(f"cannot load adapter {key!r}: ")
    if bad and not skip_bad:
        raise LoraError(f"cannot serve {len(bad)} adapter folder(s) of {adapters}: "
                        + "; ".join(f"{key}: {why}" for key, why in sorted(bad.items()))
                        + ". Fix or remove them, or pass --skip-bad-adapters to serve the others (each is then "
                          "listed with its reason in /v1/models and /health)")
    for key, why in sorted(bad.items()):
        log(f"lorakit serve: skipping {key}: {why}")
    registry.skipped = dict(sorted(bad.items()))
    engine = Engine(net, copy.deepcopy(tok), registry, max_batch=max_batch, max_queue=max_queue,
                    timeout=timeout, metrics=metrics, prefill_tokens=prefill_tokens)
    served = name or base_name(model)
    return create_app(engine, tok, served, aliases=(model,), admin_token=admin_token, adapter_root=root,
                      max_context=max_context, max_body=max_body)


def http_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol closing a connection whose request has not arrived completely (headers
    and body) ``read_timeout`` seconds after the connection opened or the previous response ended."""
    return type("Protocol", (_TimedProtocol,), {"read_timeout": read_timeout})


class _TimedProtocol(H11Protocol):
    read_timeout = 30.0
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_expired)

    def _read_expired(self) -> None:
        self._read_timer = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.logger.info("closing a connection: no complete request within %g s", self.read_timeout)
            self.transport.close()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with a draining shutdown (see the module doc); SIGTERM ends with exit 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, deadline: float) -> None:
        super().__init__(config)
        self.srv, self.deadline = app.state.server, deadline

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", [])
        if sig == signal.SIGTERM and sig in captured:  # handled here: not re-raised after the shutdown
            captured.remove(sig)

    async def shutdown(self, sockets=None) -> None:
        self.srv.draining = True  # new requests: 503
        log.info("draining: %d running and %d queued request(s) may finish within %g s",
                 *self.srv.engine.pending(), self.deadline)
        timer = asyncio.get_running_loop().call_later(self.deadline, self._deadline)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


    def _deadline(self) -> None:
        log.info("shutdown deadline (%g s): ending the requests still running with a 503", self.deadline)
        self.srv.engine.stop(wait=False)


def run(args) -> int:
    """``lorakit serve`` (arguments from the CLI parser)."""
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logging.getLogger("lorakit.serve").addHandler(handler)
    logging.getLogger("lorakit.serve").setLevel(args.log_level.upper())
    token = args.admin_token or os.environ.get("LORAKIT_ADMIN_TOKEN") or None
    device = resolve_device(args.device)  # before loading anything: a missing device is refused at once
    app = build(args.model, args.adapters, token, args.max_batch, args.max_queue, args.timeout,
                args.max_adapters, args.max_context, args.served_model_name, args.prefill_tokens,
                args.max_body_bytes, log=log, quantize=args.quantize, device=device,
                skip_bad=args.skip_bad_adapters, allow_precision_change=args.allow_precision_change)
    srv = app.state.server
    names, skipped = srv.engine.adapters.names(), srv.engine.adapters.skipped
    log(f"lorakit serve: model {srv.base_name!r}, {len(names)} adapter(s) {names}"
        + (f", {len(skipped)} skipped {sorted(skipped)}" if skipped else "") + ", "
        f"admin endpoints {'on' if token else 'off'}; http://{args.host}:{args.port}/v1")
    server(app, args.host, args.port, args.read_timeout, args.keep_alive_timeout, args.shutdown_timeout,
           log_level=args.log_level).run()
    return 0


def server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, read_timeout: float = 30.0,
           keep_alive_timeout: float = 5.0, shutdown_timeout: float = 30.0, **uvicorn_options) -> uvicorn.Server:
    """The uvicorn server for ``app`` with the connection timeouts and draining shutdown above
    (``.run()`` it; SIGTERM/Ctrl-C handlers are installed only on the main thread)."""
    config = uvicorn.Config(app, host=host, port=port, http=http_protocol(read_timeout),
                            timeout_keep_alive=keep_alive_timeout,
                            timeout_graceful_shutdown=shutdown_timeout + 10, **uvicorn_options)
    return _DrainingServer(config, app, shutdown_timeout)
