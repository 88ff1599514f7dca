"""The ``lorakit`` command line's argument parsers: every command's options and help (no torch import)."""

from __future__ import annotations

import argparse

__all__ = ["COMBINE_METHODS", "OUT", "build_parser"]

COMBINE_METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")  # lorakit.ops.algebra.METHODS (no torch import)


OUT = {"classify": "runs/classify", "causal-lm": "runs/causal-lm"}  # default output folder per task


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless its help already says it, or there is none (None / a flag)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA (default: MiniLM on BBC News topics)",
                       description="Fine-tune a model with LoRA. With no arguments: all-MiniLM-L6-v2 on BBC News "
                                   "(5 topics, fixed split), LoRA r=8 on query/value plus the classifier head.",
                       formatter_class=_Help)
    p.add_argument("--task", choices=["classify", "causal-lm"], default="classify",
                   help="sequence classification, or prompt→completion instruction tuning of a causal LM")
    p.add_argument("--model", default=None,
                   help="builtin:minilm, builtin:smollm2 or a local HF folder (default: minilm for classify, "
                        "smollm2 for causal-lm)")
    p.add_argument("--data", default=None,
                   help="builtin:bbc (classify), builtin:bbc-headlines (causal-lm), or a .csv/.jsonl file")
    p.add_argument("--val-data", help="validation file (default: 10%% of --data)")
    p.add_argument("--test-data", help="test file (default: 10%% of --data)")
    p.add_argument("--text-column", default=None, help="classify: text column (default: text)")
    p.add_argument("--label-column", default=None, help="classify: label column (default: label)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module names, or all-linear (default: query,value for classify, "
                        "all-linear for causal-lm)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (baseline)")
    p.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--dora", action="store_true", help="DoRA: LoRA plus a trained magnitude per output (PEFT's use_dora)")
    p.add_argument("--trainable-tokens", type=lambda v: tuple(int(i) for i in v.split(",")), default=None,
                   help="comma-separated token ids whose embedding rows are trained (new special tokens; PEFT's "
                        "trainable_token_indices)")
    p.add_argument("--epochs", type=float, default=None, help="epochs (default 3 classify, 1 causal-lm)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 16 classify, 8 causal-lm)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--lora-plus-ratio", "--loraplus-ratio", type=float, default=1.0,
                   help="LoRA+: learning rate of B / of A (e.g. 16)")
    p.add_argument("--rslora", action="store_true", help="rsLoRA: scale the update by alpha/sqrt(r)")
    p.add_argument("--init", default="kaiming", choices=["kaiming", "gaussian", "pissa", "olora"],
                   help="init of A, B; pissa (SVD of W) and olora (QR) move part of W into them")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning-rate decay after the warm-up: cosine or linear to 0, or constant")
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of steps")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                   help="hold the frozen base's linear layers (not the head) in 4 or 8 bits (QLoRA; bitsandbytes)")
    p.add_argument("--gradient-checkpointing", "--grad-checkpointing", dest="grad_checkpointing",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in the backward pass instead of keeping them (less "
                        "memory, more compute; default: on with --quantize, as in the QLoRA recipe, else off)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per example (default: 128 classify, 96 causal-lm)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0: no limit)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training examples (default: all; 600 for builtin:bbc-headlines)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="causal-lm: score exact match before and after training on the first N test examples, "
                        "and validate on the first N (default: 50; 0: all)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: each epoch)")
    p.add_argument("--out", default=None, help="output folder (default: runs/classify or runs/causal-lm)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the adapter's init, the data order, dropout and the automatic split")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in OUT")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (in a log file); the log lines stay")
    _device_option(p)
    p.add_argument("--nproc", type=_positive(int), default=1,
                   help="data-parallel processes on this machine: runs torchrun --standalone --nproc-per-node N "
                        "with these options (under torchrun itself, leave it out)")
    p.add_argument("--dist-timeout", type=_positive(float), default=300.0,
                   help="under torchrun: seconds a rank waits for the others before the job stops")
    p.add_argument("--fsdp", nargs="?", const="sharded", choices=["sharded", "replicated"], default=None,
                   help="with --nproc N or under torchrun: shard the frozen base across the ranks (FSDP2) instead of "
                        "a whole copy per rank, the adapters sharded too (default) or replicated; the saved "
                        "adapter is the same file")


QUANTIZE = ("none", "nf4", "fp4", "int8")  # lorakit.pretrained.QUANTIZE_CHOICES (no torch import)


def _precision_options(p, what: str) -> None:
    """``--quantize`` and ``--allow-precision-change`` of the commands that load adapters on a base."""
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help=f"hold the base's linear layers (not the head) in 4 or 8 bits (bitsandbytes), or none: full "
                        f"precision (default: the precision {what} trained on, as recorded in the adapter file by "
                        "lorakit train --quantize / lorakit.save; else full precision)")
    p.add_argument("--allow-precision-change", action="store_true",
                   help="apply an adapter on a base held in another precision than the one it was trained on "
                        "(its outputs change by the difference of the quantization errors); refused otherwise")


