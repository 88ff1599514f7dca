"""The HTTP side of ``lorakit serve``: a FastAPI app speaking OpenAI's API over an :class:`Engine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``model`` = the base model's
name or an adapter's; ``stream: true`` sends server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the admin endpoints ``POST /v1/adapters``,
``GET /v1/adapters``, ``DELETE /v1/adapters/{name}`` and vLLM's ``POST /v1/load_lora_adapter`` /
``POST /v1/unload_lora_adapter`` (bearer token; ``load_inplace`` replaces a loaded adapter between two
decode steps, see :mod:`.adapters`; ``lora_int_id`` names an adapter by vLLM's integer id, given in
the load answer's ``X-Lora-Int-Id`` header and in ``/v1/models``). Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with a precise status; a client that goes away
(mid-stream or while waiting) cancels its requests, which frees their batch slots.

One request cannot hurt the others: the body is bounded (413), tokenization and chat templates
run on a tokenizer thread (never on the event loop), and an unexpected exception is logged with
the request's id and answered with a 500 naming only that id (``X-Request-Id`` on every answer).
While the server drains for shutdown every new request gets a 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import random
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .adapters import AdapterError, check_name, resolve_under
from .engine import Engine, EngineStopped, Event, QueueFull
from .engine import Request as GenRequest

__all__ = ["create_app", "ApiError", "MAX_BODY_BYTES"]

log = logging.getLogger("lorakit.serve")
MAX_BODY_BYTES = 1 << 20  # default bound of a request body (413 above it)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout_error"}
_GONE = object()  # queued by the disconnect watcher


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    body = P.error_body(message, _TYPES.get(status, "server_error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


class _Server:
    """State shared by the routes: engine, tokenizer, names, admin token, limits."""

    def __init__(self, engine: Engine, tokenizer, base_name: str, aliases: tuple[str, ...],
                 admin_token: str | None, adapter_root: Path | None, max_context: int) -> None:
        self.engine, self.tok, self.base_name = engine, tokenizer, base_name
        self.base_names = {base_name, *aliases}
        self.admin_token, self.root, self.max_context = admin_token, adapter_root, max_context
        self.draining = False  # set on shutdown: new requests get 503
        self.reloading: set[str] = set()  # adapters with an in-place reload under way (a second one: 409)
        # one thread: the tokenizer is not shared across threads, and the event loop never waits on it
        self._text = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize")

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on the tokenizer thread (tokenizing a long prompt must not stall other clients)."""
        return await asyncio.get_running_loop().run_in_executor(self._text, fn, *args)

    def close(self) -> None:
        self.draining = True
        self._text.shutdown(wait=False)

    # -- requests ------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.base_names and name not in self.engine.adapters.names():
            available = [self.base_name, *self.engine.adapters.names()]
            raise ApiError(404, f"The model '{name}' does not exist. Available models: {available}",
                           param="model", code="model_not_found")

    def encode(self, ids: list[int], max_tokens: int | None, default: int | None, param: str) -> tuple[list, int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param=param)
        room = self.max_context - len(ids)
        wanted = max_tokens if max_tokens is not None else min(default or room, room)
        if room < 1 or wanted > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_context} tokens. However, you "
                           f"requested {len(ids) + max(wanted, 1)} tokens ({len(ids)} in the prompt, {max(wanted, 1)} "
                           "for the completion). Please reduce the prompt or max_tokens.", param=param,
                           code="context_length_exceeded")
        return ids, wanted

    def submit(self, name: str, prompts: list[list[int]], max_tokens: int, body: P._Sampling, rid: str
               ) -> tuple[list[GenRequest], asyncio.Queue]:
        """One engine request per (prompt, n); their events arrive on one queue as (index, event)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        n, stop, seed = body.n or 1, body.stops(), body.seed
        temperature = 1.0 if body.temperature is None else body.temperature
        requests: list[GenRequest] = []
        try:
            for index, (ids, k) in enumerate((ids, k) for ids in prompts for k in range(n)):
                entry = None if name in self.base_names else self.engine.adapters.acquire(name)
                emit = _emitter(loop, queue, index)
                r = GenRequest(ids, emit, adapter=entry, max_tokens=max_tokens, temperature=temperature,
                               top_p=1.0 if body.top_p is None else body.top_p, stop=stop,
                               seed=None if seed is None else seed + k, id=rid)
                try:
                    self.engine.submit(r)
                except Exception:
                    if entry is not None:
                        self.engine.adapters.release(entry)
                    raise
                requests.append(r)
        except KeyError:
            self._cancel(requests)
            self.check_model(name)  # deleted meanwhile: 404
            raise
        except QueueFull as e:
            self._cancel(requests)
            raise ApiError(429, str(e), code="queue_full") from None
        except EngineStopped as e:
            self._cancel(requests)
            raise ApiError(503, str(e), code="engine_stopped") from None
        return requests, queue

    @staticmethod
    def _cancel(requests: list[GenRequest]) -> None:
        for r in requests:
            r.cancelled = True

    async def collect(self, http: Request, requests: list[GenRequest], queue: asyncio.Queue
                      ) -> tuple[list[tuple[str, str]], int, int]:
        """Wait for every request; ``(text, finish_reason)`` per choice, prompt and completion tokens."""
        texts = [""] * len(requests)
        reasons: list[str | None] = [None] * len(requests)
        completion = 0
        async for index, ev in self.events(http, requests, queue):
            if ev.kind == "text":
                texts[index] += ev.text
            elif ev.kind == "error":
                raise ApiError(ev.status, ev.text, code="timeout" if ev.status == 504 else "generation_failed")
            else:
                reasons[index] = ev.finish_reason
                completion += ev.completion_tokens
        if None in reasons:  # the client went away
            raise ApiError(499, "client closed the request", code="client_closed")
        return list(zip(texts, reasons)), _prompt_tokens(requests), completion

    async def events(self, http: Request, requests: list[GenRequest], queue: asyncio.Queue
                     ) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request is done; cancels them all if the client goes away or on exit."""
        watcher = asyncio.ensure_future(_watch_disconnect(http, queue))
        pending = len(requests)
        try:
            while pending:
                item = await queue.get()
                if item is _GONE:
                    return
                index, ev = item
                if ev.kind != "text":
                    pending -= 1
                yield index, ev
        finally:
            watcher.cancel()
            self._cancel(requests)  # no-op for finished requests; frees the slots of the others

    # -- admin ---------------------------------------------------------------------------------
    def check_admin(self, authorization: str | None) -> None:
        if not self.admin_token:
            raise ApiError(403, "admin endpoints are disabled: start the server with --admin-token "
                           "(or LORAKIT_ADMIN_TOKEN)", code="admin_disabled")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing admin token: send 'Authorization: Bearer <token>'", code="missing_token")
        if not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
            raise ApiError(403, "invalid admin token", code="invalid_token")


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    """The engine's callback for choice ``index``: hands events to the request's event loop."""
    def emit(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass
    return emit


async def _watch_disconnect(http: Request, queue: asyncio.Queue) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait(_GONE)
            return


class _Guard:
    """Pure ASGI middleware around every HTTP request (streaming and disconnects untouched): gives
    it an id (``X-Request-Id``), answers 503 while the server drains, reads a body of at most
    ``max_body`` bytes (413 above), turns an unexpected exception into a logged 500 that names only
    the request id (the connection stays usable), and counts responses by status."""

    def __init__(self, app, srv: _Server, metrics, max_body: int) -> None:
        self.app, self.srv, self.metrics, self.max_body = app, srv, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = P.new_id("req")
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                self.metrics.inc("lorakit_http_responses_total", status=str(message["status"]))
            await send(message)

        async def answer(status: int, message: str, code: str) -> None:
            await _error(status, message, code=code)(scope, receive, send_counted)

        if self.srv.draining:
            return await answer(503, "the server is shutting down; retry on another instance", "shutting_down")
        try:
            body = await self._read_body(scope, receive)
        except _TooLarge as e:
            return await answer(413, str(e), "request_too_large")
        if body is None:  # the client went away while sending
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards only http.disconnect

        try:
            await self.app(scope, replay, send_counted)
        except Exception:  # noqa: BLE001 - logged with the id; the client sees only the id
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if not started:
                await answer(500, f"internal server error (request id {rid}); the details are in the "
                                  "server log", "internal_error")

    async def _read_body(self, scope, receive) -> bytes | None:
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise _TooLarge(f"the request body has {int(length)} bytes; at most {self.max_body} are accepted")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                raise _TooLarge(f"the request body exceeds {self.max_body} bytes")
            if not message.get("more_body"):
                return b"".join(chunks)


class _TooLarge(Exception):
    pass


def _param(loc: tuple) -> str:
    """``messages.0.content`` from pydantic's location (without ``body`` and union-member tags)."""
    tags = {"str", "int", "float", "bool", "list", "dict", "none"}
    return ".".join(str(x) for x in loc[1:] if not (isinstance(x, str) and (x in tags or "[" in x or
                                                                             x.startswith("function-"))))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, tokenizer, base_name: str, aliases: tuple[str, ...] = (),
               admin_token: str | None = None, adapter_root: Path | None = None,
               max_context: int | None = None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; starts the engine on start-up and stops it on shutdown."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.alive:
            engine.start()
        yield
        srv.close()
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    ctx = max_context or getattr(engine.model.config, "max_position_embeddings", 2048)
    srv = _Server(engine, tokenizer, base_name, aliases, admin_token, adapter_root, ctx)
    app.state.server = srv
    metrics = engine.metrics

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, e.message, e.param, e.code, {"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(AdapterError)
    async def adapter_error(_, e: AdapterError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(P.Unsupported)
    async def unsupported(_, e: P.Unsupported):
        return _error(400, str(e), e.param, "unsupported_parameter")

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _error(400, "the request body is not valid JSON", code="invalid_json")
        bad_text = next((err for err in errors if err.get("type") == "unicode_surrogate"), None)
        if bad_text:
            return _error(400, bad_text["msg"], bad_text["ctx"]["where"], "invalid_unicode")
        where = [_param(err.get("loc", ())) for err in errors]
        detail = "; ".join(f"{w or 'body'}: {err.get('msg')}" for w, err in zip(where[:5], errors))
        return _error(422, f"invalid request: {detail}", where[0] or None, "invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):  # unknown routes, wrong methods
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    app.add_middleware(_Guard, srv=srv, metrics=metrics, max_body=max_body)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the engine is not running", code="engine_stopped")
        return {"status": "ok", "model": base_name, "adapters": len(engine.adapters.names()),
                "skipped": engine.adapters.skipped_listing()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        cards = [P.model_card(base_name)] + [P.model_card(a["name"], parent=base_name, resident=a["resident"],
                                                          lora_int_id=a["lora_int_id"]) for a in engine.adapters.listing()]
        return {"object": "list", "data": cards, "skipped": engine.adapters.skipped_listing()}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: Request):
        body.check_unsupported()
        srv.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompt = prompt or [[]]
        _check_choices(len(prompt), body)
        texts = [p for p in prompt if isinstance(p, str)]
        tokenized = iter(await srv.off_loop(lambda: [tokenizer(p)["input_ids"] for p in texts]) if texts else [])
        encoded = [srv.encode(next(tokenized) if isinstance(p, str) else list(p), body.max_tokens, 16, "prompt")
                   for p in prompt]
        return await _respond(srv, http, body, [ids for ids, _ in encoded], min(n for _, n in encoded), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, http: Request):
        body.check_unsupported()
        srv.check_model(body.model)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        _check_choices(1, body)
        try:
            text = await srv.off_loop(lambda: tokenizer.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True))
        except Exception as e:  # noqa: BLE001 - templates raise on unsupported role orders
            raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        ids = await srv.off_loop(lambda: tokenizer(text, add_special_tokens=False)["input_ids"])
        ids, wanted = srv.encode(ids, body.max_completion_tokens or body.max_tokens, None, "messages")
        return await _respond(srv, http, body, [ids], wanted, chat=True)

    @app.get("/v1/adapters")
    async def list_adapters(authorization: str | None = Header(default=None)):
        srv.check_admin(authorization)
        return {"object": "list", "data": engine.adapters.listing(detail=True),
                "max_resident": engine.adapters.max_resident or None}

    async def add_adapter(name: object, path: object, inplace: bool = False):
        """Load the adapter folder ``path`` (inside the adapter root) as ``name`` (default: the
        folder's name), or with ``inplace`` as the new version of ``name``; the one load path of both
        admin APIs; returns the adapter's entry. Raises ApiError / AdapterError."""
        if srv.root is None:
            raise ApiError(400, "the server was started without --adapters; no adapter root to load from",
                           param="path", code="no_adapter_root")
        path = resolve_under(srv.root, path)
        name = check_name(name if name is not None else path.name)
        if name in srv.base_names:
            raise ApiError(409, f"{name!r} is the base model's name", param="name", code="reserved_name")
        if not inplace:
            return await asyncio.wrap_future(engine.call(lambda: engine.adapters.add(name, path)))
        if name in srv.reloading:
            raise ApiError(409, f"an in-place reload of '{name}' is under way; retry once it is answered",
                           param="name", code="reload_in_progress")
        srv.reloading.add(name)
        try:
            return await asyncio.wrap_future(engine.call(lambda: engine.adapters.replace(name, path)))
        finally:
            srv.reloading.discard(name)

    def remove_adapter(name: object, param: str) -> str:
        """Take adapter ``name`` out of the catalog; its weights leave once no request uses them."""
        name = check_name(name, param)
        try:
            engine.adapters.remove(name)
        except KeyError:
            raise ApiError(404, f"no adapter named {name!r}; adapters: {engine.adapters.names()}",
                           param=param, code="model_not_found") from None
        engine.call(lambda: None)  # wake the worker: it unloads the adapter once no request uses it
        return name

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: P.AdapterLoadRequest, authorization: str | None = Header(default=None)):
        srv.check_admin(authorization)
        entry = await add_adapter(body.name, body.path)
        return P.model_card(entry.name, parent=base_name, resident=True, lora_int_id=entry.int_id)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, authorization: str | None = Header(default=None)):
        srv.check_admin(authorization)
        return {"id": remove_adapter(name, "name"), "object": "model", "deleted": True}

    # vLLM's runtime adapter API (same token, root and checks): 200 with a text message on success;
    # like vLLM, a name already loaded is a 400 (unless load_inplace) and an adapter folder that does
    # not exist a 404; load_inplace for a name not loaded loads it (as vLLM does).
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: P.LoraLoadRequest, authorization: str | None = Header(default=None)):
        srv.check_admin(authorization)
        if not body.lora_name or not body.lora_path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                           param="lora_path" if body.lora_name else "lora_name", code="missing_field")
        inplace = False if body.load_inplace is None else body.load_inplace
        if not isinstance(inplace, bool):
            raise ApiError(400, "'load_inplace' must be true or false", param="load_inplace", code="invalid_type")
        try:
            entry = await add_adapter(body.lora_name, body.lora_path, inplace)
        except (ApiError, AdapterError) as e:
            param = {"name": "lora_name", "path": "lora_path"}.get(e.param, e.param)
            if e.code == "adapter_exists":
                raise ApiError(400, f"The lora adapter '{body.lora_name}' has already been loaded. If you want "
                               "to load the adapter in place, set 'load_inplace' to True.",
                               param="lora_name", code="adapter_exists") from None
            if e.code == "adapter_not_found":
                status = 404  # vLLM's "No adapter found"
            else:
                status = 400 if e.status in (400, 409) and e.code != "reload_in_progress" else e.status
            raise ApiError(status, e.message, param, e.code) from None
        return PlainTextResponse(f"Success: LoRA adapter '{entry.name}' added successfully.",
                                 headers={"X-Lora-Int-Id": str(entry.int_id)})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: P.LoraLoadRequest, authorization: str | None = Header(default=None)):
        srv.check_admin(authorization)
        name, int_id = body.lora_name, body.lora_int_id
        if int_id is not None and (isinstance(int_id, bool) or not isinstance(int_id, int)):
            raise ApiError(400, "'lora_int_id' must be an integer", param="lora_int_id", code="invalid_type")
        if not name and int_id is None:
            raise ApiError(400, "'lora_name' or 'lora_int_id' must be provided.", param="lora_name",
                           code="missing_field")
        if int_id is not None:
            name = check_name(name, "lora_name") if name else None
            owner = engine.adapters.name_of(int_id)
            if owner is None or (name and name not in engine.adapters.names()):
                raise ApiError(404, f"No LoRA adapter with lora_int_id {int_id}." if owner is None else
                               f"The lora adapter '{name}' cannot be found.", param="lora_int_id" if owner is None
                               else "lora_name", code="model_not_found")
            if name and name != owner:
                raise ApiError(400, f"lora_int_id {int_id} is the adapter '{owner}', not '{name}'",
                               param="lora_int_id", code="lora_int_id_mismatch")
            name = owner
        try:
            name = remove_adapter(name, "lora_name")
        except ApiError as e:
            if e.status != 404:
                raise
            raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


