#!/usr/bin/env python3
"""Peer for ``tools/bench_throughput.py``: transformers' continuous batching (``model.init_continuous_batching``,
a paged KV cache and its own scheduler) on the same seeded workload, random weights at a preset's shapes.
One JSON line on stdout.

    python tools/bench_transformers_cb.py --model llama-2-7b --num-requests 128 --input-len 32:1024 \
        --output-len 16:512

Every request runs to its own length (``max_new_tokens`` per request, EOS disabled), greedy, bf16, on one GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import make_workload, parse_range  # noqa: E402
from bench_transformers import build_random, preset_dict  # noqa: E402


def _finished(result) -> bool:
    if hasattr(result, "is_finished"):
        return bool(result.is_finished())
    try:
        from transformers.generation.continuous_batching.requests import RequestStatus
        return result.status == RequestStatus.FINISHED
    except ImportError:
        return "FINISHED" in str(result.status).upper()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="preset name (random weights)")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=parse_range, default=(32, 1024))
    ap.add_argument("--output-len", type=parse_range, default=(16, 512))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="give up (and report) after this long")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)

    from transformers import GenerationConfig

    cfg = preset_dict(args.model)
    model = build_random(cfg, "static", args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    workload = make_workload(args.num_requests, args.input_len, args.output_len, args.seed, cfg["vocab_size"])
    gen = GenerationConfig(max_new_tokens=max(o for _, o in workload), do_sample=False)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    add_params = inspect.signature(manager.add_request).parameters
    t0 = time.perf_counter()
    for i, (ids, o) in enumerate(workload):
        kwargs = {"eos_token_id": -1} if "eos_token_id" in add_params else {}
        manager.add_request(ids, request_id=f"r{i}", max_new_tokens=o, **kwargs)
    done, out_tokens, seen = 0, 0, 0
    while done < len(workload) and time.perf_counter() - t0 < args.timeout_s:
        result = manager.get_result(timeout=1.0)
        if result is None:
            continue
        seen += 1
        if seen <= 2:
            print(f"[bench_transformers_cb] first results: {type(result).__name__} status="
                  f"{getattr(result, 'status', None)} tokens={len(getattr(result, 'generated_tokens', []))}",
                  file=sys.stderr, flush=True)
        if not _finished(result):
            continue
        done += 1
        out_tokens += len(result.generated_tokens)
    status = getattr(manager, "background_thread_status", None)
    if status is not None and getattr(status, "fatal_error", None) is not None:
        print(f"[bench_transformers_cb] manager failed: {status.fatal_error!r}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    manager.stop(block=True)
    in_tokens = sum(len(ids) for ids, _ in workload[:done])
    print(json.dumps({"bench": "transformers_continuous_batching", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                      "model": args.model, "requests": len(workload), "finished": done,
                      "input_len": list(args.input_len), "output_len": list(args.output_len),
                      "elapsed_s": round(elapsed, 2), "requests_per_s": done / elapsed,
                      "output_tok_s": out_tokens / elapsed, "total_tok_s": (in_tokens + out_tokens) / elapsed,
                      "transformers": __import__("transformers").__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