def _device_option(p) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where the model runs; auto: CUDA (under torchrun cuda:LOCAL_RANK), else MPS, else CPU")


def _adapter_parsers(sub) -> None:
    """``combine`` and ``extract``: adapters as objects."""
    c = sub.add_parser("combine", help="combine adapters into one (cat, svd, linear, ties, dare_*)",
                       description="Weighted combination of adapters of one base model into a new adapter "
                                   "(lorakit.combine; PEFT's add_weighted_adapter definitions). The default, cat, "
                                   "concatenates the adapters' factors: the exact weighted sum, its rank the sum of "
                                   "theirs (r=8 + r=8 -> r=16; an adapter combined with itself gives rank 16, half "
                                   "of it redundant: --method svd --rank 8 keeps that sum at rank 8). Prints one "
                                   "summary line; --table adds each module's rank and error.", formatter_class=_Help)
    c.add_argument("adapters", nargs="+", help="adapter folders (PEFT format)")
    c.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter")
    c.add_argument("--method", choices=COMBINE_METHODS, default="cat",
                   help="cat: the exact sum, the factors concatenated, so the ranks add up (r=8 + r=8 -> r=16); "
                        "svd: the sum truncated to --rank; linear, ties, dare_*: as in PEFT")
    c.add_argument("--table", "--verbose", "-v", dest="table", action="store_true",
                   help="also print the per-module table: each module's rank and relative error")
    c.add_argument("--out", required=True, help="folder for the new adapter")
    c.add_argument("--model", help="base model (default: the first adapter's)")
    c.add_argument("--rank", type=_positive(int), help="svd: rank of the result (default: the largest input rank)")
    c.add_argument("--density", type=_positive(float), help="ties, dare_linear, dare_ties: fraction of values kept")
    c.add_argument("--majority-sign", choices=["total", "frequency"], default="total",
                   help="ties, dare_ties: the elected sign per value is that of the sum, or the more frequent one")
    c.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random pruning")
    c.add_argument("--missing", choices=["error", "zero"], default="error",
                   help="a module only some adapters adapt: refuse, or count the others as zero there (PEFT)")
    e = sub.add_parser("extract", help="turn a full fine-tune into a LoRA adapter (truncated SVD of W1 - W0)",
                       formatter_class=_Help)
    e.add_argument("--base", required=True, help="the model before fine-tuning (builtin:... or a folder)")
    e.add_argument("--tuned", required=True, help="the fine-tuned model (a Hugging Face folder)")
    size = e.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_positive(int), help="rank per module")
    size.add_argument("--energy", type=_positive(float), help="per module, the smallest rank keeping this share "
                                                              "of ||W1 - W0||^2 (e.g. 0.9)")
    e.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear")
    e.add_argument("--task", choices=["causal-lm", "classify"], default=None,
                   help="load both models as this task's class (default: the tuned folder's own architecture, "
                        "config.json's architectures); a class that would add weights the tuned folder lacks "
                        "(e.g. a new head) is refused")
    e.add_argument("--modules-to-save", default=None,
                   help="modules copied whole from the tuned model (default for classify: the head)")
    e.add_argument("--out", required=True, help="folder for the adapter")
    x = sub.add_parser("export", help="write a copy of an adapter that another server loads unchanged (vLLM)",
                       description="Write a copy of a PEFT-format adapter folder that vLLM serves as it is and that "
                                   "computes the same update (lorakit.export_vllm): each module's scale folded into "
                                   "its B so that vLLM's one scaling (lora_alpha/r) is exact, rank_pattern, "
                                   "alpha_pattern, rsLoRA and layers_to_transform flattened. What vLLM cannot serve "
                                   "(DoRA, modules_to_save, lora_bias, trainable tokens, unconverted PiSSA/OLoRA, "
                                   "convolutions, ranks above --max-lora-rank) is refused with the reason, and "
                                   "nothing is written.", formatter_class=_Help)
    x.add_argument("adapter", help="adapter folder (PEFT format)")
    x.add_argument("out", help="folder to create (must not exist, or be empty)")
    x.add_argument("--format", required=True, choices=["vllm"], help="the server to export for")
    x.add_argument("--max-lora-rank", type=_positive(int), default=16,
                   help="the vLLM server's --max-lora-rank (vLLM's default: 16); higher ranks are refused")
    x.add_argument("--truncate", action="store_true",
                   help="cut modules above --max-lora-rank to that rank by truncated SVD instead (prints the error)")


