"""vLLM's runtime adapter API on ``lorakit serve``: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (issue 15).

A real uvicorn server (in a thread) serves a tiny random Llama folder; every request goes over raw
``http.client``. Oracles: vLLM's documented answers (200 with a text message; 400 for a missing
field or a name already loaded; 404 for an adapter folder or a name that does not exist), our admin
rules (401/403 for the token, 400 for a path outside the adapter root), and Hugging Face
``generate`` run alone with the adapter for the completion served under the loaded name.
"""

import http.client
import json

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
