#!/usr/bin/env bash
# One device-tool call: checks and benchmarks on a 4-GPU machine, most important first.
# Every JSON line goes to $OUT/results.jsonl as it is produced (a timeout keeps what finished).
#   usage (device tool): bash tools/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R="$OUT/results.jsonl"
log() { tee -a "$OUT/log.txt" | grep --line-buffered '^{' | tee -a "$R" | cut -c1-260; }
step() { local t=$1; shift; echo "== $*" | tee -a "$OUT/log.txt"; timeout "$t" "$@" 2>&1 | log; echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "
import sys; sys.path.insert(0, '.')
import jaxpipe, jax, json
from jaxpipe.bench import copy_bandwidth_gbps
bw = copy_bandwidth_gbps(jax.devices()[0])
print(json.dumps({'bench': 'copy_bandwidth', 'device': jax.devices()[0].device_kind, 'gbps': round(bw, 1)}))
open('/tmp/bw', 'w').write(str(round(bw)))" 2>&1 | log
BW=$(cat /tmp/bw)
echo "bandwidth $BW GB/s"
step 90 python3 tools/check_parity.py --layouts 2x1x2 4x1x4 2x2x2
B="python3 tools/bench_decode.py --bandwidth-gbps $BW"
step 150 $B --preset llama-2-7b --pp 1 2 4 --batch 1 8 32
step 120 $B --preset llama-2-70b --pp 4 --batch 1 8 32
step 60 python3 tools/bench_transformers.py --model llama-2-7b --device cuda --batch 1 32 --impl static --repeats 2 --bandwidth-gbps $BW
step 45 env CUDA_VISIBLE_DEVICES=0,1 python3 tools/bench_transformers.py --model llama-2-7b --device cuda --batch 1 --impl accelerate-split --repeats 1 --warmup 0 --new-tokens 64
step 60 $B --preset llama-2-70b --pp 1 --tp 4 --batch 1 32
step 60 $B --preset llama-2-70b --pp 2 --tp 2 --batch 1 32
step 45 $B --preset llama-2-7b --pp 1 --tp 2 --batch 1 32
step 90 $B --preset llama-3-8b --pp 1 2 4 --batch 1 32
ls -la "$OUT"
