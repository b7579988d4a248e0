#!/usr/bin/env bash
# Serving benchmark in one device-tool call (one H200): `jaxpipe serve` on random Llama-2-7B weights, driven
# by tools/bench_serving.py at saturation (all requests at once) and at half the saturating rate, plus a
# lone request (concurrency 1) and the same workload offline through LLM.generate (the server's ceiling);
# then the peer `transformers serve --continuous-batching` on a random checkpoint of the same shapes.
# Every JSON line goes to $OUT/results.jsonl as it is produced (a timeout keeps what finished); logs in $OUT.
#
#   run(command="bash tools/gpu_serve_bench.sh", carry=[".whl", ".serve_bench"], timeout_s=600)
#
# Carried, git-ignored: .whl/ (Python 3.12 wheels the GPU image lacks: fastapi, starlette, uvicorn, pydantic,
# pydantic_core, annotated_types, typing_inspection, typing_extensions, opentelemetry_api, openai and its
# httpx2 / httpcore2 / jiter / sniffio / anyio / idna / truststore) and .serve_bench/ (tokenizer/ = SmolLM2's
# tokenizer, make_random_checkpoint.py from ../shared/tools).
# jaxpipe loads random weights with --load-format dummy when LLM takes it (no checkpoint to read); the peer
# (and jaxpipe otherwise) reads a random checkpoint written by make_random_checkpoint.py (~20 s for 7B).
#
# Knobs (environment): CONFIG (shapes, default the llama-2-7b preset), NUM IN OUTLEN RATIO (workload),
# SEQS (--max-num-seqs), MAXLEN (--max-model-len), PEER=0 (skip transformers), PEER_NUM (its request count),
# DTYPE, PY, WORK, INSTALL_WHEELS=0 (use what is installed). CPU smoke test at tiny shapes, e.g.
#   JAX_PLATFORMS=cpu PY=.venv/bin/python INSTALL_WHEELS=0 CONFIG=/tmp/tiny.json NUM=6 IN=16 OUTLEN=8 SEQS=4 \
#       MAXLEN=128 DTYPE=float32 OUT=/tmp/o bash tools/gpu_serve_bench.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R="$OUT/results.jsonl"
PY=${PY:-python3}
CONFIG=${CONFIG:-jaxpipe/presets/llama-2-7b.json}
TOK=${TOK:-.serve_bench/tokenizer}
NUM=${NUM:-128}; IN=${IN:-128}; OUTLEN=${OUTLEN:-128}; RATIO=${RATIO:-0.5}
SEQS=${SEQS:-64}; MAXLEN=${MAXLEN:-512}; DTYPE=${DTYPE:-bfloat16}
PEER=${PEER:-1}; PEER_NUM=${PEER_NUM:-$NUM}
WORK=${WORK:-/tmp/serve_bench}; PORT=${PORT:-8000}; PEER_PORT=${PEER_PORT:-8001}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}  # the server reuses offline's programs
mkdir -p "$WORK"
T0=$(date +%s)
log() { tee -a "$OUT/log.txt" | grep --line-buffered '^{' | tee -a "$R" | cut -c1-300; }
say() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
step() { local t=$1; shift; say "$*"; timeout "$t" "$@" 2>&1 | log; echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"; }

if [ "${INSTALL_WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
$PY -c "import fastapi, uvicorn, pydantic, jax, transformers; print('versions', fastapi.__version__, uvicorn.__version__, pydantic.__version__, jax.__version__, transformers.__version__, jax.devices()[0].device_kind)" 2>&1 | tee -a "$OUT/log.txt"

# -- models: a config-only directory (dummy weights) and, when needed, a random checkpoint ----------------
$PY - "$CONFIG" "$TOK" "$WORK/cfg" "$DTYPE" <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import json, os, shutil, sys
from transformers import AutoTokenizer
config, tok_dir, out, dtype = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(tok_dir)
cfg = {k: v for k, v in json.load(open(config)).items() if not k.startswith("_")}
cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype=dtype)
os.makedirs(out, exist_ok=True)
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
tok.save_pretrained(out)
print("config dir", out, "vocab", len(tok))
EOF
DUMMY=$($PY -c "import inspect, jaxpipe; print(int('load_format' in inspect.signature(jaxpipe.LLM).parameters))" 2>/dev/null || echo 0)
if [ "$DUMMY" = 1 ]; then JP_MODEL=$WORK/cfg; JP_LOAD=(--load-format dummy); else JP_MODEL=$WORK/ckpt; JP_LOAD=(); fi
if [ "$PEER" = 1 ] || [ "$DUMMY" != 1 ]; then
    step 240 $PY .serve_bench/make_random_checkpoint.py --config "$WORK/cfg/config.json" --tokenizer "$TOK" \
        --out "$WORK/ckpt" --dtype "$DTYPE"
fi
say "jaxpipe model: $JP_MODEL ${JP_LOAD[*]:-} (dummy weights: $DUMMY)"

W=(--tokenizer "$TOK" --num-prompts "$NUM" --input-len "$IN" --output-len "$OUTLEN" --range-ratio "$RATIO" --seed 0)
health() {  # wait until $1/health answers 200 (at most $2 s) or process $3 dies
    local deadline=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        kill -0 "$3" 2>/dev/null || return 1
        $PY -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('$1/health', timeout=2).status == 200 else 1)" \
            2>/dev/null && return 0
        sleep 1
    done
    return 1
}
stop() {  # SIGINT, then time the exit (at most 20 s, then SIGKILL)
    local t=$(date +%s.%N); kill -INT "$1" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$1" 2>/dev/null && { kill -9 "$1"; echo "killed $2 after 20 s"; }
    echo "{\"bench\": \"serve_shutdown\", \"server\": \"$2\", \"exit_s\": $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $t}")}" | log
}

