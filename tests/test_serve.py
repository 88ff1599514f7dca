"""``lorakit serve``: the engine on a tiny random Llama (fast), then the real server (a
``lorakit serve`` subprocess with SmolLM2-135M on 127.0.0.1) through the official ``openai``
client and raw HTTP (``slow``). The oracle is always Hugging Face ``generate`` run alone, greedy,
with the request's adapter active: served outputs must equal it token for token.
"""

import concurrent.futures
import copy
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import lorakit
from lorakit.serve.adapters import AdapterError, Adapters, check_name, discover, resolve_under
from lorakit.serve.engine import Engine, QueueFull, Request
from lorakit.serve.metrics import Metrics
from lorakit.serve.text import TextStream

pytest.importorskip("fastapi")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the server: two Python threads each driving an OpenMP team
    crawl on a busy 2-core machine (barriers wait for descheduled helpers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeTok:
    """Character tokenizer: id = 3 + code point (ids 0-2 special; 2 = EOS)."""

    eos_token_id, chat_template = 2, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True, **_):
        return "".join(chr(i - 3) if i >= 3 else "" for i in ids)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _random_adapters(model, root, specs, std):
    """Inject each adapter (spec: ``(r, targets)`` or a LoraConfig), randomize its lora_B (N(0, std))
    and its modules_to_save copies (+ N(0, 1)), and save it under root/<name>."""
    from lorakit.model import saved_modules
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        cfg = spec if isinstance(spec, lorakit.LoraConfig) else lorakit.LoraConfig(r=spec[0], targets=spec[1])
        lorakit.inject(model, cfg, adapter=name)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                if name in layer.lora_B:
                    layer.lora_B[name].normal_(0, std)
            for _, wrapper in saved_modules(model):
                if name in wrapper.modules_to_save:  # a copy that really differs from the base's
                    wrapper.modules_to_save[name].weight.add_(torch.randn_like(wrapper.base_layer.weight))
        lorakit.save(model, root / name, adapter=name)
    lorakit.set_active(model, [])


@torch.no_grad()
def _alone(model, ids, name, n):
    """Greedy ids from HF generate with only ``name`` active (None: the base model)."""
    lorakit.set_active(model, [name] if name else [])
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    lorakit.set_active(model, [])
    new = out[0, len(ids):].tolist()
    return new[:new.index(2) + 1] if 2 in new else new


def _run(engine, jobs, gap=0.0):
    """Submit ``(ids, entry, max_tokens, temperature, seed)`` jobs ``gap`` s apart; wait; requests back."""
    done, requests = [], []
    for ids, entry, n, temp, seed in jobs:
        ev = threading.Event()
        requests.append(Request(ids, lambda e, ev=ev: ev.set() if e.kind != "text" else None, adapter=entry,
                                max_tokens=n, temperature=temp, seed=seed))
        done.append(ev)
        engine.submit(requests[-1])
        time.sleep(gap)
    assert all(ev.wait(60) for ev in done)
    return requests


# -- units ---------------------------------------------------------------------------------------
def test_text_stream_holds_back_stop_prefixes():
    tok = FakeTok()
    s = TextStream(tok, stop=["END", "xyz"])
    out = [s.add(i) for i in tok("abcEN")["input_ids"]]
    assert "".join(out) == "abc"                      # "EN" could start "END": held back
    assert s.add(tok("D")["input_ids"][0]) == "" and s.stopped and s.text == "abcEN"[:3]
    s = TextStream(tok, stop=["END"])
    assert "".join(s.add(i) for i in tok("aENx")["input_ids"]) + s.flush() == "aENx"


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.inc("lorakit_requests_total", outcome="ok")
    m.observe("lorakit_batch_size", 3)
    m.gauges["lorakit_queue_depth"] = lambda: 5
    text = m.render()
    assert 'lorakit_requests_total{outcome="ok"} 1' in text and "lorakit_queue_depth 5" in text
    assert 'lorakit_batch_size_bucket{le="4"} 1' in text and "lorakit_batch_size_count 1" in text


def test_adapter_names_and_paths_stay_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "ok", outside / "x"):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    (root / "link").symlink_to(outside / "x")
    assert resolve_under(root, "ok") == (root / "ok").resolve()
    for bad in ("../outside/x", str(outside / "x"), "link", "ok/../../outside/x", ".", "missing", ""):
        with pytest.raises(AdapterError) as e:
            resolve_under(root, bad)
        assert e.value.status == 400
    for bad in ("../a", "a/b", "a.b", "", "x" * 200, 3):
        with pytest.raises(AdapterError):
            check_name(bad)
    assert list(discover(root)) == ["ok"]  # the symlink leaves the root: not discovered


