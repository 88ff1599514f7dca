"""``lorakit generate`` / ``predict`` / ``serve`` load the base as an adapter's file records it was
trained (issue 21 item 6): an adapter saved from an NF4 base is applied on an NF4 base by default,
``--quantize`` overrides it, an adapter of another precision is refused unless
``--allow-precision-change``, and ``serve`` never silently serves fewer adapters than its folder holds.

A tiny random Llama (hidden 64: bitsandbytes' 4-bit blocks are 64 weights) with a byte-level
tokenizer, saved as a Hugging Face folder (test_serve_robust._save_tiny). Oracle: the library path
run by hand (transformers' from_pretrained, ``lorakit.quantize``, ``lorakit.load``, Hugging Face
greedy ``generate`` / the classifier's softmax), whose output the command must equal exactly.
"""

import json

import pytest
import torch

import lorakit

pytest.importorskip("bitsandbytes")
pytest.importorskip("fastapi")
from test_serve_robust import Running, _save_tiny  # noqa: E402

from lorakit.cli import main  # noqa: E402

PROMPT = "Once upon"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_adapter(model, dest, targets, seed, **config):
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=targets, **config), adapter="x")
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["x"].normal_(0, 0.3)
    return lorakit.save(model, dest, adapter="x")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The model folder; ``nf4``: an adapter on q_proj/v_proj saved from the base quantized to NF4 (every
    linear layer but the head, as ``lorakit train --quantize nf4`` holds it), ``full``: one saved from
    the full-precision base; ``cls``: a classifier adapter saved from the NF4 classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    base = tmp_path_factory.mktemp("quant_cli")
    folder = base / "tiny"
    _save_tiny(folder)
    nf4 = lorakit.quantize(AutoModelForCausalLM.from_pretrained(folder), "nf4")
    _random_adapter(nf4, base / "adapters" / "nf4", ["q_proj", "v_proj"], seed=1)
    _random_adapter(AutoModelForCausalLM.from_pretrained(folder), base / "full", "all-linear", seed=2)
    classifier = lorakit.quantize(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), "nf4")
    _random_adapter(classifier, base / "cls", ["q_proj", "v_proj"], seed=3, modules_to_save=["score"])
    (base / "cls" / "lorakit_task.json").write_text(json.dumps({"task": "classify", "model": str(folder),
                                                                 "labels": ["no", "yes"]}))
    return folder, base


@torch.no_grad()
def _library_answer(folder, adapter, quantize, n=6, allow=False):
    """The library path: quantize (default skip: the head) + load + greedy generate on the chat prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    if quantize:
        lorakit.quantize(model, quantize)
    if adapter is not None:
        lorakit.load(model, adapter, allow_precision_change=allow)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.eval().generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def _generate(capsys, folder, *options):
    capsys.readouterr()
    code = main(["generate", "--model", str(folder), "--max-new-tokens", "6", *options, PROMPT])
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_generate_holds_the_base_as_the_adapter_was_trained(world, capsys):
    """No --quantize: the NF4 adapter runs on an NF4 base, equal to the library path exactly; the
    adapter and the quantization both change the answer (so the equality is not vacuous)."""
    folder, base = world
    code, answer, err = _generate(capsys, folder, "--adapter", str(base / "adapters" / "nf4"))
    assert code == 0, err
    assert answer == _library_answer(folder, base / "adapters" / "nf4", "nf4")
    others = {_library_answer(folder, None, "nf4"), _library_answer(folder, base / "adapters" / "nf4", None,
                                                                        allow=True)}
    assert answer not in others, (answer, others)


def test_generate_quantize_overrides_and_another_precision_needs_allow(world, capsys):
    """--quantize none on the NF4 adapter: refused (exit 2, one line naming nf4 and the flag) before
    anything runs; with --allow-precision-change it runs, equal to the library's allowed load. A
    full-precision adapter with no option runs on the full-precision base; --quantize nf4 there is refused."""
    folder, base = world
    code, answer, err = _generate(capsys, folder, "--adapter", str(base / "adapters" / "nf4"), "--quantize", "none")
    assert code == 2 and answer == "" and err.count("\n") == 1 and "Traceback" not in err
    assert "in nf4" in err and "held in full precision" in err and "--allow-precision-change" in err
    code, answer, err = _generate(capsys, folder, "--adapter", str(base / "adapters" / "nf4"), "--quantize", "none",
                                  "--allow-precision-change")
    assert code == 0, err
    assert answer == _library_answer(folder, base / "adapters" / "nf4", None, allow=True)
    code, answer, err = _generate(capsys, folder, "--adapter", str(base / "full"))
    assert code == 0 and answer == _library_answer(folder, base / "full", None)
    code, _, err = _generate(capsys, folder, "--adapter", str(base / "full"), "--quantize", "nf4")
    assert code == 2 and "in full precision" in err and "held in nf4" in err


def test_generate_without_adapter_takes_quantize(world, capsys):
    folder, _ = world
    code, answer, err = _generate(capsys, folder, "--quantize", "nf4")
    assert code == 0 and answer == _library_answer(folder, None, "nf4")


@torch.no_grad()
def test_predict_holds_the_base_as_the_classifier_adapter_was_trained(world, capsys):
    """The NF4 classifier adapter (q/v adapted, head saved whole) on a base quantized as trained: every
    linear layer but the head, also those the adapter does not adapt; probabilities equal the library's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.train.tasks import predict
    folder, base = world
    texts = ["good news", "bad news today"]
    capsys.readouterr()
    assert main(["predict", "--adapter", str(base / "cls"), "--json", *texts]) == 0
    got = [json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()]
    model = lorakit.quantize(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), "nf4")
    lorakit.load(model, base / "cls")
    want = predict(model.eval(), AutoTokenizer.from_pretrained(folder), texts, ["no", "yes"])
    assert got == want
    assert main(["predict", "--adapter", str(base / "cls"), "--quantize", "int8", "x"]) == 2
    assert "trained on a base with" in capsys.readouterr().err


