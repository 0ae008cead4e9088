#!/usr/bin/env bash
# Wheels the GPU check needs on a CUDA machine that has PyTorch, transformers and safetensors but nothing else of
# ours and no internet (this project's device machines: Python 3.12, manylinux x86_64). Run here, in the repo root;
# carry .whl/ (about 6 MB) and on the device run:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=("peft==$(version peft)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)"
      "typer==$(version typer)" "rich==$(version rich)" "gguf==$(version gguf)" "pytest==$(version pytest)"
      pluggy iniconfig annotated-types typing-inspection shellingham click markdown-it-py mdurl pygments)
for pkg in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
du -sh .whl