# -- the engine on a tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_adapters")
    ref = _tiny_llama()
    served = copy.deepcopy(ref)
    specs = {"a": (4, "all-linear"), "b": (2, ["q_proj", "v_proj"]), "c": (8, ["down_proj", "o_proj"])}
    _random_adapters(ref, root, specs, std=0.3)
    return ref, served, root


def test_engine_batches_across_adapters_equal_to_alone(tiny):
    ref, served, root = tiny
    adapters = Adapters(served, root)
    for name, path in discover(root).items():
        adapters.add(name, path)
    engine = Engine(served, FakeTok(), adapters, max_batch=4)
    engine.start()
    try:
        g = torch.Generator().manual_seed(0)
        names = [None, "a", "b", "c", "a", None, "c", "b", "a", "c"]
        jobs = [(torch.randint(3, 400, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
                 adapters.acquire(n) if n else None, 4 + i % 5, 0.0, None) for i, n in enumerate(names)]
        alone = [_alone(ref, ids, name, n) for (ids, _, n, _, _), name in zip(jobs, names)]
        got = _run(engine, jobs, gap=0.01)  # staggered: rows join and leave between steps; max 4 rows
        assert [r.tokens for r in got] == alone
        jobs = [(ids, adapters.acquire(n) if n else None, k, 0.0, None) for (ids, _, k, _, _), n in zip(jobs, names)]
        got = _run(engine, jobs)  # all at once: prompts of different lengths prefilled together, left-padded
        assert [r.tokens for r in got] == alone
        steps = engine.metrics.histograms["lorakit_batch_size"]
        assert steps.sum > steps.count  # rows really shared decode steps
        # sampling: a seed makes a request reproducible
        s1, s2 = (_run(engine, [([5, 6, 7], adapters.acquire("a"), 6, 0.9, 7)])[0].tokens for _ in range(2))
        assert s1 == s2
        assert engine.metrics.value("lorakit_requests_total", outcome="ok") == 2 * len(jobs) + 2
    finally:
        engine.stop()


def test_engine_lru_eviction_reload_and_delete_in_flight(tiny):
    ref, _, root = tiny
    served = _tiny_llama()
    metrics = Metrics()
    adapters = Adapters(served, root, max_resident=2, metrics=metrics)
    for name, path in discover(root).items():
        adapters.register(name, path)
    engine = Engine(served, FakeTok(), adapters, max_batch=8, metrics=metrics)
    engine.start()
    try:
        names = ["a", "b", "c", "a", "c", "b"] * 2
        jobs = [([10 + i, 20, 30], adapters.acquire(n), 6, 0.0, None) for i, n in enumerate(names)]
        got = _run(engine, jobs)
        assert [r.tokens for r in got] == [_alone(ref, j[0], n, 6) for j, n in zip(jobs, names)]
        assert len(adapters.resident) <= 2 and metrics.value("lorakit_adapter_loads_total") >= 4
        # delete while a request runs on it: the request finishes on its adapter, then it is unloaded
        entry = adapters.acquire("a")
        gate = threading.Event()
        engine.call(gate.wait)  # hold the worker so the request is still queued when "a" is deleted
        done = threading.Event()
        r = Request([7, 8, 9], lambda e: done.set() if e.kind != "text" else None, adapter=entry, max_tokens=5,
                    temperature=0.0)
        engine.submit(r)
        adapters.remove("a")
        assert "a" not in adapters.names()
        gate.set()
        assert done.wait(30) and r.tokens == _alone(ref, [7, 8, 9], "a", 5)
        deadline = time.monotonic() + 10  # the unload happens in the worker's housekeeping after the row retires
        while entry.internal is not None and time.monotonic() < deadline:
            engine.call(lambda: None).result(10)
            time.sleep(0.02)
        assert entry.internal is None and "a" not in [e.name for e in adapters.resident]
    finally:
        engine.stop()


def test_engine_serves_modules_to_save_adapters_in_mixed_batches(tmp_path):
    """Adapters carrying modules_to_save (their own lm_head / embed_tokens) were refused at load; now
    their rows share prefill and decode steps with other adapters' rows and the base's, and each
    equals HF generate run alone with only its adapter active."""
    ref = _tiny_llama()
    specs = {"m": lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
             "n": lorakit.LoraConfig(r=2, targets="all-linear", modules_to_save=["embed_tokens"]),
             "a": lorakit.LoraConfig(r=8, targets=["o_proj", "down_proj"])}
    _random_adapters(ref, tmp_path, specs, std=0.3)
    served = _tiny_llama()
    adapters = Adapters(served, tmp_path)
    for name, path in discover(tmp_path).items():
        adapters.add(name, path)
    engine = Engine(served, FakeTok(), adapters, max_batch=8)
    engine.start()
    try:
        g = torch.Generator().manual_seed(1)
        names = ["m", None, "n", "a", "m", "n", None, "a", "m"]
        jobs = [(torch.randint(3, 400, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist(),
                 adapters.acquire(n) if n else None, 6, 0.0, None) for n in names]
        alone = [_alone(ref, ids, name, k) for (ids, _, k, _, _), name in zip(jobs, names)]
        assert alone[0] != _alone(ref, jobs[0][0], None, 6) and alone[2] != _alone(ref, jobs[2][0], None, 6)
        got = _run(engine, jobs)  # all at once: one prefill, shared decode steps
        assert [r.tokens for r in got] == alone
        steps = engine.metrics.histograms["lorakit_batch_size"]
        assert steps.sum > steps.count
        got = _run(engine, [(ids, adapters.acquire(n) if n else None, k, 0.0, None)
                            for (ids, _, k, _, _), n in zip(jobs, names)], gap=0.01)  # joining and leaving
        assert [r.tokens for r in got] == alone
    finally:
        engine.stop()
    # checked at start-up without loading, then loaded, evicted (copies deleted) and reloaded: 2 resident
    served, metrics = _tiny_llama(), Metrics()
    adapters = Adapters(served, tmp_path, max_resident=2, metrics=metrics)
    for name, path in discover(tmp_path).items():
        adapters.register(name, path)
    engine = Engine(served, FakeTok(), adapters, max_batch=8, metrics=metrics)
    engine.start()
    try:
        got = _run(engine, [(ids, adapters.acquire(n) if n else None, k, 0.0, None)
                            for (ids, _, k, _, _), n in zip(jobs, names)])
        assert [r.tokens for r in got] == alone
        assert metrics.value("lorakit_adapter_evictions_total") >= 1 and len(adapters.resident) <= 2
    finally:
        engine.stop()


def test_http_queue_full_429_timeout_504_and_validation(tiny):
    from fastapi.testclient import TestClient

    from lorakit.serve.app import create_app
    served = _tiny_llama()
    engine = Engine(served, FakeTok(), Adapters(served, None), max_queue=2, timeout=0.5)
    engine.start()
    gate = threading.Event()
    engine.call(gate.wait)  # the worker is busy: requests stay queued
    with TestClient(create_app(engine, FakeTok(), "tiny")) as client:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        slow = concurrent.futures.ThreadPoolExecutor(1).submit(client.post, "/v1/completions", json=body)
        time.sleep(0.7)
        engine.submit(Request([5, 6], lambda e: None, max_tokens=1))  # the queue is now full
        with pytest.raises(QueueFull):
            engine.submit(Request([5, 6], lambda e: None, max_tokens=1))
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        gate.set()
        r = slow.result(30)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={**body, "prompt": "x" * 300}).status_code == 400
        r = client.post("/v1/completions", json={**body, "max_tokens": 1.5})
        assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
        r = client.post("/v1/completions", json={**body, "logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        assert client.post("/v1/adapters", json={"path": "x"}).status_code == 403  # no admin token configured
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2
    assert not engine.alive


# -- the real server: SmolLM2, 8 adapters (one saved by PEFT), the openai client ------------------
TOKEN = "s3cret"
SPECS = {"a0": (8, "all-linear"), "a1": (4, ["q_proj", "v_proj"]), "a2": (2, ["o_proj", "down_proj"]),
         "a3": (8, ["gate_proj", "up_proj"]), "a4": (1, "all-linear"), "a5": (16, ["k_proj", "q_proj"]),
         "a6": (4, ["down_proj"])}
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite food is",
           "The sky is blue because", "Water boils at", "In 1492, Columbus", "The best way to learn is",
           "Cats and dogs are", "import numpy as np\n", "Tomorrow I will", "The meaning of life is",
           "A haiku about rain:", "The quick brown fox", "Dear Sir or Madam,", "Three colours:"]
N = 8  # tokens per request


class World:
    """The server subprocess, its adapter root and a reference model with the same adapters."""

    def __init__(self, root, proc, port, ref, tok):
        self.root, self.proc, self.ref, self.tok = root, proc, ref, tok
        self.url = f"http://127.0.0.1:{port}"
        self.refs: dict[tuple, str] = {}

    def alone(self, model, prompt, chat=False):
        """Greedy text of the request run alone with HF generate (memoized)."""
        key = (model, prompt, chat)
        if key not in self.refs:
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True) if chat else prompt
            ids = self.tok(text, add_special_tokens=not chat)["input_ids"]
            new = _alone(self.ref, ids, None if model == "smollm2" else model, N)
            self.refs[key] = self.tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.refs[key]

    def client(self):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=180)

    def metric(self, name):
        """Sum of a metric's samples (``name`` may carry labels: ``x{a="b"}``)."""
        import httpx
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if not line.startswith("#") and (key == name or ("{" not in name and key.startswith(name + "{"))):
                total += float(value)
        return total

    def rss_mb(self):
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20


