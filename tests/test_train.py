"""The training loop: determinism, resume-after-kill, LoRA+, schedules, accumulation; data errors;
and short real runs of both `lorakit train` tasks (slow)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.cli import main as cli
from lorakit.train import TrainConfig, fit
from lorakit.train.data import DataError, read_labelled, read_prompts
from lorakit.train.loop import _lr_factor


def _problem(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0", "2"], dropout=dropout))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, generator=g), int(i % 3)) for i in range(100)]
    collate = lambda items: {"x": torch.stack([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}  # noqa
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    return model, data, collate, loss_fn


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CFG = TrainConfig(epochs=3, batch_size=8, lr=1e-2, save_every=5, log_every=1)


def test_training_reduces_loss_and_only_trains_adapters():
    model, data, collate, loss_fn = _problem()
    base = {n: p.clone() for n, p in model.state_dict().items() if "lora_" not in n}
    before = loss_fn(model, collate(data)).item()
    records = fit(model, data, collate=collate, loss_fn=loss_fn, cfg=TrainConfig(epochs=20, batch_size=10, lr=3e-2),
                  progress=False)
    assert loss_fn(model, collate(data)).item() < 0.7 * before
    assert all(torch.equal(base[n], p) for n, p in model.state_dict().items() if n in base)
    assert records[-1]["step"] == 20 * 10


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, dropout):
    model, data, collate, loss_fn = _problem(dropout=dropout)
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=CFG, out_dir=tmp_path / "a", progress=False)
    expected = _weights(model)

    model, data, collate, loss_fn = _problem(dropout=dropout)
    calls = {"n": 0}

    def dying(m, b):
        calls["n"] += 1
        if calls["n"] == 23:  # mid-way between checkpoints (every 5 steps)
            raise KeyboardInterrupt
        return loss_fn(m, b)

    with pytest.raises(KeyboardInterrupt):
        fit(model, data, collate=collate, loss_fn=dying, cfg=CFG, out_dir=tmp_path / "b", progress=False)
    model, data, collate, loss_fn = _problem(dropout=dropout)  # a fresh process: same base weights ...
    with torch.no_grad():  # ... but adapter weights and RNG states that the checkpoint must replace
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    torch.manual_seed(99)
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=CFG, out_dir=tmp_path / "b", resume=True, progress=False)
    for n, w in _weights(model).items():
        assert torch.equal(w, expected[n]), n
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 39 and len(steps) == len(set(steps))


def test_resume_after_sigkill_of_a_real_process(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from safetensors.torch import save_file
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_train import _problem, CFG
        from lorakit.train import fit
        model, data, collate, loss_fn = _problem()
        slow = lambda m, b: (time.sleep(0.05), loss_fn(m, b))[1]
        fit(model, data, collate=collate, loss_fn=slow if sys.argv[1] == "slow" else loss_fn, cfg=CFG,
            out_dir=sys.argv[2], resume=True, progress=False)
        save_file({{n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}, sys.argv[3])
    """))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), "slow", str(out), str(tmp_path / "x.pt")])
    for _ in range(400):  # wait for the second checkpoint, then kill -9
        meta = out / "checkpoint" / "state.json"
        if meta.exists() and json.loads(meta.read_text())["step"] >= 10:
            break
        proc.poll()
        assert proc.returncode is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, str(script), "fast", str(out), str(tmp_path / "resumed.pt")], check=True)
    model, data, collate, loss_fn = _problem()
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=CFG, progress=False)
    from safetensors.torch import load_file
    resumed = load_file(tmp_path / "resumed.pt")
    for n, w in _weights(model).items():
        assert torch.equal(resumed[n], w), n


