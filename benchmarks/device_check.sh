#!/usr/bin/env bash
# The sparse engine's device check (benchmarks/device_check.py has what it measures).
#
#   bash benchmarks/device_check.sh              # on a lent GPU machine: the image's python3 (JAX + CUDA), < 5 min
#   bash benchmarks/device_check.sh --cpu-smoke  # here: tiny shapes on the CPU, < 1 min
#   bash benchmarks/device_check.sh --inference  # benchmarks/bench_inference.py on the device (random weights)
#
# On the device tool's machine the working tree is copied and nothing can be installed from the internet.
# Its image has JAX with CUDA (KINDS.md, 2026-11: jax 0.11.2, jax-cuda13-plugin/-pjrt 0.11.2, python 3.12).
# If JAX there cannot see a GPU, this script stops and prints the wheels to carry (see below).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

smoke=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && smoke=1; done

if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
  fi
else
  PYTHON="${PYTHON:-python3}"
  # Wheels carried in .whl/ (git-ignored via .git/info/exclude, named in the run's `carry`) go in first.
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PYTHON" -c "import jax, sys; sys.exit(0 if jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu') else 3)"; then
    cat >&2 <<'MSG'
device_check: this python has no JAX that sees an accelerator. Carry JAX for CUDA 13 (driver 580) as wheels.
Here, in the repo root (pip of any Python; the wheels are for the device's CPython 3.12, x86-64):

  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl jax==0.11.2 jaxlib==0.11.2 jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 \
    ml_dtypes opt_einsum
  du -sh .whl     # must stay under the device tool's 64 MiB per call with the tree; jaxlib and the CUDA
                  # plugin together are likely larger: then JAX cannot travel, and the check needs an image with it

Then run with carry [".whl"]; this script installs them first with
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
(the CUDA runtime libraries, nvidia-* wheels, are in the image: KINDS.md lists nvidia-cublas, -cusolver, ...).
MSG
    exit 3
  fi
fi
if [ "${1:-}" = "--inference" ]; then
  # Inference on the device: SmolLM2's shapes with random weights (the GGUF does not travel), every model of
  # benchmarks/bench_inference.py; needs the image's Flax and transformers. Results under $OUT.
  shift
  exec "$PYTHON" benchmarks/bench_inference.py --random-weights --cores none --no-memory \
    --json "${OUT:-/tmp}/bench_inference.json" --plot "${OUT:-/tmp}/inference.png" "$@"
fi
exec "$PYTHON" benchmarks/device_check.py "$@"
