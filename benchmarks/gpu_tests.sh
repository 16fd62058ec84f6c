#!/usr/bin/env bash
# The tests only a CUDA GPU runs (tests/test_gpu.py; skipped in CI, which has none), then other test files of the
# suite on the same GPU, on any CUDA machine:
#
#     bash benchmarks/gpu_tests.sh [more test files...]
#     bash benchmarks/gpu_tests.sh --only tests/test_x.py     # those files without tests/test_gpu.py
#
# With qwennb installed (pip install -e ".[test]") nothing else is needed. On a bare machine with torch and
# transformers only, put wheels into .whl/ first (pip download --no-deps -d .whl diffusers==0.42.1 peft pytest
# pluggy iniconfig importlib_metadata zipp nvidia-ml-py accelerate): the ones whose module is missing are unpacked
# into a scratch folder. Writes benchmarks/results/gpu-tests-<card>.txt (and $OUT/ when set), the pytest summary
# of each file; the whole pytest output goes to $OUT/gpu-tests-full.log (or /tmp). PER_FILE=seconds (default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
own=tests/test_gpu.py
if [ "${1:-}" = "--only" ]; then
  own=
  shift
fi
site=$(mktemp -d)
if [ -d .whl ]; then
  for pair in diffusers:diffusers importlib_metadata:importlib_metadata zipp:zipp peft:peft pytest:pytest \
    pluggy:pluggy iniconfig:iniconfig pynvml:nvidia_ml_py accelerate:accelerate; do
    python3 -c "import ${pair%%:*}" 2>/dev/null && continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/"${pair#*:}"-*.whl
  done
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
card=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import torch; from stock_steps import card_slug; print(card_slug(torch.cuda.get_device_name(0)))")
out=benchmarks/results/gpu-tests-$card.txt
{
  echo "# bash benchmarks/gpu_tests.sh $*  ($(date -u +%Y-%m-%dT%H:%MZ))"
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0))"
} >"$out"
status=0
for f in $own "$@"; do
  echo "## $f" | tee -a "$out"
  # a test that hangs has its threads' stacks dumped after 120 s, and a file is stopped after ${PER_FILE:-300} s
  timeout "${PER_FILE:-300}" python3 -m pytest -o addopts="" -o faulthandler_timeout=120 -p no:cacheprovider -v \
    -rfEs "$f" 2>&1 | tee /tmp/gpu-tests.log | tee -a "${OUT:-/tmp}/gpu-tests-full.log" | grep -E "PASS|FAIL|ERROR|SKIP|Timeout|passed|failed"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "TIMEOUT: $f stopped after ${PER_FILE:-300} s" | tee -a "$out"
  grep -E "^tests/.* (PASSED|FAILED|ERROR|SKIPPED)|^(FAILED|ERROR)|passed|failed|error" /tmp/gpu-tests.log >>"$out"
  [ "$rc" -eq 0 ] || status=1
done
[ -n "${OUT:-}" ] && cp "$out" "$OUT/"
exit $status