def test_lora_plus_schedule_and_accumulation():
    model, data, collate, loss_fn = _problem()
    seen = []
    fit(model, data[:16], collate=collate, loss_fn=lambda m, b: (seen.append(None), loss_fn(m, b))[1],
        cfg=TrainConfig(epochs=1, batch_size=4, grad_accum=2, lora_plus_ratio=16, lr=1e-3), progress=False)
    assert len(seen) == 4  # 2 optimizer steps x 2 micro-batches
    # LoRA+: B's group gets ratio x the learning rate of A's group
    from lorakit.train.loop import _param_groups
    groups = _param_groups(model, TrainConfig(lr=1e-3, lora_plus_ratio=16))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"]) and groups[1]["lr"] == pytest.approx(16e-3)
    assert all("lora_A" in names[id(p)] for p in groups[0]["params"]) and groups[0]["lr"] == pytest.approx(1e-3)
    # warm-up then cosine to 0; linear; constant
    cfg = TrainConfig(warmup=0.1, schedule="cosine")
    assert _lr_factor(0, 100, cfg) == pytest.approx(0.1) and _lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert _lr_factor(55, 100, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert _lr_factor(99, 100, TrainConfig(warmup=0, schedule="linear")) == pytest.approx(0.01)
    assert _lr_factor(70, 100, TrainConfig(warmup=0, schedule="constant")) == 1.0


def test_gradient_accumulation_equals_the_big_batch():
    results = []
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        model, data, collate, loss_fn = _problem()
        fit(model, data[:8], collate=collate, loss_fn=loss_fn, cfg=TrainConfig(epochs=1, batch_size=batch,
            grad_accum=accum, lr=1e-2, warmup=0), progress=False)
        results.append(_weights(model))
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], atol=1e-6, rtol=1e-5)


# -- progress: a bar on a terminal, whole lines in a log file ------------------------------------------
def test_progress_in_a_log_file_is_whole_lines(monkeypatch):
    """stdout and stderr into one file (``> log 2>&1``, nohup, CI): no carriage-return bar, and the
    evaluation lines are not written into a progress line."""
    import io
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stdout", log)
    monkeypatch.setattr(sys, "stderr", log)
    model, data, collate, loss_fn = _problem()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, log_every=5)  # 13 steps per epoch, 26 in all
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, evaluate=lambda m: {"loss": 1.0}, progress=True)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text, text
    lines = text.splitlines()
    progress = [line for line in lines if re.fullmatch(r"step \d+/26 \(\d+%\): loss [\d.]+, lr [\d.e+-]+, "
                                                         r"[\d.]+ ex/s, \d+:\d\d:\d\d elapsed, ~\d+:\d\d:\d\d left",
                                                         line)]
    assert [int(line.split()[1].split("/")[0]) for line in progress] == [5, 10, 15, 20, 25, 26], text
    assert [line for line in lines if line not in progress] == ["step 13: loss=1.0000", "step 26: loss=1.0000"], text
    log.seek(0)
    log.truncate()
    model, data, collate, loss_fn = _problem()
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, evaluate=lambda m: {"loss": 1.0}, progress=False)
    assert log.getvalue().splitlines() == ["step 13: loss=1.0000", "step 26: loss=1.0000"]  # no progress lines


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    import io

    from lorakit.train import loop

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(loop._progress(10, 0, True), loop._Bar)
    assert isinstance(loop._progress(10, 0, False), loop._Lines)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(loop._progress(10, 0, True), loop._Lines)


