"""Devices and data-parallel training under torchrun (2 CPU processes, gloo): the choice of device,
sharding, a 2-process run against the 1-process run with the same global batch, a rank that dies,
resume under torchrun (also with another world size), and `lorakit train --nproc 2` on both tasks."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import save_tiny_bert, tiny_llama  # noqa: F401  (tiny_llama: a fixture)

from lorakit import LoraError
from lorakit import distributed as D
from lorakit.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "dist_job.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Options of the tiny job: a global batch of 7 over 2 ranks (shares of 4 and 3) with 2 micro-batches per
# step, 100 examples (the last step of each epoch has 2 examples: one per rank, the second micro-batch none).
OPTS = {"batch_size": 7, "grad_accum": 2}


def _run(out, options, nproc=None, timeout=120):
    """The tiny job in one process (nproc None) or under torchrun; returns the finished process."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *launcher, str(JOB), str(out), json.dumps(options)],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def _gloo_threads_left(out, nproc=2) -> dict[int, list[str]]:
    """Each rank's gloo threads still running after ``teardown`` (dist_job.py's OUT/threads.RANK.json).

    A gloo group that outlived ``teardown`` (FSDP2 kept references to it) ran its threads into interpreter
    exit, where its destruction now and then aborted the rank ("terminate called without an active
    exception", SIGABRT): teardown must end them."""
    if sys.platform != "linux":
        pytest.skip("thread names are read from /proc")
    left = {r: json.loads((out / f"threads.{r}.json").read_text()) for r in range(nproc)}
    return {r: [n for n in names if "gloo" in n] for r, names in left.items() if any("gloo" in n for n in names)}


def _result(out):
    return load_file(str(out / "final.safetensors")), json.loads((out / "records.json").read_text())


# -- devices ----------------------------------------------------------------------------------------
def test_resolve_device_picks_the_accelerator_and_the_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(LoraError, match="no CUDA device"):
        D.resolve_device("cuda")
    with pytest.raises(LoraError, match="MPS backend is not available"):
        D.resolve_device("mps")
    with pytest.raises(LoraError, match="expected one of auto, cpu, cuda, mps"):
        D.resolve_device("gpu")

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert D.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert D.resolve_device("auto") == torch.device("cuda", 3)
    assert D.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(LoraError, match="LOCAL_RANK 4 but only 4 CUDA device"):
        D.resolve_device("cuda")


@pytest.mark.parametrize("argv", [["generate", "--device", "cuda", "hello"],
                                  ["serve", "--device", "cuda", "--model", "/no/such/model"]])
def test_cli_device_error_is_one_line(capsys, argv):
    # serve refuses the device before loading anything (the model path does not exist either)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorakit {argv[0]}: error: device 'cuda': no CUDA device is available here "
                   f"(torch {torch.__version__}); use --device cpu"]


def test_shard_splits_contiguously_and_completely(monkeypatch):
    for world in (1, 2, 3, 5):
        for n in (0, 1, 2, 7, 10):
            parts = []
            for r in range(world):
                monkeypatch.setattr(D, "rank", lambda r=r: r)
                monkeypatch.setattr(D, "world_size", lambda w=world: w)
                parts.append(list(D.shard(list(range(n)))))
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# -- data parallel ------------------------------------------------------------------------------------
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks with shares of the batch take the steps of 1 process with the whole batch.

    Not bit for bit: one process sums the batch's gradient in one backward pass, two ranks each sum
    their share and the all-reduce adds the two partial sums, a different order of fp32 additions
    (relative rounding ~6e-8 per addition); AdamW's normalised steps keep that at the same scale
    over the run. Measured: 1.5e-8 on the adapter after 16 steps, 1.2e-7 on a logged loss. Tolerance:
    1e-6 absolute + 1e-5 relative, far below one step's change (~1e-2 at lr 1e-2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    p1, p2 = _run(one, OPTS), _run(two, OPTS, nproc=2)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    (w1, r1), (w2, r2) = _result(one), _result(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] and r1[-1]["step"] == 16
    for a, b in zip(r1, r2):
        assert a["split"] == b["split"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert w1.keys() == w2.keys() and len(w1) == 4  # lora_A, lora_B and the saved module's weight and bias
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    assert w1["0.lora_B.default"].abs().max() > 1e-3  # trained (B starts at 0)
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))  # lorakit.save's PEFT file, from rank 0
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # rank 0 alone writes and prints: one line per evaluation, and one metrics file with every step
    assert p2.stdout.count("step 5: loss=") == 1
    assert len((two / "metrics.jsonl").read_text().splitlines()) == len(r2)
    assert _gloo_threads_left(two) == {}