def _positive(kind, zero: bool = False):
    """An argparse type: a number > 0 (``zero``: >= 0)."""
    def parse(text: str):
        value = kind(text)
        if not (value >= 0 if zero else value > 0) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number {'>=' if zero else '>'} 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model and many adapters over HTTP (OpenAI-compatible)",
                       description="Serve one causal LM and every PEFT-format adapter folder under --adapters, "
                                   "with OpenAI's /v1/completions, /v1/chat/completions and /v1/models; "
                                   "requests for different adapters share each batched decode step.",
                       formatter_class=_Help)
    p.add_argument("--model", default="builtin:smollm2",
                   help="builtin:smollm2, builtin:gemma3 or a local HF model folder")
    p.add_argument("--adapters", default=None, help="folder whose sub-folders are adapters (also the root for "
                                                    "POST /v1/adapters)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface, reachable from other machines)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--admin-token", default=None,
                   help="bearer token for POST/DELETE /v1/adapters (default: env LORAKIT_ADMIN_TOKEN; none: off)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per decode step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--max-adapters", type=int, default=0,
                   help="adapters resident in memory, least recently used evicted (0: no limit)")
    p.add_argument("--max-context", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--prefill-tokens", type=int, default=4096,
                   help="padded prompt tokens prefilled together per step (bounds the stall of running rows)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API "
                                                              "(default: smollm2 / the folder's name)")
    p.add_argument("--max-body-bytes", type=_positive(int), default=1 << 20,
                   help="largest request body accepted (413 above it)")
    p.add_argument("--read-timeout", type=_positive(float), default=30.0,
                   help="seconds a connection may take to send a complete request (headers and body) after "
                        "opening or after its previous response; then it is closed")
    p.add_argument("--keep-alive-timeout", type=_positive(float), default=5.0,
                   help="seconds an idle keep-alive connection stays open after a response")
    p.add_argument("--shutdown-timeout", type=_positive(float, zero=True), default=30.0,
                   help="on SIGTERM/Ctrl-C: seconds running requests may still finish (new ones get 503); "
                        "those left then end with a 503 error")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's logging: the least severe messages shown")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    _precision_options(p, "the adapters under --adapters were (all must agree: one base per server)")
    p.add_argument("--skip-bad-adapters", action="store_true",
                   help="start even if some adapter folders under --adapters cannot be served (a bad file, another "
                        "base precision), listing each with its reason in /v1/models and /health; without it "
                        "such a folder stops the server from starting (exit 2)")
    _device_option(p)


def build_parser() -> argparse.ArgumentParser:
    """``lorakit``'s argument parser, every command's options (no torch import)."""
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning, adapters and inference.",
                                     epilog="lorakit COMMAND --help shows a command's options.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("predict", help="label texts with a trained classifier adapter",
                       description="Label texts with a classifier adapter from lorakit train: one line per text "
                                   "with the label, its probability and the text (or JSON with every label's "
                                   "probability).", formatter_class=_Help)
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--adapter", required=True, help="adapter folder, e.g. runs/classify/adapter")
    p.add_argument("--file", help="label every row of a .csv/.jsonl file instead")
    p.add_argument("--text-column", default="text", help="--file: the text column")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--json", action="store_true", help="one JSON object per text, with every probability")
    _precision_options(p, "the adapter was")
    _device_option(p)
    g = sub.add_parser("generate", help="answer prompts with a causal LM (and an adapter)",
                       formatter_class=_Help)
    g.add_argument("prompt", nargs="+", help="one or more prompts (chat template applied)")
    g.add_argument("--adapter", help="causal-LM adapter folder (PEFT format), e.g. runs/causal-lm/adapter")
    g.add_argument("--model", help="base model (default: the adapter's base, else builtin:smollm2)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per answer")
    g.add_argument("--seed", type=int, default=0, help="torch's seed before generating")
    _precision_options(g, "--adapter was")
    _device_option(g)
    i = sub.add_parser("inspect", help="show an adapter folder's config, size, task, labels and ΔW's spectrum",
                       formatter_class=_Help)
    i.add_argument("adapter", help="adapter folder (PEFT format), e.g. runs/classify/adapter")
    i.add_argument("--energy", type=_positive(float), default=0.9,
                   help="effective rank: the smallest rank holding this share of each ΔW's energy")
    i.add_argument("--spectrum", help="write a log-scale plot of each ΔW's singular values to this PNG")
    _adapter_parsers(sub)
    _serve_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"lorakit {version('lorakit')}"
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "lorakit (not installed: version unknown)"
