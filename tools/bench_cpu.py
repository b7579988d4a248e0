"""CPU benchmark: the default model (SmolLM2-135M-Instruct, float32) through ``jaxpipe.LLM`` next to
transformers eager on the same weights, in one run. Prints one JSON line per measurement.

    python tools/bench_cpu.py --batch 1 8 --new-tokens 64

Both sides get the same random prompt tokens (``--prompt-len``), greedy decoding, EOS ignored. jaxpipe is
timed after a warm-up call with the same shapes (compilation excluded, as transformers eager has none);
``decode_ms_per_step`` is the decode time over the decode steps (the first token comes from prefill).
transformers runs in a subprocess (tools/bench_transformers.py --device cpu) so the two never share
threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from jaxpipe import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    llm = LLM(progress=False)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    for b in args.batch:
        prompts = [{"prompt_token_ids": rng.integers(0, llm.cfg.vocab_size, args.prompt_len).tolist()}
                   for _ in range(b)]
        llm.generate(prompts, params, use_tqdm=False)  # compiles
        runs = []
        for _ in range(args.repeats):
            llm.generate(prompts, params, use_tqdm=False)
            runs.append(dict(llm.last_stats))
        st = sorted(runs, key=lambda r: r["decode_s"])[len(runs) // 2]
        steps = args.new_tokens - 1
        print(json.dumps({
            "bench": "jaxpipe_cpu", "model": "SmolLM2-135M-Instruct", "dtype": "float32", "batch": b,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "decode_ms_per_step": st["decode_s"] / steps * 1e3,
            "decode_tok_s": st["decode_tokens"] / st["decode_s"],
            "prefill_ms": st["prefill_s"] * 1e3, "e2e_s": st["wall_s"], "cpus": os.cpu_count(),
        }), flush=True)
    if not args.skip_transformers:
        tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_transformers.py")
        subprocess.run([sys.executable, tool, "--device", "cpu", "--batch", *map(str, args.batch),
                        "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
                        "--impl", "eager", "--repeats", str(args.repeats)], check=True)


if __name__ == "__main__":
    main()