def test_a_rank_that_dies_stops_the_job_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _run(full, OPTS, nproc=2).returncode == 0
    t0 = time.perf_counter()
    p = _run(broken, {**OPTS, "fail_rank": 1, "fail_step": 9}, nproc=2)  # rank 1 raises in step 5
    took = time.perf_counter() - t0
    assert p.returncode != 0 and took < 60, (p.returncode, took)
    assert "injected failure on rank 1" in p.stderr
    # the surviving rank says why it stops: its collective lost rank 1, or torchrun sent it SIGTERM
    assert "rank 0/2: lost contact with another rank" in p.stderr or "rank 0/2: stopped by SIGTERM" in p.stderr
    saved = json.loads((broken / "checkpoint" / "state.json").read_text())
    assert saved["step"] == 3 and saved["world_size"] == 2 and not (broken / "final.safetensors").exists()

    resumed = _run(broken, {**OPTS, "resume": True}, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (want, records), (got, got_records) = _result(full), _result(broken)
    for k in want:  # same world size: the same sums in the same order, so bit for bit
        assert torch.equal(got[k], want[k]), k
    speed = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]  # noqa: E731
    assert speed(got_records) == speed(records)

    # another world size re-shards the same global batches: equal up to the order of the sums
    other = tmp_path / "other"
    assert _run(other, {**OPTS, "fail_rank": 1, "fail_step": 9}, nproc=2).returncode != 0
    single = _run(other, {**OPTS, "resume": True})
    assert single.returncode == 0, single.stderr[-3000:]
    assert "resuming a run of 2 process(es) with 1" in single.stderr
    got, _ = _result(other)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_rank_that_hangs_ends_the_job_after_the_timeout(tmp_path):
    """Rank 1 sleeps in its loss function; rank 0's next collective gives up after the timeout (5 s here,
    `--dist-timeout` on the command line) with the message for the user, and the job ends (torchrun stops the
    sleeping rank) well before the sleep (600 s) would."""
    t0 = time.perf_counter()
    p = _run(tmp_path / "hang", {**OPTS, "hang_rank": 1, "fail_step": 3, "timeout_s": 5}, nproc=2)
    took = time.perf_counter() - t0
    assert p.returncode != 0 and took < 60, (p.returncode, took, p.stderr[-2000:])
    assert "rank 0/2: lost contact with another rank during" in p.stderr, p.stderr[-3000:]
    assert "continue from the last checkpoint with --resume" in p.stderr


