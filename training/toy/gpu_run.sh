#!/usr/bin/env bash
# Train the toy model on a lent GPU machine whose commands may run at most 10 minutes each.
#   start:   bash training/toy/gpu_run.sh start   (installs carried wheels from .whl/, starts training detached)
#   collect: bash training/toy/gpu_run.sh collect (waits for it, then packs the model and results into $OUT)
# Both wait up to WAIT seconds (default 560) printing progress. On a machine of your own just run train.py.
set -u
WORK=/tmp/toyrun
WAIT=${WAIT:-560}
if [ "$1" = start ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p $WORK
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 setsid nohup python3 training/toy/train.py \
    --out $WORK/toy_model --results $WORK/results ${TRAIN_ARGS:-} > $WORK/train.log 2>&1 < /dev/null &
  echo $! > $WORK/pid
fi
t0=$(date +%s)
while kill -0 "$(cat $WORK/pid)" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$WAIT" ]; do sleep 15; done
grep -v -i warn $WORK/train.log | tail -n 40
if ! kill -0 "$(cat $WORK/pid)" 2>/dev/null && [ -n "${OUT:-}" ]; then
  cp $WORK/train.log $OUT/ 2>/dev/null
  cp $WORK/results/RESULTS.md $WORK/results/results.json $WORK/results/samples.png $WORK/results/samples.txt $OUT/ 2>/dev/null
  [ -d $WORK/toy_model ] && tar -C $WORK -cf - toy_model | split -b 15M - $OUT/toy_model.tar.part-
  ls -la $OUT
fi
