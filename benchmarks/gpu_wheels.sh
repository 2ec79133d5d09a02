#!/usr/bin/env bash
# Wheels the device machine lacks (it has torch, torchvision, timm, PyYAML, fsspec, Pillow, numpy): DeepSpeed and
# its requirements for the ZeRO parts, defusedxml for the sample data's annotations (data/layout.py), simplejpeg for
# the crop-first CPU decode (data/decode.py). Saved into .whl/ (git-ignored; about 5 MB) for `run`'s carry list.
# docs/gpu.md.
#   benchmarks/gpu_wheels.sh [PYTHON]     # PYTHON: an interpreter with pip and torch (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
mkdir -p .whl
# DeepSpeed publishes only a source archive; its wheel is pure Python (ops compile on first use): build it here.
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# Its requirements the device lacks (pins of requirements.lock), as Python 3.12 x86-64 wheels.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 defusedxml==0.7.1 simplejpeg==1.9.0
ls -l .whl