# -- the same workload offline (LLM.generate): the ceiling the server is measured against -------------------
step 240 $PY tools/bench_serving.py --backend offline --model "$JP_MODEL" "${JP_LOAD[@]}" "${W[@]}" \
    --max-num-seqs "$SEQS" --max-model-len "$MAXLEN" --label offline

# -- jaxpipe serve ------------------------------------------------------------------------------------------
say "starting jaxpipe serve"
$PY -m jaxpipe.serve "$JP_MODEL" "${JP_LOAD[@]}" --dtype "$DTYPE" --port "$PORT" --max-num-seqs "$SEQS" \
    --max-model-len "$MAXLEN" --max-waiting-requests $(( NUM * 4 )) --disable-uvicorn-access-log \
    --served-model-name jaxpipe > "$OUT/serve.log" 2>&1 &
SERVER=$!
if health "http://127.0.0.1:$PORT" 300 $SERVER; then
    say "jaxpipe serve healthy"
    B=(--base-url "http://127.0.0.1:$PORT" --model jaxpipe "${W[@]}")
    step 200 $PY tools/bench_serving.py "${B[@]}" --request-rate inf 0.5x --label jaxpipe
    step 60 $PY tools/bench_serving.py "${B[@]}" --num-prompts 8 --range-ratio 0 --max-concurrency 1 \
        --warmup 0 --label jaxpipe-lone
    $PY -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/metrics').read().decode())" \
        > "$OUT/metrics.txt" 2>&1
else
    say "jaxpipe serve did not get healthy"; tail -30 "$OUT/serve.log"
fi
stop $SERVER jaxpipe
tail -5 "$OUT/serve.log" | tee -a "$OUT/log.txt"

# -- the peer: transformers serve with continuous batching, same shapes ---------------------------------------
if [ "$PEER" = 1 ]; then
    say "starting transformers serve --continuous-batching"
    $PY -c "import sys; from transformers.cli.transformers import app; sys.argv[0] = 'transformers'; app()" \
        serve "$WORK/ckpt" --continuous-batching --host 127.0.0.1 --port "$PEER_PORT" --dtype auto \
        > "$OUT/peer.log" 2>&1 &
    PEERPID=$!
    if health "http://127.0.0.1:$PEER_PORT" 180 $PEERPID; then
        B=(--backend transformers --base-url "http://127.0.0.1:$PEER_PORT" --model "$WORK/ckpt" "${W[@]}"
           --num-prompts "$PEER_NUM" --warmup 2)  # it compiles nothing: a short warm-up loads the model
        step 240 $PY tools/bench_serving.py "${B[@]}" --request-rate inf 0.5x --label transformers-serve-cb
    else
        say "transformers serve did not get healthy"; tail -30 "$OUT/peer.log"
    fi
    stop $PEERPID transformers
fi
say "done"
ls -la "$OUT"
