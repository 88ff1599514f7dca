"""vLLM's runtime adapter API on ``lorakit serve``: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (issue 15).

A real uvicorn server (in a thread) serves a tiny random Llama folder; every request goes over raw
``http.client``. Oracles: vLLM's documented answers (200 with a text message; 400 for a missing
field or a name already loaded; 404 for an adapter folder or a name that does not exist), our admin
rules (401/403 for the token, 400 for a path outside the adapter root), and Hugging Face
``generate`` run alone with the adapter for the completion served under the loaded name.

``load_inplace`` and ``lora_int_id`` (issue 21): vLLM's semantics as in
vllm/entrypoints/openai/models/serving.py (``OpenAIServingModels.load_lora_adapter``: the id kept
by an in-place reload; ``load_inplace`` for a name not loaded loads it), and lorakit's decision for
requests in flight: rows already generating finish on the weights they started with, waiting ones
start on the new version. The swap is made to land mid-generation deterministically by holding the
engine's worker between two steps; oracle: HF ``generate`` alone with each version.
"""

import copy
import http.client
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")

from test_serve_robust import AUTH, TOKEN, Running, _adapter, _alone, _save_tiny, one_thread  # noqa: E402, F401

from lorakit.serve.server import build  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The model folder, an adapter root with ``a`` (served from the start) and ``extra/late`` (loaded
    at run time), and an adapter outside the root."""
    base = tmp_path_factory.mktemp("vllm_api")
    model = base / "tiny"
    _save_tiny(model)
    root = base / "adapters"
    _adapter(model, root / "a", seed=1)
    _adapter(model, root / "extra" / "late", r=2, targets=["q_proj", "v_proj", "down_proj"], seed=5)
    _adapter(model, base / "outside" / "good", seed=3)
    return model, root, base


def _call(srv, path, body, headers=AUTH, raw=None):
    """(status, content type, body as text) of a raw HTTP POST."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.request("POST", path, raw if raw is not None else json.dumps(body).encode(),
                     {"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read().decode()
    finally:
        conn.close()


def _models(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("GET", "/v1/models")
    names = {m["id"] for m in json.loads(conn.getresponse().read())["data"]}
    conn.close()
    return names


def test_load_use_unload_like_vllm(world):
    model, root, base = world
    with Running(build(str(model), root, TOKEN, log=lambda m: None)) as srv:
        status, ctype, text = _call(srv, "/v1/load_lora_adapter",
                                    {"lora_name": "late", "lora_path": str(root / "extra" / "late")})
        assert (status, text) == (200, "Success: LoRA adapter 'late' added successfully.")
        assert ctype.startswith("text/plain")
        assert _models(srv) == {"tiny", "a", "late"}
        status, _, text = _call(srv, "/v1/completions", {"model": "late", "prompt": "Hello", "max_tokens": 6,
                                                          "temperature": 0})
        assert status == 200, text
        want = _alone(model, root / "extra", "late", "Hello", 6)
        assert json.loads(text)["choices"][0]["text"] == want != _alone(model, root, None, "Hello", 6)
        # a relative path (to the adapter root) works too, under another name
        status, _, text = _call(srv, "/v1/load_lora_adapter", {"lora_name": "late2", "lora_path": "extra/late"})
        assert (status, text) == (200, "Success: LoRA adapter 'late2' added successfully.")
        status, _, text = _call(srv, "/v1/unload_lora_adapter", {"lora_name": "late"})
        assert (status, text) == (200, "Success: LoRA adapter 'late' removed successfully.")
        assert _models(srv) == {"tiny", "a", "late2"}
        status, _, text = _call(srv, "/v1/completions", {"model": "late", "prompt": "Hello", "max_tokens": 2})
        assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
        # unloaded names can be loaded again; adapters served from the start can be unloaded
        status, _, _ = _call(srv, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "extra/late"})
        assert status == 200
        assert _call(srv, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 200
        assert _models(srv) == {"tiny", "late", "late2"}
        status, _, text = _call(srv, "/v1/completions", {"model": "late", "prompt": "Hello", "max_tokens": 6,
                                                          "temperature": 0})
        assert status == 200 and json.loads(text)["choices"][0]["text"] == want


def test_errors_like_vllm_under_the_admin_rules(world):
    model, root, base = world
    (root / "empty").mkdir(exist_ok=True)
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    late = {"lora_name": "late", "lora_path": "extra/late"}
    with Running(build(str(model), root, TOKEN, log=lambda m: None)) as srv:
        cases = [  # (path, body, headers, status, error code, param)
            (load, {"lora_path": "extra/late"}, AUTH, 400, "missing_field", "lora_name"),
            (load, {"lora_name": "late"}, AUTH, 400, "missing_field", "lora_path"),
            (load, {"lora_name": "", "lora_path": "extra/late"}, AUTH, 400, "missing_field", "lora_name"),
            (load, {"lora_name": "../x", "lora_path": "extra/late"}, AUTH, 400, "invalid_adapter", "lora_name"),
            (load, {"lora_name": 3, "lora_path": "extra/late"}, AUTH, 400, "invalid_adapter", "lora_name"),
            (load, {"lora_name": "x", "lora_path": 3}, AUTH, 400, "invalid_adapter", "lora_path"),
            (load, {"lora_name": "x", "lora_path": "../outside/good"}, AUTH, 400, "path_outside_root", "lora_path"),
            (load, {"lora_name": "x", "lora_path": str(base / "outside" / "good")}, AUTH, 400, "path_outside_root",
             "lora_path"),
            (load, {"lora_name": "x", "lora_path": "nope"}, AUTH, 404, "adapter_not_found", "lora_path"),
            (load, {"lora_name": "x", "lora_path": "empty"}, AUTH, 404, "adapter_not_found", "lora_path"),
            (load, {"lora_name": "a", "lora_path": "extra/late"}, AUTH, 400, "adapter_exists", "lora_name"),
            (load, {"lora_name": "tiny", "lora_path": "extra/late"}, AUTH, 400, "reserved_name", "lora_name"),
            (load, late, {}, 401, "missing_token", None),
            (load, late, {"Authorization": "Bearer wrong"}, 403, "invalid_token", None),
            (unload, {}, AUTH, 400, "missing_field", "lora_name"),
            (unload, {"lora_name": "nope"}, AUTH, 404, "model_not_found", "lora_name"),
            (unload, {"lora_name": "a/../b"}, AUTH, 400, "invalid_adapter", "lora_name"),
            (unload, {"lora_name": "a"}, {}, 401, "missing_token", None),
            (unload, {"lora_name": "a"}, {"Authorization": "Bearer wrong"}, 403, "invalid_token", None),
        ]
        for path, body, headers, status, code, param in cases:
            got, ctype, text = _call(srv, path, body, headers)
            err = json.loads(text)["error"]
            assert (got, err["code"], err["param"]) == (status, code, param), (path, body, text)
            assert err["message"] and ctype.startswith("application/json") and str(root) not in text
        assert "has already been loaded" in _call(srv, load, {"lora_name": "a", "lora_path": "extra/late"})[2]
        assert "cannot be found" in _call(srv, unload, {"lora_name": "nope"})[2]
        got, _, text = _call(srv, load, None, raw=b"{not json")
        assert got == 400 and json.loads(text)["error"]["code"] == "invalid_json"
        assert _models(srv) == {"tiny", "a"}  # nothing above changed the served set
        assert _call(srv, "/v1/completions", {"model": "a", "prompt": "Hi", "max_tokens": 2})[0] == 200
    with Running(build(str(model), root, None, log=lambda m: None)) as srv:  # no --admin-token: disabled
        for path, body in ((load, late), (unload, {"lora_name": "a"})):
            got, _, text = _call(srv, path, body)
            assert (got, json.loads(text)["error"]["code"]) == (403, "admin_disabled")
    with Running(build(str(model), None, TOKEN, log=lambda m: None)) as srv:  # no --adapters: nothing to load
        got, _, text = _call(srv, load, late)
        assert (got, json.loads(text)["error"]["code"]) == (400, "no_adapter_root")


# -- load_inplace and lora_int_id (issue 21 item 5) ------------------------------------------------------
def test_engine_load_inplace_swaps_between_steps_running_rows_finish_on_the_old_weights(tmp_path):
    """Deterministic, on the engine: the reload is queued from the running row's 3rd token and held
    until a second request (accepted before the swap) waits in the queue. Oracle: HF generate alone."""
    from test_serve import FakeTok, _random_adapters, _tiny_llama
    from test_serve import _alone as alone_ids

    from lorakit.serve.adapters import Adapters
    from lorakit.serve.engine import Engine, Request

    ref = _tiny_llama()
    served = copy.deepcopy(ref)
    _random_adapters(ref, tmp_path, {"v1": (4, "all-linear"), "v2": (2, ["q_proj", "v_proj", "down_proj"])}, std=0.3)
    adapters = Adapters(served, tmp_path)
    old = adapters.add("live", tmp_path / "v1")
    engine = Engine(served, FakeTok(), adapters, max_batch=4)
    ids1, ids2, ids3 = [10, 20, 30, 40], [50, 60], [70, 80, 90]
    want1 = alone_ids(ref, ids1, "v1", 12)
    assert len(want1) == 12 and 2 not in want1  # runs all 12 steps: the swap lands mid-generation
    entered, gate, swap, done = threading.Event(), threading.Event(), [], {}

    def pause_then_reload():
        entered.set()
        gate.wait(30)
        return adapters.replace("live", tmp_path / "v2")

    def request(ids, entry, n, key):
        done[key] = threading.Event()
        texts = []

        def emit(e):
            if e.kind != "text":
                done[key].set()
            elif key == 1 and len(texts) == 2 and not swap:
                swap.append(engine.call(pause_then_reload))  # on the worker, after the row's 3rd token
            texts.append(e)
        return Request(ids, emit, adapter=entry, max_tokens=n, temperature=0.0)

    engine.start()
    try:
        r1 = request(ids1, adapters.acquire("live"), 12, 1)
        engine.submit(r1)
        assert entered.wait(30) and engine.pending() == (1, 0)  # the worker holds between two steps, r1 running
        r2 = request(ids2, adapters.acquire("live"), 6, 2)  # accepted before the swap: waits in the queue
        engine.submit(r2)
        gate.set()
        new = swap[0].result(30)
        assert new is not old and new.int_id == old.int_id == 1 and adapters.names() == ["live"]
        r3 = request(ids3, adapters.acquire("live"), 6, 3)
        engine.submit(r3)
        assert all(done[k].wait(60) for k in (1, 2, 3))
        assert r1.tokens == want1 != alone_ids(ref, ids1, "v2", 12)  # started on v1: finished on v1
        assert r2.tokens == alone_ids(ref, ids2, "v2", 6) and r3.tokens == alone_ids(ref, ids3, "v2", 6)
        deadline = time.monotonic() + 10
        while old.internal is not None and time.monotonic() < deadline:
            engine.call(lambda: None).result(10)
            time.sleep(0.02)
        assert old.internal is None and adapters.resident == [new]  # the old weights left once r1 finished
        assert (old.holders, old.rows, new.holders, new.rows) == (0, 0, 0, 0)
    finally:
        gate.set()
        engine.stop()


@pytest.fixture(scope="module")
def versions(world):
    """Two versions of an adapter and a broken one, inside the adapter root (nested: not served at start)."""
    model, root, _ = world
    _adapter(model, root / "versions" / "v1", seed=11)
    _adapter(model, root / "versions" / "v2", r=2, targets=["q_proj", "v_proj"], seed=12)
    broken = root / "versions" / "broken"
    _adapter(model, broken, seed=13)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    return root / "versions"


def _post(srv, path, body):
    """(status, body as text, X-Lora-Int-Id)."""
    import httpx
    r = httpx.post(srv.url + path, json=body, headers=AUTH, timeout=60)
    return r.status_code, r.text, r.headers.get("x-lora-int-id")


def _cards(srv):
    import httpx
    return {m["id"]: m.get("lora_int_id") for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]}


def _hold(engine):
    """Hold the engine's worker between two steps until the returned event is set."""
    entered, gate = threading.Event(), threading.Event()
    engine.call(lambda: (entered.set(), gate.wait(30)))
    assert entered.wait(30)
    return gate


def test_load_inplace_keeps_the_int_id_and_a_running_stream_finishes_on_the_old_weights(world, versions):
    import httpx
    model, root, _ = world
    load = "/v1/load_lora_adapter"
    v1_long = _alone(model, versions, "v1", "Hello", 60)
    with Running(build(str(model), root, TOKEN, log=lambda m: None)) as srv:
        engine = srv.app.state.server.engine
        assert _cards(srv) == {"tiny": None, "a": 1}  # ids in the order of loading (by name at start)
        status, text, int_id = _post(srv, load, {"lora_name": "live", "lora_path": "versions/v1"})
        assert (status, text, int_id) == (200, "Success: LoRA adapter 'live' added successfully.", "2")
        entered, gate, accept = threading.Event(), threading.Event(), engine._accept

        def hold_after_third_token(r, token):  # the worker holds between two steps, the stream mid-way
            if len(r.tokens) == 2 and not entered.is_set():
                engine.call(lambda: (entered.set(), gate.wait(30)))
            return accept(r, token)
        engine._accept = hold_after_third_token
        chunks = []

        def stream():
            body = {"model": "live", "prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
                chunks.extend(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                              if line.startswith("data: {"))
        reader = threading.Thread(target=stream)
        answers = []
        reload = threading.Thread(target=lambda: answers.append(
            _post(srv, load, {"lora_name": "live", "lora_path": "versions/v2", "load_inplace": True})))
        try:
            reader.start()
            assert entered.wait(60) and engine.pending()[0] == 1  # the stream is generating
            reload.start()
            time.sleep(0.2)  # the reload is queued behind the hold: it runs between two of the stream's steps
        finally:
            gate.set()
            engine._accept = accept
        reload.join(60)
        reader.join(120)
        assert answers == [(200, "Success: LoRA adapter 'live' added successfully.", "2")]
        assert "".join(chunks) == v1_long  # started on v1, finished on v1
        body = {"model": "live", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        got = srv.post("/v1/completions", body).json()["choices"][0]["text"]
        assert got == _alone(model, versions, "v2", "Hello", 6) != v1_long[: len(got)]
        assert _cards(srv) == {"tiny": None, "a": 1, "live": 2}
        deadline = time.monotonic() + 10  # v1's weights leave once the stream is done
        while sum(e.name == "live" for e in engine.adapters.resident) != 1 and time.monotonic() < deadline:
            engine.call(lambda: None).result(10)
            time.sleep(0.05)
        assert sorted(e.name for e in engine.adapters.resident) == ["a", "live"]
        # load_inplace for a name that is not loaded loads it, as vLLM does; a new id
        assert _post(srv, load, {"lora_name": "fresh", "lora_path": "versions/v1", "load_inplace": True})[::2] == (200, "3")
        # unload by lora_int_id alone, or with a matching name
        assert _post(srv, "/v1/unload_lora_adapter", {"lora_int_id": 3})[:2] == (
            200, "Success: LoRA adapter 'fresh' removed successfully.")
        assert _post(srv, "/v1/unload_lora_adapter", {"lora_name": "live", "lora_int_id": 2})[0] == 200
        assert _cards(srv) == {"tiny": None, "a": 1}
        assert srv.counts() == {"a": (0, 0)}


def test_load_inplace_abuse_gets_4xx_and_the_adapter_keeps_serving(world, versions):
    model, root, _ = world
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    body = {"model": "live", "prompt": "Hi", "max_tokens": 5, "temperature": 0}
    with Running(build(str(model), root, TOKEN, log=lambda m: None)) as srv:
        assert _post(srv, load, {"lora_name": "live", "lora_path": "versions/v1"})[0] == 200
        want = srv.post("/v1/completions", body).json()["choices"][0]["text"]
        assert want == _alone(model, versions, "v1", "Hi", 5)
        live = {"lora_name": "live", "load_inplace": True}
        cases = [  # (path, body, status, error code, param)
            (load, {**live, "lora_path": "versions/nope"}, 404, "adapter_not_found", "lora_path"),
            (load, {**live, "lora_path": "versions/broken"}, 400, "invalid_adapter", None),
            (load, {**live, "lora_path": "../outside/good"}, 400, "path_outside_root", "lora_path"),
            (load, {**live, "lora_path": "versions/v2", "load_inplace": "yes"}, 400, "invalid_type", "load_inplace"),
            (load, {"lora_name": "live", "lora_path": "versions/v2"}, 400, "adapter_exists", "lora_name"),
            (load, {**live, "lora_name": "tiny", "lora_path": "versions/v2"}, 400, "reserved_name", "lora_name"),
            (unload, {"lora_int_id": 99}, 404, "model_not_found", "lora_int_id"),
            (unload, {"lora_int_id": "3"}, 400, "invalid_type", "lora_int_id"),
            (unload, {"lora_int_id": True}, 400, "invalid_type", "lora_int_id"),
            (unload, {"lora_name": "a", "lora_int_id": 2}, 400, "lora_int_id_mismatch", "lora_int_id"),
            (unload, {"lora_name": "nope", "lora_int_id": 2}, 404, "model_not_found", "lora_name"),
        ]
        for path, req, status, code, param in cases:
            got, text, _ = _post(srv, path, req)
            err = json.loads(text)["error"]
            assert (got, err["code"], err["param"]) == (status, code, param), (req, text)
            assert str(root) not in text
        # concurrent reloads of one name: the second is refused while the first waits for the worker
        gate = _hold(srv.app.state.server.engine)
        answers = []
        first = threading.Thread(target=lambda: answers.append(_post(srv, load, {**live, "lora_path": "versions/v1"})))
        try:
            first.start()
            deadline = time.monotonic() + 10
            while "live" not in srv.app.state.server.reloading and time.monotonic() < deadline:
                time.sleep(0.01)
            got, text, _ = _post(srv, load, {**live, "lora_path": "versions/v2"})
            assert (got, json.loads(text)["error"]["code"]) == (409, "reload_in_progress")
        finally:
            gate.set()
        first.join(60)
        assert answers[0][::2] == (200, "2")
        # nothing above changed what "live" serves, nor the served set
        assert srv.post("/v1/completions", body).json()["choices"][0]["text"] == want
        assert _cards(srv) == {"tiny": None, "a": 1, "live": 2}
