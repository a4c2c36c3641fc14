#!/usr/bin/env bash
# The GPU checks of issue #8 in one device call, results under $OUT (the device tool's folder) or
# benchmarks/results/scratch/ (ignored by git; copy what you keep into benchmarks/results/).
#
#   bash benchmarks/gpu_session.sh tests   # every `gpu`-marked test (linalg on CUDA/CuPy, adapters, trainer)
#   bash benchmarks/gpu_session.sh bench   # benchmarks/gpu_adapters.py, eager and under CUDA graphs
#   bash benchmarks/gpu_session.sh all     # both (about 10 minutes on an H100)
#
# Packages the GPU machine lacks travel as wheels in .whl/ (carry it; see /work/.library/device).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/scratch}"
mkdir -p "$out"
py="${PYTHON:-python3}"  # the interpreter with torch
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
dev=$("$py" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || { echo "needs torch with a CUDA device"; exit 2; }
day=$(date +%F)
what="${1:-all}"
rc=0
if [[ $what == tests || $what == all ]]; then
  "$py" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests_${dev}_${day}.log" || rc=1
fi
if [[ $what == bench || $what == all ]]; then
  "$py" benchmarks/gpu_adapters.py --compile --out "$out" 2>&1 | tee "$out/gpu_adapters_${dev}_${day}.log" || rc=1
fi
exit $rc
