"""examples/trainer.py: a lorakit-injected model trains under transformers.Trainer (tiny BERT, CPU, a few
steps) and Trainer.save_model writes the untouched base model plus the adapter in PEFT's format, which PEFT
itself loads to the trained model's outputs."""

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_distributed import tiny_bert_no_dropout  # noqa: F401  (a fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer.py"


def test_trainer_trains_the_adapter_and_saves_it_in_peft_format(tmp_path, tiny_bert_no_dropout):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    spec = importlib.util.spec_from_file_location("trainer_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    model, tok, labels = example.train(tiny_bert_no_dropout, out, max_steps=4, batch_size=8, lr=1e-2, n_train=64,
                                       log=False)

    # the base model Trainer wrote is the pretrained one, bit for bit (only the adapter and head trained)
    base = load_file(str(Path(tiny_bert_no_dropout) / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    for k, v in base.items():
        assert torch.equal(saved["bert." + k if "bert." + k in saved else k], v), k
    adapter = out / "adapters" / "default"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # trained (B starts at 0)

    # PEFT reads the adapter onto a fresh base: the trained model's outputs (PEFT's tolerance, see README)
    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(out, num_labels=len(labels))
    peft_model = PeftModel.from_pretrained(fresh, adapter).eval()
    model.eval()
    batch = tok(["shares rose after the results", "the match ended in a draw"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = model(**batch).logits, peft_model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(want.abs().max().item(), 1))
