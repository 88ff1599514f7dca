"""transformers' ``save_pretrained`` / ``Trainer.save_model`` on a model with lorakit adapters.

Oracle: the base model's own ``state_dict()`` before injection (bit for bit), transformers'
``from_pretrained(..., output_loading_info=True)`` (no missing, unexpected or mismatched keys), and
PEFT loading the adapter folder (outputs within 1e-5 of the largest magnitude, as in
test_peft_compat.py). Model: a tiny randomly initialised BERT (2 layers, hidden 16), LoRA r=2 on
query and value plus the pooler's dense layer trained whole (modules_to_save).
"""

import copy
import os
import pickle

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit import LoraConfig, LoraError  # noqa: E402

CFG = LoraConfig(r=2, alpha=4, targets=["query", "value"], modules_to_save=["pooler.dense"])
IDS = torch.tensor([[1, 5, 7, 19, 0, 3, 2], [2, 2, 11, 4, 9, 13, 40]])


@pytest.fixture
def base():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def _trained(base):
    """An injected copy of ``base`` whose adapter changes the output (non-zero B, an edited head)."""
    model = lorakit.inject(copy.deepcopy(base), CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g))
        model.pooler.dense.modules_to_save["default"].weight.add_(0.5)
    return model


def _out(model):
    with torch.no_grad():
        return model(IDS).pooler_output


def _close(actual, expected):
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5 * max(expected.abs().max().item(), 1.0), err


def _assert_base_checkpoint(directory, base):
    """``from_pretrained(directory)`` is ``base``: same keys in the same order, same bits, nothing reported."""
    loaded, info = transformers.AutoModel.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    want, got = base.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{k} differs from the base model"
    return loaded.eval()


def _assert_adapter_beside(directory, base, expected):
    """The adapter folder reproduces the injected model with lorakit and with PEFT."""
    folder = directory / "adapters" / "default"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (directory / "adapter_config.json").exists()  # else from_pretrained would attach it via PEFT
    assert torch.equal(_out(lorakit.load(copy.deepcopy(base), folder)), expected)
    _close(_out(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()), expected)


def test_save_pretrained_writes_the_base_model_and_the_adapter_beside_it(base, tmp_path):
    model = _trained(base)
    expected = _out(model)
    assert not torch.allclose(expected, _out(base)), "the adapter must change the output"
    keys = list(model.state_dict())
    model.save_pretrained(tmp_path)
    assert list(model.state_dict()) == keys  # state_dict keeps lorakit's keys (training checkpoints use them)
    assert any(".base_layer." in k for k in keys) and any(".lora_A." in k for k in keys)
    _assert_base_checkpoint(tmp_path, base)
    _assert_adapter_beside(tmp_path, base, expected)


def test_trainer_save_model(base, tmp_path):
    model = _trained(base)
    expected = _out(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    transformers.Trainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    _assert_base_checkpoint(tmp_path / "saved", base)
    _assert_adapter_beside(tmp_path / "saved", base, expected)


def test_save_pretrained_while_merged_saves_the_unmerged_base(base, tmp_path):
    model = _trained(base)
    expected = _out(model)
    lorakit.merge(model)
    model.save_pretrained(tmp_path)
    _assert_base_checkpoint(tmp_path, base)
    _assert_adapter_beside(tmp_path, base, expected)
    lorakit.unmerge(model)
    lorakit.merge(model, keep_copy=False)  # no exact copy of the base weight: refuse rather than guess
    with pytest.raises(LoraError, match=r"merge\(keep_copy=False\).*unmerge first, or save with merged=True"):
        model.save_pretrained(tmp_path / "inexact")


def test_save_pretrained_merged(base, tmp_path):
    model = _trained(base)
    expected = _out(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.save_pretrained(model, tmp_path, merged=True)
    for k, v in model.state_dict().items():  # the model is left as it was (unmerged, bit for bit)
        assert torch.equal(v, weights[k]), k
    assert lorakit.registry(model).merged == ()
    assert not (tmp_path / "adapters").exists()
    reference = lorakit.merge_and_unload(copy.deepcopy(model))
    loaded, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    _close(_out(loaded.eval()), expected)


def test_the_attribute_follows_the_model_and_goes_with_the_last_adapter(base, tmp_path):
    model = _trained(base)
    unpickled = pickle.loads(pickle.dumps(model))
    assert unpickled.save_pretrained.model is unpickled
    clone = copy.deepcopy(model)
    assert clone.save_pretrained.model is clone
    with pytest.raises(LoraError, match="push_to_hub"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    plain = lorakit.merge_and_unload(model)
    assert "save_pretrained" not in plain.__dict__
    lorakit.delete(clone, "default")
    assert "save_pretrained" not in clone.__dict__
    clone.save_pretrained(tmp_path)  # the class's own method again
    _assert_base_checkpoint(tmp_path, base)
