#!/usr/bin/env bash
# Second device call of 2026-12-01 (one H200): steady-state offline throughput (1024 requests, compiled
# first), decode steps at 64/128 live slots against their floor, the serving benchmark (jaxpipe serve vs
# offline), then transformers' continuous batching as the peer. JSON lines in $OUT/results.jsonl.
#   run(command="bash tools/gpu_round2.sh", carry=[".bench", ".whl", ".serve_bench"], timeout_s=560)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R="$OUT/results.jsonl"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
T0=$(date +%s)
log() { tee -a "$OUT/log.txt" | grep --line-buffered '^{' | tee -a "$R" | cut -c1-300; }
say() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
step() { local t=$1; shift; say "$*"; timeout "$t" "$@" 2>&1 | log; echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"; }
python3 - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import json, os
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(".bench/tok")
cfg = json.load(open("jaxpipe/presets/llama-2-7b.json"))
cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
os.makedirs("/tmp/l7cfg", exist_ok=True)
json.dump(cfg, open("/tmp/l7cfg/config.json", "w"))
tok.save_pretrained("/tmp/l7cfg")
EOF
step 205 python3 tools/bench_throughput.py --model /tmp/l7cfg --max-num-seqs 128 --max-model-len 1536 \
    --warmup 96 --num-requests 768 --input-len 32:1024 --output-len 16:512 --uniform 528:264 \
    --step-slots 128 64 --measure-bandwidth
say "serving"
PEER=0 NUM=128 SEQS=64 MAXLEN=512 OUT=$OUT/serve timeout 175 bash tools/gpu_serve_bench.sh > "$OUT/serve_stdout.txt" 2>&1
cat "$OUT/serve/results.jsonl" >> "$R" 2>/dev/null; tail -3 "$OUT/serve_stdout.txt"
step 85 python3 tools/bench_transformers_cb.py --model llama-2-7b --num-requests 64 --input-len 32:1024 \
    --output-len 16:512 --timeout-s 70
say done