def _load_plan(wave):
    models = ["smollm2", *SPECS, "p7"] if wave == 1 else ["smollm2", *[m for m in SPECS if m != "a6"], "p7", "late"]
    return [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(32)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import httpx
    import peft

    from lorakit.train.tasks import load_model
    root = tmp_path_factory.mktemp("adapters")
    ref, tok = load_model("builtin:smollm2", "causal-lm")
    _random_adapters(ref, root, SPECS, std=0.05)
    _random_adapters(ref, root / "extra", {"late": (4, "all-linear")}, std=0.05)  # loaded at run time
    pm = peft.get_peft_model(load_model("builtin:smollm2", "causal-lm")[0],
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    pm.save_pretrained(root / "p7")
    del pm
    lorakit.load(ref, root / "p7", adapter="p7")
    lorakit.set_active(ref, [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--adapters", str(root), "--port",
                             str(port), "--threads", "1", "--admin-token", TOKEN, "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    w = World(root, proc, port, ref.eval(), tok)
    try:
        for wave in (1, 2):  # references computed while the server starts
            for model, prompt in _load_plan(wave):
                w.alone(model, prompt)
        for _ in range(240):
            try:
                if httpx.get(w.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, (root / "server.log").read_text()
            time.sleep(0.5)
        yield w
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_openai_client_completions_chat_streaming(world):
    client = world.client()
    assert {m.id for m in client.models.list().data} == {"smollm2", *SPECS, "p7"}
    assert world.alone("a0", PROMPTS[0]) != world.alone("smollm2", PROMPTS[0])  # adapters change outputs
    r = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == world.alone("a0", PROMPTS[0]) and r.usage.completion_tokens <= N
    r = client.completions.create(model="p7", prompt=PROMPTS[:2], max_tokens=N, temperature=0)
    assert [c.text for c in r.choices] == [world.alone("p7", p) for p in PROMPTS[:2]]
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="a2", messages=msgs, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == world.alone("a2", "Hi", chat=True)
    chunks = list(client.chat.completions.create(model="a2", messages=msgs, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    chunks = list(client.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == world.alone("a1", PROMPTS[1])
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # stop strings end the text before them; a seed makes sampling reproducible
    full = world.alone("a1", PROMPTS[1])
    stop = full.strip().split()[1]
    r = client.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="a3", prompt=PROMPTS[2], max_tokens=N, temperature=1.0, top_p=0.9, seed=3)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


@pytest.mark.slow
def test_bad_requests_get_precise_errors_and_the_server_keeps_serving(world):
    import httpx
    url, auth = world.url, {"Authorization": f"Bearer {TOKEN}"}
    ok = {"model": "a0", "prompt": "Hi", "max_tokens": 2}
    (world.root.parent / "outside").mkdir(exist_ok=True)
    cases = [  # (method, path, kwargs, status, error code or param)
        ("POST", "/v1/completions", dict(json={**ok, "model": "nope"}), 404, "model_not_found"),
        ("POST", "/v1/completions", dict(content=b"{not json", headers={"content-type": "application/json"}),
         400, "invalid_json"),
        ("POST", "/v1/completions", dict(json={**ok, "max_tokens": "8"}), 422, "max_tokens"),
        ("POST", "/v1/chat/completions", dict(json={"model": "a0", "messages": "hi"}), 422, "messages"),
        ("POST", "/v1/completions", dict(json={**ok, "temperature": 5}), 422, "temperature"),
        ("POST", "/v1/completions", dict(json={**ok, "prompt": "hello " * 9000}), 400, "context_length_exceeded"),
        ("POST", "/v1/adapters", dict(json={"path": "extra/late"}), 401, "missing_token"),
        ("POST", "/v1/adapters", dict(json={"path": "extra/late"}, headers={"Authorization": "Bearer no"}), 403,
         "invalid_token"),
        ("POST", "/v1/adapters", dict(json={"path": "../outside"}, headers=auth), 400, "path_outside_root"),
        ("POST", "/v1/adapters", dict(json={"path": "/etc"}, headers=auth), 400, "path_outside_root"),
        ("POST", "/v1/adapters", dict(json={"path": "extra/late", "name": "../x"}, headers=auth), 400, "name"),
        ("POST", "/v1/adapters", dict(json={"path": "a0", "name": "a0"}, headers=auth), 409, "adapter_exists"),
        ("DELETE", "/v1/adapters/nope", dict(headers=auth), 404, "model_not_found"),
        ("DELETE", "/v1/adapters/a0", dict(), 401, "missing_token"),
    ]
    for method, path, kwargs, status, what in cases:
        r = httpx.request(method, url + path, timeout=30, **kwargs)
        err = r.json()["error"]
        assert r.status_code == status and what in (err["code"], err["param"]), (path, kwargs, r.text)
        assert err["message"] and err["type"]
    assert "a0" in httpx.post(url + "/v1/completions", json={**ok, "model": "nope"}).json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**ok, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and world.alone("a0", "Hi").startswith(r.json()["choices"][0]["text"])
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_client_disconnect_mid_stream_frees_the_slot(world):
    import httpx
    cancelled = world.metric("lorakit_requests_total{outcome=\"cancelled\"}")
    body = {"model": "a4", "prompt": "Once upon a time", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", world.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    for _ in range(100):
        if world.metric("lorakit_active_requests") == 0:
            break
        time.sleep(0.1)
    assert world.metric("lorakit_active_requests") == 0
    assert world.metric("lorakit_requests_total{outcome=\"cancelled\"}") == cancelled + 1


@pytest.mark.slow
def test_load_32_clients_8_adapters_with_churn(world):
    """32 concurrent clients over base + 8 adapters; "late" is loaded and "a6" deleted mid-traffic.
    0 failures, every response equal to the request run alone, RSS stable across waves."""
    import httpx
    client, auth = world.client(), {"Authorization": f"Bearer {TOKEN}"}
    pool = concurrent.futures.ThreadPoolExecutor(32)

    def ask(i, model, prompt):
        kw = dict(model=model, prompt=prompt, max_tokens=N, temperature=0)
        if i % 4 == 3:  # a quarter of the clients stream
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    def wave(n, during=None):
        plan = _load_plan(n)
        finished = world.metric("lorakit_requests_total")
        futures = [pool.submit(ask, i, m, p) for i, (m, p) in enumerate(plan)]
        if during:  # once every request is accepted (queued, running or done), change the adapters
            while world.metric("lorakit_queue_depth") + world.metric("lorakit_active_requests") \
                    + world.metric("lorakit_requests_total") - finished < len(plan):
                time.sleep(0.05)
            during()
        concurrent.futures.wait(futures)
        failures = [f.exception() for f in futures if f.exception()]
        assert not failures, failures[:3]
        wrong = [(m, p) for f, (m, p) in zip(futures, plan) if f.result() != world.alone(m, p)]
        assert not wrong, wrong

    def churn():
        r = httpx.post(world.url + "/v1/adapters", json={"path": "extra/late"}, headers=auth, timeout=60)
        assert r.status_code == 201, r.text
        assert httpx.delete(world.url + "/v1/adapters/a6", headers=auth).status_code == 200

    t0 = time.perf_counter()
    wave(1, during=churn)
    assert {m.id for m in client.models.list().data} == {"smollm2", *SPECS, "p7", "late"} - {"a6"}
    r = httpx.post(world.url + "/v1/completions", json={"model": "a6", "prompt": "x"})
    assert r.status_code == 404
    rss = []
    for n in (2, 2, 2):
        wave(n)
        rss.append(world.rss_mb())
    elapsed = time.perf_counter() - t0
    assert world.metric("lorakit_adapters_resident") == 8  # a6's weights left once its requests finished
    print(f"load test: 4 waves x 32 requests in {elapsed:.1f} s; server RSS after waves 2-4: "
          f"{[round(x) for x in rss]} MB")
    assert max(rss) - rss[0] < 64, rss  # no growth beyond allocator noise
