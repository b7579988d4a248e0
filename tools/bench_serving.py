#!/usr/bin/env python3
"""Serving benchmark in the manner of `vllm bench serve`: N requests to a running OpenAI-compatible server
(`jaxpipe serve`, or the peer `transformers serve`) with Poisson arrivals at given rates, or all at once,
seeded random prompt and output lengths; one JSON line per rate on stdout (progress on stderr).

    python tools/bench_serving.py --base-url http://127.0.0.1:8000 --tokenizer TOKDIR \\
        --num-prompts 256 --input-len 128 --output-len 128 --range-ratio 0.5 --request-rate inf 0.5x
    # the same workload offline, through LLM.generate in this process (the server's ceiling)
    python tools/bench_serving.py --backend offline --model CKPT --tokenizer TOKDIR --num-prompts 256 ...
    # the peer: `transformers serve CKPT --continuous-batching --port 8001`
    python tools/bench_serving.py --backend transformers --base-url http://127.0.0.1:8001 --model CKPT ...

--request-rate: requests per second (Poisson arrivals: exponential gaps, seeded), `inf` (all at once: the
saturating load), or `Fx` (F times the request throughput the last `inf` run of this invocation reached,
e.g. `0.5x` for half the saturating rate). --max-concurrency caps requests in flight (1: one at a time,
a lone request's latency).

Workload (--seed): input lengths uniform in [L(1-r), L(1+r)] (r = --range-ratio), the same for outputs;
prompts are random non-special token ids. --prompt-format text (default) decodes them to text, re-encodes
and keeps the first L ids, so a server that only takes strings (transformers serve) gets the same prompts
as the others; `ids` sends the ids themselves (jaxpipe and offline only; exact lengths). Every request
streams (`stream: true`), greedy (temperature 0). jaxpipe and offline requests set `ignore_eos` so each
produces exactly its output length; transformers serve has no such field, so its requests may end early
at EOS: every figure counts the tokens actually produced (usage.completion_tokens of the last chunk).

Metrics (as vLLM's): duration = first request sent to last response finished; request_throughput =
completed / duration; output_throughput = output tokens / duration; TTFT = send to the first chunk that
carries text; TPOT = (latency - TTFT) / (output tokens - 1) per request; ITL = gaps between a request's
successive text chunks (a chunk may carry several tokens: mean_tokens_per_chunk says how many); E2EL =
latency. Percentiles over requests (ITL: over all gaps). Offline: only the throughputs.

Warm-up (--warmup all, the default): before the measured runs, the same rates run once, untimed, on a
workload of the same lengths with other prompt tokens (offline: one untimed generate), so that jaxpipe
compiles its programs outside the measurement; `compiled_during_run` / `compile_s_during_run` (from the
server's /metrics) say whether anything was still compiled while measuring. --warmup N sends N short
requests instead (enough for servers that compile nothing, such as transformers serve).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np


def log(msg: str) -> None:
    print(f"[bench_serving] {msg}", file=sys.stderr, flush=True)


# -- workload -------------------------------------------------------------------------------------------


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> np.ndarray:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n)


def make_workload(tokenizer, num: int, input_len: int, output_len: int, ratio: float, seed: int,
                  prompt_format: str, token_seed: int | None = None) -> list[Request]:
    """``num`` requests; lengths from ``seed``, prompt tokens from ``token_seed`` (default: ``seed``), so
    that a warm-up can have the same shapes as the measured run but other prompts."""
    rng = np.random.default_rng(seed)
    ins, outs = lengths(rng, input_len, ratio, num), lengths(rng, output_len, ratio, num)
    trng = rng if token_seed is None else np.random.default_rng(token_seed)
    special = set(tokenizer.all_special_ids)
    vocab = np.array([t for t in range(len(tokenizer)) if t not in special])
    reqs = []
    for n_in, n_out in zip(ins, outs):
        ids = trng.choice(vocab, size=int(n_in)).tolist()
        if prompt_format == "text":  # text that re-encodes to (about) n_in tokens
            text = tokenizer.decode(ids)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:int(n_in)]
            reqs.append(Request(tokenizer.decode(ids), len(ids), int(n_out)))
        else:
            reqs.append(Request(ids, len(ids), int(n_out)))
    return reqs


# -- one request over HTTP --------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0


def request_body(args, req: Request) -> dict:
    body = {"prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.model is not None:
        body["model"] = args.model
    if args.backend == "jaxpipe":
        body["ignore_eos"] = True
    return body


async def send(session, args, req: Request) -> Result:
    import aiohttp

    res = Result()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    t0 = last = time.perf_counter()
    texts = 0
    try:
        async with session.post(args.base_url.rstrip("/") + "/v1/completions", json=request_body(args, req),
                                headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = json.dumps(chunk["error"])[:300]
                    return res
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                if any(c.get("text") for c in chunk.get("choices") or []):
                    if texts == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    texts += 1
        res.latency = time.perf_counter() - t0
        res.chunks = texts
        if res.output_tokens == 0:  # no usage reported: one token per text chunk
            res.output_tokens = texts
        res.ok = texts > 0
        if not res.ok:
            res.error = "no text in the response"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def scrape(args) -> dict[str, float]:
    """jaxpipe's compile counters from /metrics ({} for servers that have none)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.get(args.base_url.rstrip("/") + "/metrics") as resp:
                text = await resp.text() if resp.status == 200 else ""
    except aiohttp.ClientError:
        return {}
    out = {}
    for line in text.splitlines():
        for key in ("jaxpipe:compiled_programs_total", "jaxpipe:compile_seconds_total"):
            if line.startswith(key + "{") or line.startswith(key + " "):
                out[key] = float(line.rsplit(" ", 1)[1])
    return out


