#!/usr/bin/env bash
# Continuous-batching engine on one H200 in one device-tool call, most important first:
#   decode attention kernels checked and timed; `jaxpipe bench` batch 1 / 32 (Llama-2-7B shapes);
#   offline throughput (mixed vs uniform lengths) and decode steps against their bytes floor;
#   batch invariance in bf16; transformers' continuous batching on the same workload (the peer).
# Every JSON line goes to $OUT/results.jsonl as it is produced (a timeout keeps what finished).
#   run(command="bash tools/gpu_engine_bench.sh", carry=[".bench"], timeout_s=590)
# Carried, git-ignored: .bench/tok (SmolLM2's tokenizer: the random model's vocabulary is resized to it).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R="$OUT/results.jsonl"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
T0=$(date +%s)
log() { tee -a "$OUT/log.txt" | grep --line-buffered '^{' | tee -a "$R" | cut -c1-400; }
say() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
step() { local t=$1; shift; say "$*"; timeout "$t" "$@" 2>&1 | log; echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"

# A config dir for dummy weights: Llama-2-7B shapes, vocabulary of the tokenizer.
$PY - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import json, os
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(".bench/tok")
cfg = json.load(open("jaxpipe/presets/llama-2-7b.json"))
cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
os.makedirs("/tmp/l7cfg", exist_ok=True)
json.dump(cfg, open("/tmp/l7cfg/config.json", "w"))
tok.save_pretrained("/tmp/l7cfg")
print("config", cfg["vocab_size"])
EOF
$PY -c "
import jax, json
from jaxpipe.bench import copy_bandwidth_gbps
bw = copy_bandwidth_gbps(jax.devices()[0])
print(json.dumps({'bench': 'copy_bandwidth', 'device': jax.devices()[0].device_kind, 'gbps': round(bw, 1)}))
open('/tmp/bw', 'w').write(str(round(bw)))" 2>&1 | log
BW=$(cat /tmp/bw 2>/dev/null || echo 4280)

step 75 $PY tools/check_decode_attention.py
step 150 $PY -m jaxpipe bench --preset llama-2-7b --batch 1 32 --bandwidth-gbps "$BW"
step 240 $PY tools/bench_throughput.py --model /tmp/l7cfg --max-num-seqs 128 --max-model-len 1536 \
    --num-requests 512 --input-len 32:1024 --output-len 16:512 --uniform 528:264 --step-slots 128 64 \
    --invariance 16 --bandwidth-gbps "$BW"
step 100 $PY tools/bench_transformers_cb.py --model llama-2-7b --num-requests 64 --input-len 32:1024 \
    --output-len 16:512 --timeout-s 80
say done
