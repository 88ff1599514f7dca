"""Gradient checkpointing with lorakit adapters (also on a quantized base) and the chunked causal-LM loss.

Oracles: the same model trained without checkpointing (the gradients must not change), and
transformers' own causal-LM loss on the full logits."""

import pytest
import torch

import lorakit
from lorakit.train.loop import TrainConfig, fit

transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _batch(seed=3, n=3, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # right padding on one row
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _adapted(quantize=None, dropout=0.0):
    model = _llama()
    if quantize:
        pytest.importorskip("bitsandbytes")
        lorakit.quantize(model, quantize)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", dropout=dropout))
    with torch.no_grad():  # B != 0, so that A's gradient is not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


def _grads(model, batch, checkpointing: bool, seed=0):
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(seed)  # dropout draws the same masks in both runs
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("quantize,dropout", [(None, 0.0), (None, 0.1), ("nf4", 0.0), ("int8", 0.0)])
def test_checkpointing_leaves_the_adapter_gradients_unchanged(quantize, dropout):
    batch = _batch()
    loss_plain, plain = _grads(_adapted(quantize, dropout), batch, False)
    model = _adapted(quantize, dropout)
    loss_ckpt, ckpt = _grads(model, batch, True)
    assert model.model.gradient_checkpointing and model.model.layers[0].gradient_checkpointing
    assert plain.keys() == ckpt.keys() and all("lora_" in n for n in plain)
    assert len(plain) == 2 * 7 * 2  # A and B on 7 linear layers per block, 2 blocks: every adapter trains
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    for n in plain:
        assert ckpt[n].abs().max() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)  # the frozen base gets nothing


def test_fit_with_grad_checkpointing_trains_like_without():
    """``TrainConfig(grad_checkpointing=True)`` through :func:`fit`: same adapter after 3 steps."""
    data = [{k: v[i] for k, v in _batch(seed=5, n=6).items()} for i in range(6)]
    collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    out = {}
    for ckpt in (False, True):
        model = _adapted()
        fit(model, data, collate=collate, loss_fn=lambda m, b: m(**b).loss, progress=False,
            cfg=TrainConfig(epochs=1, batch_size=2, lr=1e-2, grad_checkpointing=ckpt, warmup=0))
        out[ckpt] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        assert model.model.gradient_checkpointing == ckpt
    for n in out[False]:
        torch.testing.assert_close(out[True][n], out[False][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("argv,expected", [([], False), (["--quantize", "nf4"], True),
                                           (["--quantize", "nf4", "--no-gradient-checkpointing"], False),
                                           (["--gradient-checkpointing"], True), (["--grad-checkpointing"], True)])
def test_cli_checkpointing_is_on_by_default_with_quantize(monkeypatch, argv, expected):
    from lorakit import cli
    seen = {}
    monkeypatch.setattr(cli, "_run_task", lambda args, lm, common: seen.update(common))
    assert cli.main(["train", "--task", "causal-lm", *argv]) == 0
    assert seen["train"].grad_checkpointing is expected


# -- the chunked causal-LM loss ---------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_causal_lm_loss_equals_transformers_loss_and_gradients(checkpointing):
    from lorakit.train.lm_loss import causal_lm_loss, head_is_plain
    batch = _batch(n=4, t=16)
    model = _adapted(dropout=0.0).double()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert head_is_plain(model, batch) and model.training
    expected = model(**batch).loss  # transformers' own loss over the full logits: the oracle
    expected.backward()
    oracle = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    loss = causal_lm_loss(model, batch, chunk=5)  # several chunks and a short last one
    assert labelled % 5 != 0 and labelled > 10
    loss.backward()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=0)
    with torch.no_grad():  # the default chunk (16 MiB of logits: all positions here) and the no-grad path
        torch.testing.assert_close(causal_lm_loss(model, batch), expected.detach().float(), rtol=1e-6, atol=0)
    for n, g in oracle.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-9, atol=1e-12, msg=n)


def test_head_is_plain_false_for_a_model_that_caps_its_logits():
    from lorakit.train.lm_loss import head_is_plain
    cfg = transformers.Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    final_logit_softcapping=0.5, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg)
    assert not head_is_plain(model, _batch())
    assert head_is_plain(_llama(), _batch())
    dropping = _llama()
    dropping.config.attention_dropout = 0.5  # read at forward time: training-mode forwards differ by dropout
    for layer in dropping.model.layers:
        layer.self_attn.attention_dropout = 0.5
    assert head_is_plain(dropping.train(), _batch()) and dropping.training  # same masks in both forwards
