"""Reading user data (CSV / JSONL) strictly, and turning text into model inputs.

Every problem in a file is reported with the file and line before any training starts.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["DataError", "read_records", "LabelledText", "PromptCompletion", "check_labels",
           "encode_classification", "encode_causal", "collate"]


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


def read_records(path: str | Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """Rows of a ``.csv`` (with a header) or ``.jsonl`` file as ``(line number, row)``.

    Raises :class:`DataError` naming the file and line for: a missing file, an empty file,
    non-UTF-8 bytes, a malformed JSON line, a missing or empty required column, no rows at all.
    """
    path = Path(path)
    lines = _lines(path)
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}, line 1: missing column(s) {missing}; the header has {header}")
        for row in reader:
            rows.append((reader.line_num, row))
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
        for c in columns:
            if c not in row:
                raise DataError(f"{path}, line {number}: missing column {c!r}; the row has {sorted(row)}")
            if row[c] is None or str(row[c]).strip() == "":
                raise DataError(f"{path}, line {number}: column {c!r} is empty")
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows")
    return rows


def read_labelled(path: str | Path, text: str = "text", label: str = "label") -> list[tuple[int, LabelledText]]:
    return [(n, LabelledText(str(r[text]), str(r[label]))) for n, r in read_records(path, [text, label])]


def read_prompts(path: str | Path, prompt: str = "prompt", completion: str = "completion"
                 ) -> list[tuple[int, PromptCompletion]]:
    return [(n, PromptCompletion(str(r[prompt]), str(r[completion]))) for n, r in read_records(path, [prompt, completion])]


def check_labels(labels: Sequence[str], rows: Sequence[tuple[int, LabelledText]], path: str | Path) -> None:
    """Every label in ``rows`` (a validation/test file) must be one of the training labels."""
    known = set(labels)
    for number, row in rows:
        if row.label not in known:
            raise DataError(f"{path}, line {number}: label {row.label!r} does not occur in the training data; "
                            f"known labels: {sorted(known)}")


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
    """Prompt + completion + EOS; the prompt's tokens are masked out of the loss (label -100)."""
    out = []
    for r in rows:
        p = tokenizer(chat_prompt(tokenizer, r.prompt), add_special_tokens=False)["input_ids"]
        c = tokenizer(r.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (and list ``labels`` with -100); build the attention mask."""
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
