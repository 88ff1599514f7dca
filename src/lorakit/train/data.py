"""Reading user data (CSV / JSONL) strictly, and turning text into model inputs.

Every problem in a file is reported with the file and line before any training starts. Reading and
splitting the data (:func:`classification_splits`, :func:`prompt_splits`) does not import torch, so
``lorakit train`` checks its data files, and answers about a bad one, at once; only :func:`collate`
needs torch (imported when called).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, TypeVar

from .. import builtin

if TYPE_CHECKING:
    import torch

__all__ = ["DataError", "read_records", "read_labelled", "read_prompts", "LabelledText", "PromptCompletion",
           "check_labels", "split", "check_split_labels", "classification_splits", "prompt_splits",
           "bbc_headline_task", "encode_classification", "encode_causal", "collate"]

#: What each column of :func:`read_labelled` is, and the ``lorakit train`` option that names it.
TEXT_COLUMN, LABEL_COLUMN = "the text column, set by --text-column", "the label column, set by --label-column"

T = TypeVar("T")


class DataError(ValueError):
    """A data file is unreadable or malformed; the message names the file and line."""


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid UTF-8 (byte {line[e.start]:#x} at column "
                            f"{e.start + 1}); re-save the file as UTF-8") from None
    return raw.decode("utf-8").lstrip("\ufeff").splitlines()


def _csv_rows(path: Path, lines: list[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and the rows of a CSV file; every row must have exactly the header's cell count."""
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header = next(reader, [])
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise DataError(f"{path}, line 1: column(s) {twice} appear more than once in the header {header}")
    rows, end = [], reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num  # a quoted cell may span lines: report where the row starts
        if not cells:
            continue  # a blank line
        if len(cells) != len(header):
            raise DataError(f"{path}, line {start}: {len(cells)} cells, expected {len(header)} like the header "
                            f"({', '.join(header)}); quote a cell that contains a comma (\"a, b\")")
        rows.append((start, dict(zip(header, cells))))
    return header, rows


def _missing(path: Path, number: int, missing: Sequence[str], roles: Mapping[str, str], have: Sequence[str]
             ) -> DataError:
    """The error for required columns absent from a CSV header or a JSONL row: each with its role
    (e.g. "the label column, set by --label-column"), then the columns there are."""
    named = ", ".join(f"{c!r}" + (f" ({roles[c]})" if c in roles else "") for c in missing)
    where = "the file's columns are" if path.suffix.lower() == ".csv" else "this row's columns are"
    return DataError(f"{path}, line {number}: missing column{'s' if len(missing) > 1 else ''} {named}; {where} "
                     f"{', '.join(repr(c) for c in have) or 'no columns'}")


def read_records(path: str | Path, columns: Sequence[str], labels: Sequence[str] = (),
                 roles: Mapping[str, str] | None = None) -> list[tuple[int, dict]]:
    """Rows of a ``.csv`` (with a header) or ``.jsonl`` file as ``(line number, row)``.

    ``columns`` must hold non-empty strings; the ``labels`` among them may also be JSON integers.
    ``roles`` says what a column is and how to choose another (``{"label": "the label column, set by
    --label-column"}``), for the error about a missing one, which also lists the columns there are.
    Raises :class:`DataError` naming the file and line for: a missing file, an empty file,
    non-UTF-8 bytes, a CSV row with more or fewer cells than the header, a malformed JSON line,
    a missing or empty required column, a value of the wrong JSON type, no rows at all.
    """
    path = Path(path)
    lines = _lines(path)
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        header, rows = _csv_rows(path, lines)
        missing = [c for c in columns if c not in header]
        if missing:
            raise _missing(path, 1, missing, roles or {}, header)
    elif path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    else:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv or .jsonl")
    for number, row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise _missing(path, number, missing, roles or {}, sorted(row))
        for c in columns:
            value = row[c]
            kinds = (str, int) if c in labels else (str,)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                expected = "a string or an integer" if c in labels else "a string"
                raise DataError(f"{path}, line {number}: column {c!r} is a JSON {type(value).__name__} "
                                f"({json.dumps(value)[:40]}); expected {expected}")
            if value is None or str(value).strip() == "":
                raise DataError(f"{path}, line {number}: column {c!r} is empty")
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows")
    return rows