async def run_rate(args, reqs: list[Request], rate: float) -> tuple[list[Result], float]:
    import aiohttp

    rng = np.random.default_rng(args.seed + 1)
    gaps = np.zeros(len(reqs)) if math.isinf(rate) else rng.exponential(1.0 / rate, size=len(reqs))
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     trust_env=False) as session:
        async def one(req):
            if limit is None:
                return await send(session, args, req)
            async with limit:
                return await send(session, args, req)

        t0 = time.perf_counter()
        tasks = []
        for req, gap in zip(reqs, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 3) if len(values) else None


def summarize(args, reqs, results: list[Result], duration: float, rate) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or q.prompt_len for r, q in zip(results, reqs) if r.ok)
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [g for r in ok for g in r.itl]
    e2el = [r.latency for r in ok]
    rec = {
        "bench": "serving", "backend": args.backend, "label": args.label, "base_url": args.base_url,
        "model": args.model, "date": datetime.date.today().isoformat(),
        "request_rate": "inf" if math.isinf(rate) else round(rate, 4), "max_concurrency": args.max_concurrency,
        "num_prompts": len(reqs), "input_len": args.input_len, "output_len": args.output_len,
        "range_ratio": args.range_ratio, "prompt_format": args.prompt_format, "seed": args.seed,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": round(duration, 3), "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "requested_output_tokens": sum(q.output_len for q in reqs),
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        "mean_tokens_per_chunk": round(out_tokens / max(1, sum(r.chunks for r in ok)), 3),
    }
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        rec[f"mean_{name}_ms"] = round(float(np.mean(vals)) * 1e3, 3) if vals else None
        rec[f"p50_{name}_ms"] = pct(vals, 50)
        rec[f"p99_{name}_ms"] = pct(vals, 99)
    return rec


# -- offline: the same workload through LLM.generate --------------------------------------------------------