# -- bad input: a clear error naming the file and line, before any training ------------------------
@pytest.mark.parametrize("name,content,message", [
    ("a.csv", "text,lbl\nhello,x\n", r"a.csv, line 1: missing column 'label' \(the label column, set by "
                                      r"--label-column\); the file's columns are 'text', 'lbl'"),
    ("a.csv", "", r"a.csv: the file is empty"),
    ("a.csv", "text,label\n", r"a.csv: the file has a header but no rows"),
    ("a.csv", "text,label\nfine,x\n,y\n", r"a.csv, line 3: column 'text' is empty"),
    ("a.csv", "text,label,text\nfine,x,y\n", r"a.csv, line 1: column\(s\) \['text'\] appear more than once"),
    ("a.csv", 'text,label\nfine,x\n"multi\nline, cell",y,z\n', r"a.csv, line 3: 3 cells, expected 2"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"\n', r"a.jsonl, line 2: not valid JSON"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r"a.jsonl, line 2: missing column 'label' "
                                                               r"\(the label column, set by --label-column\); "
                                                               r"this row's columns are 'text'"),
    ("a.jsonl", '["text"]\n', r"a.jsonl, line 1: expected a JSON object"),
    ("a.txt", "x", r"unknown file type '.txt'"),
])
def test_malformed_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_labelled(path)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"text,label\nok,x\ncaf\xe9,y\n")
    with pytest.raises(DataError, match=r"a.csv, line 3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        read_labelled(path)
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_cli_reports_bad_data_before_training(tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,x\nb,y\nc,x\n")
    val = tmp_path / "val.csv"
    val.write_text("text,label\nd,x\ne,z\n")
    code = cli(["train", "--data", str(train), "--val-data", str(val), "--test-data", str(val),
                "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "val.csv, line 3: label 'z' does not occur in the training data" in err
    assert not (tmp_path / "out").exists()
    assert cli(["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_cli_help_documents_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--targets", "--rank", "--alpha", "--dropout", "--epochs", "--batch-size", "--lr",
                   "--lora-plus-ratio", "--max-length", "--out", "--seed", "--threads", "--resume"):
        assert option in text


# -- real models (slow) -------------------------------------------------------------------------------
@pytest.mark.slow
def test_classify_minilm_on_bbc_learns_and_saves_a_loadable_adapter(tmp_path, capsys):
    from lorakit.train.loop import load_checkpoint_weights
    from lorakit.train.tasks import LoraSpec, _prepare, classify, load_model
    lora = LoraSpec(r=8)
    # one evaluation, at the last step: the saved adapter is then the last step's weights (= checkpoint/)
    result = classify(tmp_path, lora=lora, train=TrainConfig(epochs=1, batch_size=16, lr=2e-3, max_steps=40),
                      max_length=64, progress=False, log=lambda *_: None)
    assert result["test_accuracy"] >= result["test_accuracy_before"] + 0.3, result
    assert result["trainable_params"] == 73_728 + 384 * 5 + 5  # q,v r=8 (6 layers) + classifier head
    for name in ("metrics.jsonl", "curve.png", "summary.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).exists(), name
    # the saved adapter reproduces the trained model's predictions: a fresh model + lorakit.load gives the
    # logits of a fresh model holding the trained parameters copied raw from the training checkpoint
    texts = ["Chelsea win the league on the final day", "Shares fall as the bank cuts its forecast",
             "The new phone's chip doubles battery life", "MPs vote on the budget tonight",
             "The film tops the box office for a third week"]

    def logits(model, tok):
        model.eval()
        with torch.no_grad():
            return model(**tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits

    trained, tok = load_model("builtin:minilm", "classify", num_labels=5)
    _prepare(trained, lora, ["classifier"])
    load_checkpoint_weights(tmp_path / "checkpoint", trained)
    reloaded, _ = load_model("builtin:minilm", "classify", num_labels=5)
    lorakit.load(reloaded, tmp_path / "adapter")
    expected = logits(trained, tok)
    torch.testing.assert_close(logits(reloaded, tok), expected, rtol=0, atol=1e-5)
    with lorakit.disabled(reloaded):  # the LoRA factors matter, not only the saved head
        assert (logits(reloaded, tok) - expected).abs().max() > 0.1
    # `lorakit predict` gives the same labels and probabilities
    capsys.readouterr()  # (drop the training's output)
    assert cli(["predict", "--adapter", str(tmp_path / "adapter"), "--json", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    labels = result["labels"]
    assert [r["label"] for r in rows] == [labels[i] for i in expected.argmax(-1).tolist()]
    probs = torch.tensor([[r["probabilities"][lab] for lab in labels] for r in rows])
    torch.testing.assert_close(probs, expected.softmax(-1), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_classify_is_reproducible_from_its_seed(tmp_path):
    """Same seed, same run: the new head's init, the data order and the result, whatever the
    global RNG did before."""
    from lorakit.train.tasks import LoraSpec, classify
    runs = []
    for i, noise in enumerate((0, 1000)):
        torch.rand(noise)  # unrelated use of the global RNG in between
        out = tmp_path / str(i)
        runs.append(classify(out, lora=LoraSpec(r=4), train=TrainConfig(epochs=1, batch_size=8, lr=2e-3,
                             max_steps=3, seed=5), max_length=32, progress=False, log=lambda *_: None))
        runs[-1]["weights"] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert runs[0]["test_accuracy_before"] == runs[1]["test_accuracy_before"]
    assert runs[0]["test_loss"] == runs[1]["test_loss"]
    a, b = runs[0]["weights"], runs[1]["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_causal_lm_smollm2_learns_and_generate_uses_the_adapter(tmp_path, capsys):
    from lorakit.train.tasks import LoraSpec, causal_lm, generate, load_model
    result = causal_lm(tmp_path, lora=LoraSpec(("all-linear",), r=8),
                       train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, max_steps=12), train_limit=96,
                       eval_limit=24, progress=False, log=lambda *_: None)
    # it learns: the validation loss of the answer tokens falls by more than a third
    assert result["val_loss"] < 0.67 * result["val_loss_before"], result
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "val" and records[-1]["perplexity"] < 50
    # `lorakit generate --adapter` answers as the merged model does, and not as the base model does
    prompts = [BBC.format(h) for h in ("Chelsea win the league title", "Oil price hits a record high",
                                       "Band announces a world tour", "Minister resigns over leaked memo")]
    answers = {}
    capsys.readouterr()  # (drop the training's output)
    for name, extra in (("adapter", ["--adapter", str(tmp_path / "adapter")]), ("base", [])):
        assert cli(["generate", *extra, "--max-new-tokens", "4", *prompts]) == 0
        answers[name] = capsys.readouterr().out.splitlines()
    model, tok = load_model("builtin:smollm2", "causal-lm")
    lorakit.load(model, tmp_path / "adapter")
    lorakit.merge(model)
    merged = "\n".join(a.strip() for a in generate(model, tok, prompts, max_new_tokens=4)).splitlines()
    assert answers["adapter"] == merged
    assert answers["adapter"] != answers["base"], answers


BBC = ("Which topic is this BBC News headline about? Answer with one word: business, entertainment, politics, "
       "sport or tech.\nHeadline: {}")


def test_resume_refuses_optimizer_state_numbered_for_other_parameters(tmp_path):
    # AdamW stores its moments by position; a checkpoint whose positions mean other parameters (another version's
    # grouping, e.g. LoRA+ moving biases to B's group) must be refused, not loaded into the wrong parameters.
    model, data, collate, loss_fn = _problem()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, save_every=5, log_every=1)
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path / "a", progress=False)
    ckpt = tmp_path / "a" / "checkpoint"
    meta = json.loads((ckpt / "state.json").read_text())
    meta["param_names"] = meta["param_names"][::-1]
    (ckpt / "state.json").write_text(json.dumps(meta))
    model, data, collate, loss_fn = _problem()
    before = _weights(model)
    with pytest.raises(lorakit.LoraError, match="numbered for other parameters"):
        fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path / "a", resume=True,
            progress=False)
    assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())
    # a checkpoint without names (older lorakit) whose moments do not fit their parameters' shapes
    del meta["param_names"]
    (ckpt / "state.json").write_text(json.dumps(meta))
    tensors = load_file(ckpt / "state.safetensors")
    shapes = {k: t.shape for k, t in tensors.items() if k.startswith("opt.") and k.endswith(".exp_avg")}
    a, b = [k for k in shapes if shapes[k] != shapes[next(iter(shapes))]][:1] + [next(iter(shapes))]
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, str(ckpt / "state.safetensors"))
    with pytest.raises(lorakit.LoraError, match="does not fit this model's parameters"):
        fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path / "a", resume=True,
            progress=False)