def _root(base, name, *adapters):
    import shutil
    root = base / name
    for adapter in adapters:
        shutil.copytree(base / adapter if adapter != "nf4" else base / "adapters" / "nf4", root / adapter.rsplit("/")[-1])
    return root


def test_serve_holds_the_base_as_its_adapters_were_trained(world):
    """--adapters with the NF4 adapter and no --quantize: the base in NF4; the completion equals the
    library path; /health counts 1 adapter, none skipped."""
    import httpx

    from lorakit.serve.server import build
    folder, base = world
    root = _root(base, "serve_nf4", "nf4")
    with Running(build(str(folder), root, log=lambda m: None)) as srv:
        assert httpx.get(srv.url + "/health").json()["adapters"] == 1
        r = srv.post("/v1/chat/completions", {"model": "nf4", "messages": [{"role": "user", "content": PROMPT}],
                                              "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == _library_answer(folder, root / "nf4", "nf4")


def test_serve_refuses_adapters_of_different_precisions_or_lists_them(world, capsys):
    """An NF4 and a full-precision adapter in one folder: refused naming both (exit 2, one base per
    server); --quantize nf4 refuses the full-precision one by name; with --skip-bad-adapters the
    server starts and lists it with its reason in /v1/models and /health."""
    import httpx

    from lorakit.serve.server import build
    folder, base = world
    root = _root(base, "serve_mixed", "nf4", "full")
    capsys.readouterr()
    assert main(["serve", "--model", str(folder), "--adapters", str(root)]) == 2
    err = capsys.readouterr().err
    assert "different precisions" in err and "full: full precision" in err and "nf4: nf4" in err
    assert main(["serve", "--model", str(folder), "--adapters", str(root), "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "cannot serve 1 adapter folder(s)" in err and "full: trained on a base with" in err
    assert "--skip-bad-adapters" in err and "Traceback" not in err
    logged = []
    with Running(build(str(folder), root, quantize="nf4", skip_bad=True, log=logged.append)) as srv:
        models = httpx.get(srv.url + "/v1/models").json()
        health = httpx.get(srv.url + "/health").json()
        assert [m["id"] for m in models["data"]][1:] == ["nf4"] and health["adapters"] == 1
        assert models["skipped"] == health["skipped"] and [s["name"] for s in health["skipped"]] == ["full"]
        assert "held in nf4" in health["skipped"][0]["reason"] and str(base) not in json.dumps(health)
        assert srv.post("/v1/completions", {"model": "full", "prompt": "Hi", "max_tokens": 2}).status_code == 404
    assert any("skipping full" in m for m in logged)


def test_serve_refuses_a_bad_adapter_folder_naming_it(world, capsys):
    """A folder that is an adapter but cannot be served (not JSON) stops the server from starting."""
    folder, base = world
    root = _root(base, "serve_bad", "nf4")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("not json {")
    (root / "notes").mkdir()  # not an adapter: no adapter_config.json, only logged
    capsys.readouterr()
    assert main(["serve", "--model", str(folder), "--adapters", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "cannot serve 1 adapter folder(s)" in err and "broken:" in err and "JSON" in err


def test_a_base_quantized_with_skips_is_reproduced_layer_for_layer(world, tmp_path):
    """An adapter saved from a base quantized with q_proj of layer 0 kept in full precision: the plan
    skips that layer and the head, and the base it builds holds exactly the trained base's quantized
    layers, in the same format. A record mixing formats is refused (one quantize call, one format)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorakit.pretrained import adapter_precision, apply_base_precision, plan_base_precision
    from lorakit.quant import quantized_paths
    folder, _ = world
    kept = "model.layers.0.self_attn.q_proj"
    trained = lorakit.quantize(AutoModelForCausalLM.from_pretrained(folder), "fp4", skip=["lm_head", kept])
    want = quantized_paths(trained)
    _random_adapter(trained, tmp_path / "a", ["q_proj", "v_proj"], seed=4)
    model = AutoModelForCausalLM.from_pretrained(folder)
    plan = plan_base_precision(model, {"a": tmp_path / "a"})
    assert (plan.fmt, plan.skip, plan.refused) == ("fp4", ("lm_head", kept), {})
    assert quantized_paths(apply_base_precision(model, plan)) == want
    lorakit.load(model, tmp_path / "a")  # the load's own precision check passes
    file = tmp_path / "a" / "adapter_model.safetensors"
    record = dict.fromkeys(want, "fp4") | {"model.layers.1.self_attn.q_proj": "int8"}
    save_file(load_file(file), file, metadata={"format": "pt", "lorakit_base_quantization": json.dumps(record)})
    with pytest.raises(lorakit.LoraError, match="layers in fp4 and int8"):
        adapter_precision(tmp_path / "a")
