"""LoRA with lorakit under Hugging Face's ``transformers.Trainer``.

A Trainer script switches to lorakit by injecting the adapter before building the Trainer; nothing
else changes. Trainer sees an ordinary transformers model whose only trainable parameters are the
adapter (and the new classification head, trained whole via ``modules_to_save``). Trainer brings its
own loop, mixed precision and data parallelism (``torchrun examples/trainer.py`` or ``accelerate
launch``); ``trainer.save_model(out)`` goes through lorakit's ``save_pretrained``: ``out`` holds the
base model as it was before injection, and ``out/adapters/default/`` the adapter in PEFT's format,
which ``lorakit.load`` and ``peft.PeftModel.from_pretrained`` both read.

    python examples/trainer.py --max-steps 60      # MiniLM on BBC News, ~1 minute on 2 cores
    torchrun --nproc-per-node 2 examples/trainer.py --max-steps 30   # the same under DDP (2 ranks)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lorakit
from lorakit import builtin


def train(model_path: str | Path, out: str | Path, max_steps: int = 60, batch_size: int = 16, lr: float = 1e-3,
          n_train: int = 0, seed: int = 0, log: bool = True):
    """Train LoRA (query, value; r=8) + the head with ``Trainer`` on BBC News; returns (model, tokenizer, labels)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    train_rows, _, test_rows = builtin.bbc_split(seed=0)
    labels = sorted({label for _, label in train_rows})
    if n_train:
        train_rows = train_rows[:n_train]
    tok = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"],
                                             modules_to_save=["classifier"]))
    if log:
        print(lorakit.summary(model))

    max_length = min(128, model.config.max_position_embeddings)

    def encode(rows):
        enc = tok([text for text, _ in rows], truncation=True, max_length=max_length)
        return [{"input_ids": ids, "labels": labels.index(label)} for ids, (_, label) in zip(enc["input_ids"], rows)]

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.06, logging_steps=10,
                             save_strategy="no", report_to=[], seed=seed, disable_tqdm=not log,
                             dataloader_num_workers=0,
                             # Trainer multiplies each rank's loss by the number of processes when the model's
                             # forward takes **kwargs (transformers' models do), expecting a loss summed over the
                             # tokens and divided by the global count (num_items_in_batch); BERT's classification
                             # loss is a plain per-rank mean, so under torchrun that doubled the loss and the
                             # gradients on 2 ranks. Off: DDP averages the ranks' means, the single-process loss.
                             average_tokens_across_devices=False,
                             use_cpu=not torch.cuda.is_available())  # on CPU, torchrun's ranks need it to use DDP
    trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows),
                      data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    trainer.save_model(str(out))  # base model in out/, adapter in out/adapters/default/ (PEFT format)
    if log and trainer.is_world_process_zero():
        model.eval()
        enc = encode(test_rows)
        correct = 0
        with torch.no_grad():
            for i in range(0, len(enc), 64):
                batch = DataCollatorWithPadding(tok)([{"input_ids": e["input_ids"]} for e in enc[i:i + 64]])
                pred = model(**batch.to(model.device)).logits.argmax(-1).tolist()
                correct += sum(p == e["labels"] for p, e in zip(pred, enc[i:i + 64]))
        print(f"test accuracy {correct / len(enc):.4f} ({len(enc)} articles); adapter in {out}/adapters/default")
    return model, tok, labels


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="LoRA (lorakit) under transformers.Trainer: MiniLM on BBC News")
    ap.add_argument("--model", default=None, help="a local HF folder (default: the builtin MiniLM)")
    ap.add_argument("--out", default="runs/trainer")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    train(a.model or builtin.minilm_path(), a.out, a.max_steps, a.batch_size, a.lr)
