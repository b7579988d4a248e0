#!/usr/bin/env python3
"""Where a decode step's device time goes: per-kernel times from JAX's profiler (CUPTI on GPUs).

Builds the same run as ``jaxpipe bench`` (random weights at a preset's shapes, every slot prefilled, decode
dispatches of 16 steps), traces ``--dispatches`` dispatches after a warm-up one, and prints one JSON line per
kernel group (kernels named alike up to their numbers: ``loop_fusion.12`` and ``loop_fusion.7`` are one
group), largest first, with its device time and launches per step; then one summary line: the step's
wall time, the device's busy time (the union of kernel intervals) and the idle rest.

    python tools/profile_decode.py --preset llama-2-7b --batch 1 --quantization int8 --trace-dir /tmp/prof

The trace itself (``perfetto_trace.json.gz``, openable in ui.perfetto.dev) stays under ``--trace-dir``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpipe import bench  # noqa: E402
from jaxpipe.presets import load_preset, preset_names  # noqa: E402
from jaxpipe.quantize import QUANT_KINDS  # noqa: E402


def device_events(trace: dict) -> list[dict]:
    """The complete ("X") events of the trace's device processes (``/device:GPU:N`` in JAX's traces), or of
    every non-host process when none is named so."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if name.startswith("/device:")}
    if not device:
        device = {pid for pid, name in names.items() if "host" not in name.lower()}
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in device and "dur" in e]


def group_name(name: str) -> str:
    """A kernel's group: its name without numeric suffixes and template noise."""
    name = name.replace("(anonymous namespace)::", "")
    if name.startswith("void "):  # a CUDA C++ kernel: keep its template arguments (the tiling, the variant)
        return name[5:].split("(")[0]
    name = name.split("(")[0].split("<")[0]
    return re.sub(r"[._]\d+", "", name)


def busy_us(events: list[dict]) -> float:
    """Length of the union of the events' intervals (overlapping streams counted once)."""
    total, end = 0.0, None
    for e in sorted(events, key=lambda e: e["ts"]):
        s, f = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if end is None or s > end:
            total += f - s
            end = f
        elif f > end:
            total += f - end
            end = f
    return total


def summarize(events: list[dict], steps: int, top: int) -> tuple[list[dict], dict]:
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        groups[group_name(e["name"])].append(float(e["dur"]))
    rows = [{"kernel": k, "us_per_step": sum(v) / steps, "launches_per_step": len(v) / steps,
             "mean_us": sum(v) / len(v)} for k, v in groups.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    span = (max(float(e["ts"]) + float(e["dur"]) for e in events) - min(float(e["ts"]) for e in events)) if events else 0
    summary = {"kernel_us_per_step": sum(r["us_per_step"] for r in rows),
               "busy_us_per_step": busy_us(events) / steps, "span_us_per_step": span / steps,
               "launches_per_step": len(events) / steps, "groups": len(rows)}
    return rows[:top], summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b", choices=preset_names())
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default=None, choices=QUANT_KINDS)
    p.add_argument("--unroll", type=int, default=None)
    p.add_argument("--attention", default=None, choices=("xla", "pallas"))
    p.add_argument("--dispatches", type=int, default=3, help="traced decode dispatches (of bench.STEPS_PER_DISPATCH steps)")
    p.add_argument("--top", type=int, default=40, help="kernel groups printed")
    p.add_argument("--trace-dir", default="/tmp/jaxpipe-profile")
    p.add_argument("--label", default="", help="copied into every line")
    args = p.parse_args(argv)

    cfg = load_preset(args.preset)
    run = bench.build(cfg, pp=1, tp=1, microbatches=1, batch=args.batch, prompt_len=args.prompt_len,
                      new_tokens=bench.STEPS_PER_DISPATCH * (args.dispatches + 2), dtype=jnp.dtype(args.dtype), unroll=args.unroll,
                      attention=args.attention, quantization=args.quantization)
    jax.block_until_ready(run.prefill())
    jax.block_until_ready(run.decode())  # compiles
    jax.block_until_ready(run.decode())
    t0 = time.perf_counter()
    for _ in range(args.dispatches):
        jax.block_until_ready(run.decode())
    untraced_ms = (time.perf_counter() - t0) / (args.dispatches * run.ticks) * 1e3
    os.makedirs(args.trace_dir, exist_ok=True)
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(args.dispatches):
            jax.block_until_ready(run.decode())
        traced_ms = (time.perf_counter() - t0) / (args.dispatches * run.ticks) * 1e3
    paths = sorted(glob.glob(os.path.join(args.trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        print(json.dumps({"error": f"no perfetto_trace.json.gz under {args.trace_dir}"}), flush=True)
        return 1
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = device_events(trace)
    steps = args.dispatches * run.ticks
    rows, summary = summarize(events, steps, args.top)
    base = {"label": args.label, "batch": args.batch, "quantization": args.quantization}
    for r in rows:
        print(json.dumps({**base, **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}}),
              flush=True)
    print(json.dumps({**base, "summary": True, "step_ms_untraced": round(untraced_ms, 3),
                      "step_ms_traced": round(traced_ms, 3),
                      **{k: round(v, 1) if isinstance(v, float) else v for k, v in summary.items()},
                      "trace": paths[-1]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