async def _respond(srv: _Server, http: Request, body: P._Sampling, prompts: list[list[int]], max_tokens: int,
                   chat: bool):
    try:
        body.stops()
    except ValueError as e:
        raise ApiError(400, str(e), param="stop") from None
    if body.seed is None and (body.n or 1) > 1:
        body.seed = random.getrandbits(62)
    rid = http.state.request_id
    requests, queue = srv.submit(body.model, prompts, max_tokens, body, rid)
    rid = rid.replace("req-", "chatcmpl-" if chat else "cmpl-", 1)
    if not body.stream:
        choices, prompt_tokens, completion_tokens = await srv.collect(http, requests, queue)
        build = P.chat_body if chat else P.completion_body
        return build(rid, body.model, choices, prompt_tokens, completion_tokens)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(srv, http, requests, queue, rid, body.model, chat, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _stream(srv: _Server, http: Request, requests: list[GenRequest], queue: asyncio.Queue, rid: str,
                  model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    chunk = P.chat_chunk if chat else P.completion_chunk
    if chat:
        for i in range(len(requests)):
            yield _sse(chunk(rid, model, i, {"role": "assistant", "content": ""}, None))
    completion = 0
    async for index, ev in srv.events(http, requests, queue):
        if ev.kind == "text":
            yield _sse(chunk(rid, model, index, {"content": ev.text} if chat else ev.text, None))
        elif ev.kind == "done":
            completion += ev.completion_tokens
            yield _sse(chunk(rid, model, index, {} if chat else "", ev.finish_reason))
        else:
            yield _sse(P.error_body(ev.text, _TYPES.get(ev.status, "server_error"), None,
                                    "timeout" if ev.status == 504 else "generation_failed"))
            break
    if include_usage:
        yield _sse(chunk(rid, model, 0, {}, None, usage=(_prompt_tokens(requests), completion)))
    yield "data: [DONE]\n\n"


def _check_choices(prompts: int, body: P._Sampling) -> None:
    """Prompts x n is the number of batch rows one request takes: at most ``MAX_CHOICES``."""
    if prompts * (body.n or 1) > P.MAX_CHOICES:
        raise ApiError(400, f"{prompts} prompt(s) x n={body.n or 1} asks for {prompts * (body.n or 1)} "
                       f"completions; at most {P.MAX_CHOICES} per request", param="prompt" if prompts > 1 else "n",
                       code="too_many_choices")


def _prompt_tokens(requests: list[GenRequest]) -> int:
    """Prompt tokens counted once per distinct prompt (n choices share one prompt)."""
    return sum(len(p) for p in {id(r.prompt): r.prompt for r in requests}.values())
