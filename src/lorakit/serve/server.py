"""Build and run ``lorakit serve``: load the base model and the adapters, then uvicorn."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from fastapi import FastAPI

from .adapters import AdapterError, Adapters, discover
from .app import create_app
from .engine import Engine
from .metrics import Metrics

__all__ = ["build", "run", "base_name"]


def base_name(spec: str) -> str:
    """The name clients use for the base model: ``builtin:smollm2`` -> ``smollm2``, a folder -> its name."""
    return spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec).resolve().name


def build(model: str = "builtin:smollm2", adapters: str | os.PathLike | None = None, admin_token: str | None = None,
          max_batch: int = 32, max_queue: int = 256, timeout: float = 120.0, max_adapters: int = 0,
          max_context: int | None = None, name: str | None = None, prefill_tokens: int = 4096,
          log=print) -> FastAPI:
    """The app serving ``model`` and every adapter folder directly under ``adapters``.

    With ``max_adapters`` > 0, the first ``max_adapters`` (by name) are loaded now and the rest on
    first use. An adapter that fails to load is reported and skipped."""
    from ..train.tasks import load_model
    net, tok = load_model(model, "causal-lm")
    metrics = Metrics()
    root = Path(adapters).resolve() if adapters else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--adapters {adapters}: not a folder")
    registry = Adapters(net, root, max_adapters, metrics)
    for i, (key, path) in enumerate(discover(root).items() if root else ()):
        try:
            registry.add(key, path) if not max_adapters or i < max_adapters else registry.register(key, path)
        except AdapterError as e:
            log(f"lorakit serve: skipping {path}: {e.message}")
    engine = Engine(net, copy.deepcopy(tok), registry, max_batch=max_batch, max_queue=max_queue,
                    timeout=timeout, metrics=metrics, prefill_tokens=prefill_tokens)
    served = name or base_name(model)
    return create_app(engine, tok, served, aliases=(model,), admin_token=admin_token, adapter_root=root,
                      max_context=max_context)


def run(args) -> int:
    """``lorakit serve`` (arguments from the CLI parser)."""
    import uvicorn
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    token = args.admin_token or os.environ.get("LORAKIT_ADMIN_TOKEN") or None
    app = build(args.model, args.adapters, token, args.max_batch, args.max_queue, args.timeout,
                args.max_adapters, args.max_context, args.served_model_name, args.prefill_tokens, log=log)
    srv = app.state.server
    names = srv.engine.adapters.names()
    log(f"lorakit serve: model {srv.base_name!r}, {len(names)} adapter(s) {names}, "
        f"admin endpoints {'on' if token else 'off'}; http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