def run_offline(args, reqs: list[Request], warm: list[Request]) -> dict:
    from jaxpipe import LLM, SamplingParams

    kwargs = dict(model=args.model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    if args.load_format:
        kwargs["load_format"] = args.load_format
    llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
    def inputs(qs):
        return ([{"prompt_token_ids": q.prompt} if isinstance(q.prompt, list) else q.prompt for q in qs],
                [SamplingParams(temperature=0.0, max_tokens=q.output_len, ignore_eos=True) for q in qs])

    if warm:
        llm.generate(*inputs(warm), use_tqdm=False)  # compile outside the timed run
    prompts, params = inputs(reqs)
    stats = getattr(getattr(llm, "llm_engine", None), "stats", None)
    before = stats() if stats else None
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - t0
    after = stats() if stats else None
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {"bench": "serving", "backend": "offline", "label": args.label, "model": args.model,
            "date": datetime.date.today().isoformat(), "request_rate": "inf", "num_prompts": len(reqs),
            "input_len": args.input_len, "output_len": args.output_len, "range_ratio": args.range_ratio,
            "prompt_format": args.prompt_format, "seed": args.seed, "completed": len(outs),
            "duration_s": round(duration, 3), "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": round(len(outs) / duration, 4),
            "output_throughput": round(out_tokens / duration, 2),
            "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
            **({"compiled_during_run": after.num_compiled_programs - before.num_compiled_programs,
                "compile_s_during_run": round(after.compile_s - before.compile_s, 3)}
               if after is not None and hasattr(after, "num_compiled_programs") else {})}


# -- main ---------------------------------------------------------------------------------------------------


def parse_rate(text: str) -> str | float:
    if text.lower() in ("inf", "infinity"):
        return math.inf
    if text.endswith("x"):
        float(text[:-1])
        return text
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be positive, 'inf' or 'Fx', got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["jaxpipe", "transformers", "offline"], default="jaxpipe")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (not for offline)")
    ap.add_argument("--model", default=None,
                    help="the model name sent in requests (server backends; omitted when not given), or the "
                         "checkpoint to load (offline)")
    ap.add_argument("--tokenizer", required=True, help="a directory with the model's tokenizer files")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.0)
    ap.add_argument("--prompt-format", choices=["text", "ids"], default="text")
    ap.add_argument("--request-rate", type=parse_rate, nargs="+", default=[math.inf])
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--warmup", default="all",
                    help="untimed requests before the first rate: N of them (short outputs), or 'all' (default): "
                         "the whole workload's shapes with other prompt tokens, at once, so that no program is "
                         "compiled during the measurement")
    ap.add_argument("--request-timeout", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default=None, help="a free-form tag copied into every JSON line")
    off = ap.add_argument_group("offline backend (LLM arguments)")
    off.add_argument("--max-num-seqs", type=int, default=None)
    off.add_argument("--max-model-len", type=int, default=None)
    off.add_argument("--load-format", default=None)
    args = ap.parse_args(argv)
    if not 0 <= args.range_ratio < 1:
        ap.error("--range-ratio must be in [0, 1)")
    if args.warmup != "all" and not (args.warmup.isdigit()):
        ap.error(f"--warmup takes a number of requests or 'all', got {args.warmup!r}")
    if args.backend == "transformers" and args.prompt_format == "ids":
        ap.error("transformers serve takes string prompts only: use --prompt-format text")
    if args.backend == "offline" and args.model is None:
        ap.error("--backend offline needs --model (the checkpoint)")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    reqs = make_workload(tokenizer, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                         args.seed, args.prompt_format)
    log(f"{len(reqs)} requests, prompts {min(q.prompt_len for q in reqs)}..{max(q.prompt_len for q in reqs)} "
        f"tokens, outputs {min(q.output_len for q in reqs)}..{max(q.output_len for q in reqs)}")
    if args.warmup == "all":
        warm = make_workload(tokenizer, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                             args.seed, args.prompt_format, token_seed=args.seed + 99)
    else:
        warm = make_workload(tokenizer, int(args.warmup), args.input_len, min(args.output_len, 8), 0.0,
                             args.seed + 99, args.prompt_format)
    if args.backend == "offline":
        print(json.dumps(run_offline(args, reqs, warm)), flush=True)
        return 0

    def measure(workload, timed: bool) -> int:
        saturated: float | None = None
        for rate in args.request_rate:
            if isinstance(rate, str):  # "Fx": a fraction of the saturating request rate
                if saturated is None:
                    log(f"--request-rate {rate} needs an earlier 'inf' rate in the same invocation")
                    return 2
                rate = float(rate[:-1]) * saturated
            log(f"{'request rate' if timed else 'warm-up at'} {rate:g} req/s ...")
            before = asyncio.run(scrape(args)) if timed else {}
            results, duration = asyncio.run(run_rate(args, workload, rate))
            rec = summarize(args, workload, results, duration, rate)
            if math.isinf(rate):
                saturated = rec["request_throughput"]
            if timed:
                after = asyncio.run(scrape(args))
                if after:  # programs compiled during the measurement (0 after a full warm-up)
                    rec["compiled_during_run"] = int(after["jaxpipe:compiled_programs_total"]
                                                     - before.get("jaxpipe:compiled_programs_total", 0))
                    rec["compile_s_during_run"] = round(after["jaxpipe:compile_seconds_total"]
                                                        - before.get("jaxpipe:compile_seconds_total", 0), 3)
                print(json.dumps(rec), flush=True)
            if rec["failed"]:
                log(f"{rec['failed']} requests failed{'' if timed else ' in the warm-up'}: {rec['errors']}")
                if not timed:
                    return 1
        return 0

    if warm and args.warmup == "all":  # every rate once, untimed, on prompts of the same shapes
        if measure(warm, timed=False):
            return 1
    elif warm:
        log(f"warm-up: {len(warm)} requests")
        results, _ = asyncio.run(run_rate(args, warm, math.inf))
        bad = [r.error for r in results if not r.ok]
        if bad:
            log(f"warm-up failed: {bad[0]}")
            return 1
    return measure(reqs, timed=True)


if __name__ == "__main__":
    sys.exit(main())