def test_fsdp2_equals_one_process_and_saves_the_same_adapter(tmp_path):
    """FSDP2 (each LoRA layer and the root sharded on dim 0: frozen base and adapters alike): the losses and the
    PEFT-format adapter file equal the 1-process run's within the tolerance above; `lorakit.save`, called on
    every rank of the sharded model, gathers the shards and rank 0 writes. `merge` and `merge_and_unload` on
    the sharded model are refused (LoraError naming what to do) and leave its outputs bit for bit unchanged."""
    one, two = tmp_path / "one", tmp_path / "two"
    p1, p2 = _run(one, OPTS), _run(two, {**OPTS, "fsdp": True}, nproc=2)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    (_, r1), (_, r2) = _result(one), _result(two)
    for x, y in zip(r1, r2, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    refused = json.loads((two / "merge_refused.json").read_text())
    for name in ("merge", "merge_and_unload"):
        assert refused["messages"][name].startswith(f"cannot {name} a model sharded with FSDP2"), refused
        assert "load it into an unsharded copy of the base model and merge there" in refused["messages"][name]
    assert refused["unchanged"] and refused["layers"] == 1 and refused["registry_sharded"], refused
    assert _gloo_threads_left(two) == {}  # though FSDP2's meshes and the live sharded model held the group


def test_fsdp2_resume_after_a_failed_rank_ends_where_an_uninterrupted_run_ends(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _run(full, {**OPTS, "fsdp": True}, nproc=2).returncode == 0
    assert _run(broken, {**OPTS, "fsdp": True, "fail_rank": 0, "fail_step": 9}, nproc=2).returncode != 0
    resumed = _run(broken, {**OPTS, "fsdp": True, "resume": True}, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (want, _), (got, _) = _result(full), _result(broken)
    for k in want:  # the checkpoint holds whole tensors; each rank takes its shards back: bit for bit
        assert torch.equal(got[k], want[k]), k


# -- the command line ------------------------------------------------------------------------------------
def test_cli_fsdp_refuses_what_it_cannot_shard():
    from test_cli import lorakit, refused
    refused(lorakit("train", "--fsdp"), "--fsdp shards the model across processes: start several with --nproc N")
    refused(lorakit("train", "--fsdp", "--nproc", 2, "--full"), "--fsdp shards LoRA training; it does not "
            "combine with --full")


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory):
    """test_cli's 1-layer BERT without dropout (BERT's default 0.1 draws per-rank random numbers)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("task", ["classify", pytest.param("causal-lm", marks=pytest.mark.slow)])
def test_cli_nproc_2_trains_like_one_process(tmp_path, task, request):
    """`lorakit train --nproc 2` (torchrun, 2 gloo ranks), plain (DDP) and `--fsdp` (FSDP2, the model sharded, the
    adapters with it or, `--fsdp replicated`, whole on every rank),
    against the same command in one process: the same adapter file (tolerance as above: partial gradient sums
    added in another order; here also batches padded to each rank's longest example), the same logged and
    evaluated metrics, every file written once, each log line printed once. The held-out sets (30 rows
    classify, 20 causal-lm, 10% each: 3 and 2 rows) leave rank 1 fewer rows than rank 0 (classify: 1 vs 2;
    with `--fsdp` it runs an uncounted batch to keep in step), and the best adapter is restored into the
    sharded model before the test-set evaluation."""
    from test_cli import FAST, labelled_csv, lorakit, prompts_jsonl

    model = request.getfixturevalue("tiny_bert_no_dropout" if task == "classify" else "tiny_llama")
    data = labelled_csv(tmp_path / "d.csv") if task == "classify" else prompts_jsonl(tmp_path / "p.jsonl")
    opts = ["--task", task, "--model", model, "--data", data, *FAST, "--max-length", 64, "--max-steps", 3,
            "--eval-every", 2]
    code1, out1, err1 = lorakit("train", *opts, "--out", tmp_path / "one", cwd=tmp_path)
    assert code1 == 0, err1
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # trained (B starts at 0)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    for name, extra in (("two", []), ("fsdp", ["--fsdp"]), ("replicated", ["--fsdp", "replicated"])):
        code2, out2, err2 = lorakit("train", *opts, "--nproc", 2, *extra, "--out", tmp_path / name, cwd=tmp_path)
        assert code2 == 0, err2
        assert "torch.distributed.run --standalone --nproc-per-node=2 -m lorakit.cli train" in err2
        b = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
        first = "test accuracy after training:" if task == "classify" else "test exact match after training:"
        assert out2.count(first) == 1 and out2.count("trainable parameters:") == 1, out2
        s2 = json.loads((tmp_path / name / "summary.json").read_text())
        key = "test_accuracy" if task == "classify" else "test_exact_match"
        assert s1[key] == s2[key] and s1["steps"] == s2["steps"] == 3, name
        m2 = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["split"]) for r in m2] == [(r["step"], r["split"]) for r in m1], name
        for r1, r2 in zip(m1, m2):  # train losses and validation metrics (sums over both ranks' shares)
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-6), (name, r1, r2)


@pytest.mark.slow
def test_readme_distributed_commands_on_minilm(tmp_path):
    """README's `lorakit train --nproc 2 --threads 1` and `--nproc 2 --resume` on the builtin MiniLM (quick-try
    limits), then the single-process `predict` on the adapter rank 0 wrote."""
    from test_cli import lorakit

    quick = ["--max-steps", 2, "--train-limit", 32, "--no-progress"]
    code, out, err = lorakit("train", "--nproc", 2, "--threads", 1, *quick, cwd=tmp_path)
    assert code == 0 and (tmp_path / "runs/classify/adapter/lorakit_task.json").exists(), err
    assert out.count("test accuracy after training:") == 1, out
    code, out, err = lorakit("train", "--nproc", 2, "--resume", *quick, cwd=tmp_path)
    assert code == 0, err
    code, out, err = lorakit("predict", "--device", "cpu", "--adapter", "runs/classify/adapter",
                             "Chelsea win the league on the final day", cwd=tmp_path)
    assert code == 0 and out.split("\t")[0] in {"business", "entertainment", "politics", "sports", "tech"}, err
