#!/usr/bin/env bash
# Run HERE, on a machine with pip access, before a device-tool call: fetches into .whl/
# the wheels that the device image lacks (it has jax, flax, optax, scipy, psutil,
# pytest, hypothesis; not ott-jax, jaxopt or POT), for its Python 3.12 / x86-64.
# Then, with the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl ott-jax==0.6.0 jaxopt==0.8.5 POT==0.9.7.post1
ls -la .whl
