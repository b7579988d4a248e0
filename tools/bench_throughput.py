#!/usr/bin/env python3
"""Offline throughput through ``LLM.generate``, in the manner of vLLM's ``benchmark_throughput``, and the
decode step at many live slots against its bytes floor. One JSON line per measurement on stdout.

    # one GPU, Llama-2-7B shapes with random weights (load_format="dummy"), SmolLM2's tokenizer
    python tools/bench_throughput.py --model llama-2-7b --tokenizer TOKDIR --max-num-seqs 128 \
        --max-model-len 1536 --num-requests 1024 --input-len 32:1024 --output-len 16:512 --uniform 128:128
    # CPU smoke run on a tiny preset
    python tools/bench_throughput.py --model smollm2-135m --tokenizer TOKDIR --dtype float32 \
        --num-requests 16 --input-len 8:64 --output-len 4:32 --max-num-seqs 8 --max-model-len 128

Workloads: ``--num-requests`` requests whose prompt (random token ids) and output lengths are drawn
uniformly from the ``--input-len`` and ``--output-len`` ranges with ``--seed``; every request runs to its
length (``ignore_eos``, as vLLM's benchmark). ``--uniform IN:OUT`` adds the same number of requests with
fixed lengths. Reported: requests/s, output tok/s, total tok/s, and the bytes floor of the decode work
(weights + the KV each dispatch actually reads, over ``--bandwidth-gbps``).

``--step-slots N ...``: fill N slots with requests whose context lengths come from the workload, then time
decode dispatches with nothing else running: the step time against its floor (weights + live KV).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def make_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                  vocab: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length) pairs, lengths uniform in the closed ranges."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(input_len[0], input_len[1] + 1))
        o = int(rng.integers(output_len[0], output_len[1] + 1))
        out.append((rng.integers(3, vocab, p).tolist(), o))
    return out


def bytes_per_step(llm, slots_context: list[int]) -> float:
    """Bytes one decode step must read on one device: its weights plus the KV of the live context."""
    from jaxpipe import partition, planning

    cfg, layout = llm.cfg, llm.layout
    nbytes = np.dtype(llm.dtype).itemsize
    weights = max(planning.read_bytes_per_tick(cfg, layout, nbytes, 1, 0))
    kv_heads = partition.kv_heads_per_shard(cfg, layout.tensor_parallel)
    per_token = 2 * max(layout.layer_counts) * kv_heads * cfg.head_dim * nbytes
    return weights + per_token * float(sum(slots_context))


def run_workload(llm, name: str, workload, bw_gbps: float | None) -> dict:
    from jaxpipe import SamplingParams

    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": ids} for ids, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in workload]
    engine.trace = []
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    trace, engine.trace = engine.trace, None
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(ids) for ids, _ in workload)
    assert out_tokens == sum(o for _, o in workload), "every request must run to its length"
    rec = {"bench": "jaxpipe_throughput", "workload": name, "requests": len(workload),
           "elapsed_s": round(elapsed, 3), "requests_per_s": len(workload) / elapsed,
           "output_tok_s": out_tokens / elapsed, "total_tok_s": (in_tokens + out_tokens) / elapsed,
           "prompt_tokens": in_tokens, "output_tokens": out_tokens,
           "compile_s": round(llm.last_stats["compile_s"], 1),
           "output_tok_s_without_compile": out_tokens / (elapsed - llm.last_stats["compile_s"]),
           "decode_dispatches": sum(1 for t in trace if t[0] == "decode"),
           "prefill_dispatches": sum(1 for t in trace if t[0] == "prefill"),
           "mean_live_slots": float(np.mean([t[2] for t in trace if t[0] == "decode"] or [0]))}
    if bw_gbps:
        floor = sum(t[1] * bytes_per_step(llm, t[3]) for t in trace if t[0] == "decode") / (bw_gbps * 1e9)
        rec["decode_floor_s"] = round(floor, 3)
        rec["floor_fraction_of_elapsed"] = floor / (elapsed - llm.last_stats["compile_s"])
        rec["bandwidth_gbps"] = bw_gbps
    return rec


def step_floor(llm, slots: int, workload, bw_gbps: float | None, dispatches: int = 8) -> dict:
    """Fill ``slots`` slots (contexts from the workload), then time decode dispatches alone."""
    from jaxpipe import SamplingParams
    from jaxpipe.sampling import RequestOutputKind

    engine = llm.llm_engine
    D = engine.steps_per_dispatch
    reqs = workload[:slots]
    # Every slot must still be decoding when the timing starts: while the last prompts are prefilled the
    # first ones generate, so leave room and let them run until aborted.
    longest = max(1, engine.max_model_len - 320 - D * (dispatches + 4))
    for i, (ids, _) in enumerate(reqs):
        engine.add_request(f"step-{slots}-{i}", {"prompt_token_ids": ids[:longest]},
                           SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
    engine.step()
    while engine.stats().num_waiting or engine.pending_prefill():
        engine.step()
    for _ in range(2):   # warm: every slot decoding, programs compiled
        engine.step()
    engine.block()
    engine.trace = []
    t0 = time.perf_counter()
    for _ in range(dispatches):
        engine.step()
    engine.block()
    elapsed = time.perf_counter() - t0
    trace, engine.trace = engine.trace, None
    decodes = [t for t in trace if t[0] == "decode"]
    steps = sum(t[1] for t in decodes)
    rec = {"bench": "jaxpipe_decode_step", "slots": slots, "live_slots": float(np.mean([t[2] for t in decodes])),
           "mean_context": float(np.mean([np.mean(t[3]) for t in decodes])), "step_ms": elapsed / steps * 1e3,
           "tok_s": sum(t[1] * t[2] for t in decodes) / elapsed, "attention": engine.attention}
    if bw_gbps:
        floor = sum(t[1] * bytes_per_step(llm, t[3]) for t in decodes) / (bw_gbps * 1e9)
        rec["floor_ms"] = floor / steps * 1e3
        rec["step_over_floor"] = elapsed / floor
        rec["bandwidth_gbps"] = bw_gbps
    engine.abort_request([f"step-{slots}-{i}" for i in range(len(reqs))])
    while engine.has_unfinished_requests():
        engine.step()
    return rec


def long_prompt_admission(llm, running: int, long_len: int, seed: int) -> dict:
    """``running`` requests decoding; then a ``long_len``-token prompt arrives. Inter-token gaps of the
    running requests (time between their successive token deliveries, per token) before and while the long
    prompt is prefilled in chunks, and the long request's time to first token."""
    from jaxpipe import SamplingParams
    from jaxpipe.sampling import RequestOutputKind

    engine = llm.llm_engine
    rng = np.random.default_rng(seed)
    vocab = llm.cfg.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    for i in range(running):
        engine.add_request(f"run-{i}", {"prompt_token_ids": rng.integers(3, vocab, min(128, engine.max_model_len // 4)).tolist()}, params)
    last: dict[str, float] = {}
    gaps: dict[str, list[float]] = {"before": [], "during": []}
    phase, t_long, ttft, steps = "warm", None, None, 0
    while ttft is None or phase != "after":
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outs:
            n = sum(len(c.token_ids) for c in out.outputs)
            if out.request_id == "long":
                if n and ttft is None:
                    ttft = now - t_long
                    phase = "after"
                continue
            if out.request_id in last and n and phase in gaps:
                gaps[phase].append((now - last[out.request_id]) / n)
            if n:
                last[out.request_id] = now
        if phase == "warm" and steps >= 8:
            phase = "before"
        elif phase == "before" and steps >= 16:
            engine.add_request("long", {"prompt_token_ids": rng.integers(3, vocab, long_len).tolist()},
                               SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                              output_kind=RequestOutputKind.DELTA))
            t_long, phase = time.perf_counter(), "during"
    engine.abort_request([f"run-{i}" for i in range(running)] + ["long"])
    while engine.has_unfinished_requests():
        engine.step()
    q = lambda xs, p: float(np.percentile(xs, p) * 1e3) if xs else None  # noqa: E731
    return {"bench": "jaxpipe_long_prompt_admission", "running": running, "long_prompt": long_len,
            "chunk": engine.chunk, "itl_ms_before_p50": q(gaps["before"], 50), "itl_ms_before_max": q(gaps["before"], 100),
            "itl_ms_during_p50": q(gaps["during"], 50), "itl_ms_during_max": q(gaps["during"], 100),
            "long_ttft_s": ttft}


def invariance(llm, workload, n: int, new_tokens: int = 48) -> dict:
    """Greedy: do ``n`` requests give the same tokens alone as all together (``n`` others around them)?"""
    from jaxpipe import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids[:256]} for ids, _ in workload[:n]]
    alone = [list(llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    same = [a == t for a, t in zip(alone, together)]
    first_diff = [next((k for k, (x, y) in enumerate(zip(a, t)) if x != y), None) for a, t in zip(alone, together)]
    return {"bench": "jaxpipe_batch_invariance", "requests": n, "new_tokens": new_tokens,
            "identical": sum(same), "first_differing_token": [d for d in first_diff if d is not None],
            "attention": llm.llm_engine.attention}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="preset name or a directory with config.json "
                                                           "(random weights), or a checkpoint with --load-format auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (needed for presets)")
    ap.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1536)
    ap.add_argument("--pipeline-parallel-size", type=int, default=1)
    ap.add_argument("--steps-per-dispatch", type=int, default=4)
    ap.add_argument("--attention", default=None, choices=[None, "xla", "pallas"])
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--input-len", type=parse_range, default=(32, 1024))
    ap.add_argument("--output-len", type=parse_range, default=(16, 512))
    ap.add_argument("--uniform", type=parse_range, default=None, help="IN:OUT fixed lengths, run after")
    ap.add_argument("--step-slots", type=int, nargs="*", default=[])
    ap.add_argument("--no-workload", action="store_true", help="only the --step-slots measurements")
    ap.add_argument("--invariance", type=int, default=0, metavar="N",
                    help="also: N greedy requests alone vs together (identical tokens?)")
    ap.add_argument("--admit-long", type=int, default=None, metavar="TOKENS",
                    help="also: 32 requests decoding while a prompt of TOKENS tokens is admitted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0, metavar="N",
                    help="first run N requests of another seed's workload, untimed (compiles most programs)")
    ap.add_argument("--bandwidth-gbps", type=float, default=None)
    ap.add_argument("--measure-bandwidth", action="store_true")
    args = ap.parse_args(argv)

    import jax
    from jaxpipe import LLM

    bw = args.bandwidth_gbps
    if args.measure_bandwidth:
        from jaxpipe.bench import copy_bandwidth_gbps
        bw = copy_bandwidth_gbps(jax.devices()[0])
        print(json.dumps({"bench": "copy_bandwidth", "device": jax.devices()[0].device_kind, "gbps": round(bw, 1)}),
              flush=True)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, tokenizer=args.tokenizer, load_format=args.load_format, dtype=args.dtype,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              pipeline_parallel_size=args.pipeline_parallel_size, steps_per_dispatch=args.steps_per_dispatch,
              attention=args.attention, progress=False)
    head = {"device": jax.devices()[0].device_kind, "model": args.model, "dtype": args.dtype,
            "max_num_seqs": llm.max_num_seqs, "max_model_len": args.max_model_len,
            "pp": args.pipeline_parallel_size, "steps_per_dispatch": args.steps_per_dispatch,
            "load_s": round(time.perf_counter() - t0, 1)}
    vocab = llm.cfg.vocab_size
    workload = make_workload(args.num_requests, args.input_len, args.output_len, args.seed, vocab)
    if args.warmup:
        warm = make_workload(args.warmup, args.input_len, args.output_len, args.seed + 1, vocab)
        if args.uniform:
            warm += make_workload(max(1, args.warmup // 4), (args.uniform[0],) * 2, (args.uniform[1],) * 2,
                                  args.seed + 1, vocab)
        t0 = time.perf_counter()
        run_workload(llm, "warmup", warm, None)
        print(json.dumps({"bench": "jaxpipe_throughput_warmup", "requests": len(warm),
                          "s": round(time.perf_counter() - t0, 1), "compile_s": round(llm.last_stats["compile_s"], 1),
                          "programs": llm.llm_engine.engine.num_compiled}), flush=True)
    if not args.no_workload:
        for name, wl in [("mixed", workload)] + ([("uniform", make_workload(
                args.num_requests, (args.uniform[0],) * 2, (args.uniform[1],) * 2, args.seed, vocab))]
                if args.uniform else []):
            rec = run_workload(llm, name, wl, bw)
            rec.update(head, input_len=list(args.input_len if name == "mixed" else (args.uniform[0],) * 2),
                       output_len=list(args.output_len if name == "mixed" else (args.uniform[1],) * 2))
            print(json.dumps(rec), flush=True)
    if args.invariance:
        rec = invariance(llm, workload, args.invariance)
        rec.update(head)
        print(json.dumps(rec), flush=True)
    if args.admit_long:
        rec = long_prompt_admission(llm, min(32, llm.max_num_seqs - 1), args.admit_long, args.seed)
        rec.update(head)
        print(json.dumps(rec), flush=True)
    for slots in args.step_slots:
        if slots > llm.max_num_seqs:
            continue
        rec = step_floor(llm, slots, workload, bw)
        rec.update(head)
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
