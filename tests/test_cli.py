"""`lorakit` run as a user runs it: `python -m lorakit.cli ...` in a subprocess, checking the exit code,
stdout and stderr. Fast tests use tiny random models built here (real tokenizers, 1-layer networks);
the README's commands on the real models are marked slow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lorakit(*args, cwd=None, timeout=600):
    """Run the CLI; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, args)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def refused(result, *fragments):
    """Exit 2, one line on stderr containing every fragment, no traceback."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, (f, err)
    return err


def save_tiny_bert(folder, **config):
    """Save a 1-layer BERT (no classification head) with MiniLM's tokenizer to ``folder``; ``config``
    overrides BertConfig fields (e.g. dropout)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorakit import builtin
    tok = AutoTokenizer.from_pretrained(builtin.minilm_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64, **config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 1-layer BERT (no classification head) with MiniLM's tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 1-layer Llama with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit import builtin
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(builtin.smollm2_path())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32, max_position_embeddings=128,
                                 tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def labelled_csv(path, n=30):
    words = {"spam": "win money now", "ham": "see you at lunch", "eggs": "breakfast is ready"}
    rows = [f"{words[lab]} {i},{lab}" for i in range(n) for lab in words]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def prompts_jsonl(path, n=20):
    rows = [{"prompt": f"Say the colour number {i}", "completion": ["red", "blue"][i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAST = ["--max-steps", 2, "--batch-size", 4, "--max-length", 16, "--no-progress", "--threads", 1]


# -- the classifier path: train -> predict / inspect; generate refuses it ------------------------------
def test_classify_train_predict_inspect_and_overwrite(tmp_path, tiny_bert):
    data = labelled_csv(tmp_path / "d.csv")
    code, out, err = lorakit("train", "--model", tiny_bert, "--data", data, *FAST, cwd=tmp_path)
    assert code == 0, err
    run = tmp_path / "runs" / "classify"  # the per-task default output folder
    assert (run / "summary.json").exists() and (run / "adapter" / "adapter_model.safetensors").exists()
    # transformers' multi-line LOAD REPORT is replaced by one line of lorakit's own
    assert "LOAD REPORT" not in out + err and "Loading weights" not in err
    assert [line for line in out.splitlines() if line.startswith("new weights")] == [
        f"new weights (not in {tiny_bert}, initialised from the seed, trained with the adapter): "
        "classifier.bias, classifier.weight"]
    assert "evaluating test accuracy before training (9 examples) ..." in out

    code, out, err = lorakit("inspect", run / "adapter")
    assert code == 0 and "task classify" in out and "labels: eggs, ham, spam" in out, out + err
    # the adapter folder stays PEFT's: the label names live in a file PEFT does not read
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "labels" not in json.dumps(config) and (run / "adapter" / "lorakit_task.json").exists()

    code, out, err = lorakit("predict", "--adapter", run / "adapter", "win money now 3", "see you at lunch")
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [t for _, _, t in lines] == ["win money now 3", "see you at lunch"]
    assert all(lab in {"eggs", "ham", "spam"} and 0 < float(p) <= 1 for lab, p, _ in lines), out
    code, out, err = lorakit("predict", "--adapter", run / "adapter", "--file", data, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 90, err
    assert all(set(r["probabilities"]) == {"eggs", "ham", "spam"} for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)

    refused(lorakit("generate", "--adapter", run / "adapter", "Hello"), "is a classifier adapter",
            "lorakit predict")

    # a finished run is not overwritten silently; --overwrite replaces it; --resume continues it
    before = (run / "summary.json").read_text()
    refused(lorakit("train", "--model", tiny_bert, "--data", data, *FAST, cwd=tmp_path),
            "runs/classify holds a finished run", "--overwrite")
    assert (run / "summary.json").read_text() == before
    code, out, err = lorakit("train", "--model", tiny_bert, "--data", data, *FAST, "--seed", 1, "--overwrite",
                             cwd=tmp_path)
    assert code == 0 and json.loads((run / "summary.json").read_text())["train"]["seed"] == 1, err
    code, out, err = lorakit("train", "--model", tiny_bert, "--data", data, *FAST, "--seed", 1, "--resume",
                             cwd=tmp_path)
    assert code == 0, err


def test_train_into_a_log_file_writes_whole_lines(tmp_path, tiny_bert):
    """``lorakit train > log 2>&1`` (nohup, CI): progress as whole lines, none written into another."""
    data = labelled_csv(tmp_path / "d.csv")
    with open(tmp_path / "log", "w") as log:
        p = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", str(tiny_bert), "--data",
                            str(data), "--max-steps", "12", "--batch-size", "4", "--max-length", "16",
                            "--eval-every", "6", "--threads", "1", "--out", str(tmp_path / "o")],
                           env=ENV, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "log").read_text()
    assert p.returncode == 0, text
    assert "\r" not in text, text
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 6", "step 10/12 (83%)", "step 12/12 (100%)",
                                                      "step 12"], text
    assert all(line.count("step ") <= 1 for line in lines), text  # no line inside another


def test_unfinished_run_needs_resume_or_overwrite(tmp_path, tiny_bert):
    (tmp_path / "o" / "checkpoint").mkdir(parents=True)
    refused(lorakit("train", "--model", tiny_bert, "--data", labelled_csv(tmp_path / "d.csv"), "--out",
                    tmp_path / "o", *FAST), "holds an unfinished run (checkpoint)", "--resume", "--overwrite")
    refused(lorakit("train", "--out", tmp_path / "o", "--resume", "--overwrite"), "pass one")


# -- the causal-LM path -------------------------------------------------------------------------------
def test_causal_lm_default_folder_eval_limit_and_generate(tmp_path, tiny_llama):
    data = prompts_jsonl(tmp_path / "p.jsonl")
    code, out, err = lorakit("train", "--task", "causal-lm", "--model", tiny_llama, "--data", data,
                             "--eval-limit", 1, *FAST, "--max-length", 64, cwd=tmp_path)
    assert code == 0, err
    run = tmp_path / "runs" / "causal-lm"
    assert "evaluating exact match before training: greedy answers to 1 test prompts" in out, out
    assert json.loads((run / "summary.json").read_text())["test_examples"] == 1
    assert not (tmp_path / "runs" / "classify").exists()
    code, out, err = lorakit("inspect", run / "adapter")
    assert code == 0 and "task causal-lm" in out, out + err
    code, out, err = lorakit("generate", "--adapter", run / "adapter", "--max-new-tokens", 2, "Hi")
    assert code == 0, err  # the base model comes from the adapter's lorakit_task.json
    refused(lorakit("predict", "--adapter", run / "adapter", "x"), "not a classifier adapter", "lorakit generate")
    # a max length that leaves no completion token is refused, and the refused run leaves the old one intact
    refused(lorakit("train", "--task", "causal-lm", "--model", tiny_llama, "--data", data, *FAST, "--overwrite",
                    cwd=tmp_path), "examples keep no completion token within max length 16", "raise --max-length")
    assert (run / "summary.json").exists() and (run / "adapter" / "adapter_model.safetensors").exists()
    # options of the other task are refused, not ignored
    refused(lorakit("train", "--eval-limit", 5, "--out", tmp_path / "x"),
            "--eval-limit only applies to --task causal-lm")
    refused(lorakit("train", "--task", "causal-lm", "--text-column", "body", "--out", tmp_path / "x"),
            "--text-column only applies to --task classify")


def test_generate_without_adapter_or_model_uses_builtin_smollm2():
    code, out, err = lorakit("generate", "--max-new-tokens", 3, "Hello")  # was a TypeError
    assert code == 0 and out.strip() and "Traceback" not in err, err


# -- combine: one line by default, the table on request -------------------------------------------------
def test_combine_prints_one_line_and_the_table_on_request(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from lorakit.api import LoraConfig, inject, lora_layers, save
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_()
    save(model, tmp_path / "a")
    code, out, err = lorakit("combine", tmp_path / "a", tmp_path / "a", "--weights", 0.5, 0.5, "--out", tmp_path / "aa")
    assert code == 0, err
    assert out.count("\n") == 1, out  # one line, no per-module table
    for fragment in ("combined 2 adapters", "by cat (factors concatenated, so the ranks add up: r=2 + r=2 -> r=4)",
                     "given twice", "redundant", "--method svd", "2 modules", f"wrote {tmp_path / 'aa'}"):
        assert fragment in out, (fragment, out)
    code, out, err = lorakit("combine", tmp_path / "a", tmp_path / "aa", "--weights", 1, -1, "--method", "svd",
                             "--rank", 1, "--out", tmp_path / "svd", "--table")
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj" in out and "model.layers.0.self_attn.v_proj" in out, out
    summary = out.splitlines()[-1]
    assert "by svd, r=1; 2 modules" in summary and "redundant" not in summary, summary
    code, out, err = lorakit("combine", "--help")
    text = " ".join(out.split())
    assert "concatenates the adapters' factors" in text and "r=8 + r=8 -> r=16" in text, text


# -- malformed data: refused before the model loads (the model path below does not exist) --------------
NO_MODEL = "/nonexistent/model"


@pytest.mark.parametrize("content,fragments", [
    ("text,label\nfine,ham\nthis row has, extra, cells,ham\nok,spam\n",
     ["d.csv, line 3: 4 cells, expected 2 like the header (text, label)"]),
    ("text,label\nfine,ham\nno label cell\nok,spam\n", ["d.csv, line 3: 1 cells, expected 2"]),
    # 21 rows: the seeded split (seed 0) holds out rows 10, 19, 17, 14 (0-based), i.e. line 12 is 'rare'
    ("text,label\n" + "".join(f"t{i},common\n" if i != 10 else "rare one,rare\n" for i in range(21)),
     ["label 'rare' (line(s) 12) has 1 row(s)", "automatic validation/test split took them all"]),
    ("text,label\nonly,ham\n", ["1 row(s)", "needs at least 3 rows", "--val-data and --test-data"]),
    ("text,label\na,ham\nb,spam\n", ["2 row(s)", "needs at least 3 rows"]),
    ("text,label\na,ham\nb,\n", ["d.csv, line 3: column 'label' is empty"]),
])
def test_malformed_csv_is_refused_before_the_model_loads(tmp_path, content, fragments):
    (tmp_path / "d.csv").write_text(content)
    refused(lorakit("train", "--model", NO_MODEL, "--data", tmp_path / "d.csv", "--out", tmp_path / "o"),
            *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line,fragment", [
    ('{"text": 5, "label": "ham"}', "line 2: column 'text' is a JSON int (5); expected a string"),
    ('{"text": ["a"], "label": "ham"}', "line 2: column 'text' is a JSON list"),
    ('{"text": "a", "label": {"x": 1}}', "line 2: column 'label' is a JSON dict"),
    ('{"text": "a", "label": 1.5}', "expected a string or an integer"),
])
def test_jsonl_values_of_the_wrong_type_are_refused(tmp_path, line, fragment):
    (tmp_path / "d.jsonl").write_text('{"text": "ok", "label": "ham"}\n' + line + "\n")
    refused(lorakit("train", "--model", NO_MODEL, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o"),
            fragment)


def test_label_known_only_to_validation_file(tmp_path):
    labelled_csv(tmp_path / "d.csv")
    (tmp_path / "v.csv").write_text("text,label\na,ham\nb,unseen\n")
    refused(lorakit("train", "--model", NO_MODEL, "--data", tmp_path / "d.csv", "--val-data", tmp_path / "v.csv",
                    "--out", tmp_path / "o"), "v.csv, line 3: label 'unseen' does not occur in the training data")


def test_causal_lm_file_too_small(tmp_path):
    prompts_jsonl(tmp_path / "p.jsonl", n=2)
    refused(lorakit("train", "--task", "causal-lm", "--model", NO_MODEL, "--data", tmp_path / "p.jsonl",
                    "--out", tmp_path / "o"), "p.jsonl: 2 row(s)", "at least 3 rows")


# -- bad input is answered first, and at once ------------------------------------------------------------
@pytest.mark.parametrize("task,name,content,options,fragments", [
    ("classify", "bad.csv", "text,topic\nhello,a\n", [],
     ["bad.csv, line 1: missing column 'label' (the label column, set by --label-column)",
      "the file's columns are 'text', 'topic'"]),
    ("classify", "bad.csv", "body,topic\nhello,a\n", ["--label-column", "topic"],
     ["missing column 'text' (the text column, set by --text-column)", "columns are 'body', 'topic'"]),
    ("classify", "bad.csv", "text,label\nfine,ham\nthis, has, extra,ham\n", [], ["bad.csv, line 3: 4 cells, expected 2"]),
    ("classify", "bad.jsonl", '{"text": "a", "topic": "x"}\n', [],
     ["bad.jsonl, line 1: missing column 'label' (the label column, set by --label-column)",
      "this row's columns are 'text', 'topic'"]),
    ("causal-lm", "bad.jsonl", '{"prompt": "a"}\n', [], ["bad.jsonl, line 1: missing column 'completion'"]),
])
def test_bad_data_is_refused_before_the_output_folder_is_looked_at(tmp_path, task, name, content, options, fragments):
    """A user's first run with a wrong file, in a folder whose runs/<task> holds a finished run: the data's
    problem is what they need to hear (naming the option that picks the column), not the folder's."""
    (tmp_path / "runs" / task).mkdir(parents=True)
    (tmp_path / "runs" / task / "summary.json").write_text("{}")
    (tmp_path / name).write_text(content)
    err = refused(lorakit("train", "--task", task, "--data", name, *options, cwd=tmp_path), *fragments)
    assert "finished run" not in err


#: Runs lorakit.cli.main(argv) in a fresh interpreter; prints its exit code and the heavy modules it imported.
IMPORTS = """import sys
from lorakit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy")))
sys.exit(code)
"""


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0), (["--version"], 0), (["train", "--help"], 0), (["combine", "--help"], 0),
    (["train", "--rank", "x"], 2), (["train", "--data", "missing.csv"], 2), (["train", "--data", "bad.csv"], 2),
    (["train", "--data", "bad.csv", "--threads", "1"], 2), (["train", "--task", "causal-lm", "--data", "bad.csv"], 2),
    (["train", "--full", "--dora"], 2), (["predict", "--adapter", "nowhere", "x"], 2),
    (["combine", "nowhere", "--weights", "1", "--out", "o"], 2), (["inspect", "nowhere"], 2),
])
def test_help_argument_and_data_errors_do_not_import_torch(tmp_path, argv, code):
    """--help, a bad option and a bad data file answer at once: without importing torch or transformers
    (seconds), checked by the modules imported rather than by a timing (a busy machine would flake)."""
    (tmp_path / "bad.csv").write_text("text,topic\nhello,a\n")
    p = subprocess.run([sys.executable, "-c", IMPORTS, *argv], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert "IMPORTED []" in p.stdout, p.stdout
    assert "Traceback" not in p.stderr, p.stderr


# -- help ----------------------------------------------------------------------------------------------
def test_every_command_and_option_has_help():
    import argparse

    from lorakit.cli.parser import build_parser as _parser
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    described = {a.dest: a.help for a in commands._choices_actions}
    assert set(described) == {"train", "predict", "generate", "inspect", "serve", "combine", "extract", "export"}
    assert all(h and h.strip() for h in described.values()), described
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                (name, action.option_strings or action.dest)


def test_top_level_help_lists_the_commands_and_version_works():
    code, out, err = lorakit("--help")
    assert code == 0, err
    for command in ("train", "predict", "generate", "inspect", "serve", "combine", "extract", "export"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 1 for line in out.splitlines()), \
            (command, out)
    code, out, err = lorakit("--version")
    assert code == 0 and out.startswith("lorakit "), (out, err)


@pytest.mark.parametrize("command", ["train", "predict", "generate", "inspect", "serve"])
def test_help_states_each_default_once(command):
    code, out, err = lorakit(command, "--help")
    assert code == 0, err
    text = " ".join(out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for chunk in text.split("--")[1:]:  # one option's help each
        assert chunk.count("default") <= 1, chunk


# -- README's command line on the real models (slow) -----------------------------------------------------
@pytest.mark.slow
def test_readme_command_line_on_the_builtin_models(tmp_path):
    """README's "Command line" list, top to bottom in a fresh folder, with its quick-try limits."""
    quick = ["--max-steps", 2, "--train-limit", 32, "--no-progress"]
    code, out, err = lorakit("train", *quick, cwd=tmp_path)
    assert code == 0 and (tmp_path / "runs/classify/adapter/lorakit_task.json").exists(), err
    code, out, err = lorakit("predict", "--adapter", "runs/classify/adapter",
                             "Chelsea win the league on the final day", cwd=tmp_path)
    assert code == 0 and out.split("\t")[0] in {"business", "entertainment", "politics", "sports", "tech"}, err
    code, out, err = lorakit("inspect", "runs/classify/adapter", cwd=tmp_path)
    assert code == 0 and "labels: business, entertainment, politics, sports, tech" in out, err
    code, out, err = lorakit("train", "--resume", *quick, cwd=tmp_path)
    assert code == 0, err
    code, out, err = lorakit("train", "--task", "causal-lm", *quick, "--eval-limit", 4, cwd=tmp_path)
    assert code == 0 and (tmp_path / "runs/causal-lm/adapter").exists(), err
    code, out, err = lorakit("generate", "--adapter", "runs/causal-lm/adapter",
                             "Which topic is this headline about? Chelsea win the league", cwd=tmp_path)
    assert code == 0 and out.strip(), err
    code, out, err = lorakit("generate", "Hello", cwd=tmp_path)
    assert code == 0 and out.strip(), err
    (tmp_path / "my.csv").write_text("body,topic\n" + "".join(f"goal scored in match {i},sport\n"
                                                              f"shares fell on day {i},business\n" for i in range(20)))
    code, out, err = lorakit("train", "--data", "my.csv", "--text-column", "body", "--label-column", "topic",
                             "--rank", 16, "--epochs", 5, "--out", "runs/my", *quick, cwd=tmp_path)
    assert code == 0 and (tmp_path / "runs/my/summary.json").exists(), err
