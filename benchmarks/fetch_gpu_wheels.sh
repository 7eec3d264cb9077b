#!/usr/bin/env bash
# Download the cp312 wheels the GPU suite needs and the device image lacks (mergekit, POT and their
# missing dependencies) into .whl/ (gitignored), for a device call that carries it:
#
#   bash benchmarks/fetch_gpu_wheels.sh        # here, where pip reaches the registry
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"])   # gpu_suite.sh installs them
#
# The image (Python 3.12, torch 2.11, triton 3.6) already has peft, transformers, accelerate,
# safetensors, scipy, pytest, pytest-xdist and pytest-timeout. Versions: those the CPU CI uses.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
WHEELS=(mergekit==0.1.5 pot==0.9.7.post1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
        typing-inspection==0.4.2 immutables==0.21)
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -la "$DEST"
du -sh "$DEST"