def read_labelled(path: str | Path, text: str = "text", label: str = "label") -> list[tuple[int, LabelledText]]:
    """``(line, LabelledText)`` rows of a CSV/JSONL file (see :func:`read_records`)."""
    roles = {text: TEXT_COLUMN, label: LABEL_COLUMN}
    return [(n, LabelledText(r[text], str(r[label])))
            for n, r in read_records(path, [text, label], [label], roles=roles)]


def read_prompts(path: str | Path, prompt: str = "prompt", completion: str = "completion"
                 ) -> list[tuple[int, PromptCompletion]]:
    """``(line, PromptCompletion)`` rows of a CSV/JSONL file (see :func:`read_records`)."""
    roles = {prompt: "the prompt column", completion: "the completion column"}
    return [(n, PromptCompletion(r[prompt], r[completion]))
            for n, r in read_records(path, [prompt, completion], roles=roles)]


def check_labels(labels: Sequence[str], rows: Sequence[tuple[int, LabelledText]], path: str | Path) -> None:
    """Every label in ``rows`` (a validation/test file) must be one of the training labels."""
    known = set(labels)
    for number, row in rows:
        if row.label not in known:
            raise DataError(f"{path}, line {number}: label {row.label!r} does not occur in the training data; "
                            f"known labels: {sorted(known)}")


def split(rows: list[tuple[int, T]], path: str | Path, val: list[tuple[int, T]] | None,
          test: list[tuple[int, T]] | None, seed: int, fraction: float = 0.1
          ) -> tuple[list[tuple[int, T]], list[tuple[int, T]], list[tuple[int, T]]]:
    """``(train, val, test)``: the given validation/test rows, or a seeded ``fraction`` (at least one row)
    of ``rows`` for each one missing. Raises :class:`DataError` when no training row would be left."""
    if val is not None and test is not None:
        return list(rows), val, test
    carved = (val is None) + (test is None)
    k = max(1, int(len(rows) * fraction))
    if len(rows) - carved * k < 1:
        names = " and ".join(n for n, given in (("validation", val), ("test", test)) if given is None)
        options = " and ".join(o for o, given in (("--val-data", val), ("--test-data", test)) if given is None)
        raise DataError(f"{path}: {len(rows)} row(s); the automatic {names} split ({fraction:.0%}, at least one "
                        f"row each) needs at least {carved + 1} rows to leave one for training; add rows, or "
                        f"give {options}")
    train = list(rows)
    random.Random(seed).shuffle(train)
    if val is None:
        val, train = train[:k], train[k:]
    if test is None:
        test, train = train[:k], train[k:]
    return train, val, test


def check_split_labels(train: Sequence[tuple[int, LabelledText]], held_out: Sequence[tuple[int, LabelledText]],
                       path: str | Path) -> None:
    """After an automatic split: every held-out label must keep a training row (else it cannot be learnt)."""
    known = {r.label for _, r in train}
    for label in sorted({r.label for _, r in held_out} - known):
        lines = sorted(n for n, r in held_out if r.label == label)
        raise DataError(f"{path}: label {label!r} (line(s) {', '.join(map(str, lines))}) has {len(lines)} row(s), "
                        "and the automatic validation/test split took them all, so it cannot be learnt; add rows "
                        "for it, or give --val-data and --test-data")


