"""``lorakit serve --quantize nf4`` end to end: a ``lorakit serve`` subprocess on a tiny random Llama
folder (built as in test_serve_robust.py) with an adapter saved from the same model quantized to
NF4. Oracle: the raw HTTP answer against Hugging Face ``generate`` run alone (greedy) on the model
that the library loads and quantizes the same way, with the adapter loaded by ``lorakit.load``."""

import pytest
import torch

import lorakit

pytest.importorskip("fastapi")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow  # a server subprocess and three model loads: ~2 min on the busy 2 cores
from test_serve_robust import _save_tiny, serve_subprocess  # noqa: E402


@torch.no_grad()
def _generate(folder, adapter, prompt, n):
    from lorakit.train.tasks import load_model
    model, tok = load_model(str(folder), "causal-lm", quantize="nf4")
    if adapter is not None:
        lorakit.load(model, adapter, adapter="x")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = model.eval().generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_serve_quantize_nf4_answers_like_the_library(tmp_path):
    import httpx

    from lorakit.train.tasks import load_model
    folder, root = tmp_path / "tiny", tmp_path / "adapters"
    _save_tiny(folder)
    model, _ = load_model(str(folder), "causal-lm", quantize="nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets="all-linear"), adapter="x")
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["x"].normal_(0, 0.3)
    lorakit.save(model, root / "q", adapter="x")
    proc, url = serve_subprocess(tmp_path, folder, root, "--quantize", "nf4")
    try:
        names = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        assert "q" in names, names
        base_name = next(n for n in names if n != "q")
        texts = []
        for name, adapter in (("q", root / "q"), (base_name, None)):
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": name, "prompt": "Once upon", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
            assert texts[-1] == _generate(folder, adapter, "Once upon", 8), name
        assert texts[0] != texts[1]  # the adapter really applies
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in (tmp_path / "server.log").read_text()
