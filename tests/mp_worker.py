"""One process of a multi-process jaxpipe run, for tests/test_multiprocess.py.

    python tests/mp_worker.py --model DIR --layouts 4x1 2x2 [--coordinator HOST:PORT --num-processes N
        --process-id I] [--max-model-len L] [--mode generate|init] [--timeout S]

Prints one line ``MPWORKER {json}``: in ``generate`` mode the greedy tokens per layout (PPxTP) and which
checkpoint tensors this process read, seeded samples and prompt logprobs; in ``init`` mode just that ``jaxpipe.distributed.initialize``
returned. A jaxpipe error prints ``MPWORKER_ERROR {json}`` (its class and message) and exits with 2.
Give the process its CPU devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=K``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPTS = [[5, 9, 23, 7, 100, 3], [17, 2, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", nargs="*", default=["4x1"])
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--mode", choices=["generate", "init"], default="generate")
    args = ap.parse_args()

    from jaxpipe import distributed
    from jaxpipe.errors import JaxpipeError

    t0 = time.monotonic()
    try:
        # What the CLI does: initialize from flags first; LLM's own call is then a no-op.
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
        if args.mode == "init":
            print("MPWORKER " + json.dumps({"initialized": distributed.is_initialized(),
                                            "elapsed_s": time.monotonic() - t0}), flush=True)
            return 0
        out = generate(args)
    except JaxpipeError as e:
        print("MPWORKER_ERROR " + json.dumps({"error": type(e).__name__, "message": str(e),
                                              "elapsed_s": time.monotonic() - t0}), flush=True)
        return 2
    print("MPWORKER " + json.dumps(out), flush=True)
    return 0


def generate(args) -> dict:
    import jax

    import jaxpipe.llm as llm_mod
    from jaxpipe import LLM, SamplingParams, distributed

    jax.config.update("jax_default_matmul_precision", "highest")
    reads: list = []
    open_checkpoint = llm_mod.open_checkpoint

    def recording_open(path):  # remember which tensors (and layers, rows) this process reads
        reader = open_checkpoint(path)
        read, read_slice = reader.read, reader.read_slice

        def logged(name, layer=None, rows=None):
            reads.append([name, layer, None if rows is None else [rows.start, rows.stop]])
            return read(name, layer=layer, rows=rows)

        def logged_slice(name, layer=None, index=()):  # what jaxpipe.loading reads through
            rows = index[0] if name in ("embed", "lm_head") and index else None
            reads.append([name, layer, None if rows is None else [rows.start, rows.stop]])
            return read_slice(name, layer, index)

        reader.read, reader.read_slice = logged, logged_slice
        return reader

    llm_mod.open_checkpoint = recording_open
    results, sampled, scored, read_log = {}, {}, {}, {}
    for spec in args.layouts:
        pp, tp = (int(x) for x in spec.split("x"))
        reads.clear()
        llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len,
                  pipeline_parallel_size=pp, tensor_parallel_size=tp, progress=False)
        greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        seeded = SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=args.max_tokens, ignore_eos=True)
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=3)
        # One batch mixing greedy, seeded and scoring requests: each must give what it gives alone.
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        outs = llm.generate(prompts * 3, [greedy] * len(PROMPTS) + [seeded] * len(PROMPTS)
                            + [scoring] * len(PROMPTS), use_tqdm=False)
        n = len(PROMPTS)
        results[spec] = [o.outputs[0].token_ids for o in outs[:n]]
        sampled[spec] = [o.outputs[0].token_ids for o in outs[n:2 * n]]
        # Per prompt token after the first: (its id's logprob, the top-3 ids by logprob).
        scored[spec] = [[[lp[t].logprob, sorted(lp, key=lambda k: -lp[k].logprob)[:3]]
                         for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])] for o in outs[2 * n:]]
        read_log[spec] = list(reads)
    # Idempotent: the same options again are a no-op; other ones are refused, naming the difference.
    reinit = {"same": distributed.initialize(args.coordinator, args.num_processes, args.process_id)}
    if args.num_processes:
        try:
            distributed.initialize(args.coordinator, args.num_processes, 1 - args.process_id)
        except distributed.DistributedError as e:
            reinit["different"] = str(e)
    return {"reinit": reinit, "process": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": len(jax.local_devices()), "devices": len(jax.devices()),
            "coordinator": distributed.is_coordinator(), "tokens": results, "sampled": sampled,
            "scored": scored, "reads": read_log}


if __name__ == "__main__":
    sys.exit(main())