def classification_splits(data: str, val_data: str | None, test_data: str | None, text_col: str = "text",
                          label_col: str = "label", seed: int = 0, train_limit: int = 0
                          ) -> dict[str, list[LabelledText]]:
    """Train/val/test rows of ``lorakit train --task classify``: ``builtin:bbc``'s fixed split, or a file
    split by :func:`split` where no ``val_data`` / ``test_data`` file is given; refuses (DataError) any
    held-out label that no training row has."""
    if data == "builtin:bbc":
        parts = builtin.bbc_split(seed=0)  # a fixed split: the same test set for every run
        train, val, test = ([(0, LabelledText(t, lab)) for t, lab in part] for part in parts)
        given = {"val": val, "test": test}
    else:
        given = {name: read_labelled(path, text_col, label_col) if path else None
                 for name, path in (("val", val_data), ("test", test_data))}
        train, val, test = split(read_labelled(data, text_col, label_col), data, given["val"], given["test"], seed)
        check_split_labels(train, [r for name, part in (("val", val), ("test", test)) if given[name] is None
                                   for r in part], data)
    if train_limit:
        train = train[:train_limit]
    labels = sorted({r.label for _, r in train})
    for name, path in (("val", val_data or data), ("test", test_data or data)):
        rows = given[name] if given[name] is not None else (val if name == "val" else test)
        missing = sorted({r.label for _, r in rows} - set(labels))
        if missing and train_limit:
            raise DataError(f"label(s) {missing} of the {name} split have no row among the first {train_limit} "
                            f"training rows (--train-limit {train_limit}); raise the limit")
        check_labels(labels, rows, path)
    return {"train": [r for _, r in train], "val": [r for _, r in val], "test": [r for _, r in test]}


TOPICS = {"sports": "sport"}  # the corpus's folder names -> the words the LM should say
BBC_PROMPT = ("Which topic is this BBC News headline about? Answer with one word: business, entertainment, "
              "politics, sport or tech.\nHeadline: {headline}")


def bbc_headline_task(seed: int = 0) -> dict[str, list[PromptCompletion]]:
    """BBC headline → topic word, split like the classification task (headline = first line)."""
    parts = builtin.bbc_split(seed=seed)
    return {name: [PromptCompletion(BBC_PROMPT.format(headline=text.strip().split("\n", 1)[0].strip()),
                                    TOPICS.get(label, label)) for text, label in part]
            for name, part in zip(("train", "val", "test"), parts)}


def prompt_splits(data: str, val_data: str | None, test_data: str | None, seed: int = 0, train_limit: int = 0,
                  eval_limit: int = 0) -> dict[str, list[PromptCompletion]]:
    """Train/val/test rows of ``lorakit train --task causal-lm``: ``builtin:bbc-headlines``
    (:func:`bbc_headline_task`), or a file split by :func:`split` where no ``val_data`` / ``test_data``
    file is given; the first ``train_limit`` training rows and ``eval_limit`` val/test rows (0: all)."""
    if data == "builtin:bbc-headlines":
        splits = bbc_headline_task()
    else:
        given = [read_prompts(path) if path else None for path in (val_data, test_data)]
        parts = split(read_prompts(data), data, *given, seed=seed)
        splits = {name: [r for _, r in part] for name, part in zip(("train", "val", "test"), parts)}
    if train_limit:
        splits["train"] = splits["train"][:train_limit]
    if eval_limit:
        splits["val"], splits["test"] = splits["val"][:eval_limit], splits["test"][:eval_limit]
    return splits


def encode_classification(tokenizer, rows: Sequence[LabelledText], labels: Sequence[str], max_length: int
                          ) -> list[dict]:
    index = {label: i for i, label in enumerate(labels)}
    enc = tokenizer([r.text for r in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": index[r.label]} for ids, r in zip(enc["input_ids"], rows)]


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt in the model's chat template (if it has one), ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_causal(tokenizer, rows: Sequence[PromptCompletion], max_length: int) -> list[dict]:
    """Prompt + completion + EOS; the prompt's tokens are masked out of the loss (label -100).

    Raises :class:`DataError` if ``max_length`` leaves an example no completion token to learn from."""
    out, cut = [], []
    for r in rows:
        p = tokenizer(chat_prompt(tokenizer, r.prompt), add_special_tokens=False)["input_ids"]
        c = tokenizer(r.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        if len(p) >= max_length:
            cut.append(len(p))
        out.append({"input_ids": ids, "labels": labels})
    if cut:
        raise DataError(f"{len(cut)} of {len(rows)} examples keep no completion token within max length "
                        f"{max_length} (their prompts take up to {max(cut)} tokens with the chat template); "
                        f"raise --max-length above {max(cut)}")
    return out


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (and list ``labels`` with -100); build the attention mask."""
    import torch
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    seq_labels = isinstance(items[0]["labels"], list)
    labels = torch.full((len(items), width), -100, dtype=torch.long) if seq_labels else \
        torch.tensor([it["labels"] for it in items])
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(it["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
