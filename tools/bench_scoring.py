#!/usr/bin/env python3
"""Prompt scoring speed: scored prompt tokens per second through ``LLM.generate`` with
``SamplingParams(prompt_logprobs=K, max_tokens=1)`` (what evaluation harnesses and ``echo`` ask for), against
jaxpipe's own prefill of the same prompts (``max_tokens=1``, no prompt logprobs) and against transformers'
forward pass plus ``log_softmax`` and a gather on the same device (run first, in a child process, since JAX
keeps most of the GPU's memory once it starts). One JSON line per measurement on stdout.

    # one GPU, Llama-2-7B shapes with random weights, SmolLM2's tokenizer
    python tools/bench_scoring.py --model llama-2-7b --tokenizer TOKDIR --num-prompts 64 --prompt-len 512
    # CPU smoke run
    python tools/bench_scoring.py --model smollm2-135m --tokenizer TOKDIR --dtype float32 --num-prompts 4 \
        --prompt-len 32 --max-num-seqs 4 --peer-batch 2

Prompts are random token ids of ``--prompt-len`` tokens. Every jaxpipe variant runs once untimed on the same
prompts (compiling its programs), then ``--repeats`` timed runs; the median is reported. The peer scores the
same number of prompts in batches of ``--peer-batch`` (float32 log_softmax over the vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def emit(**rec) -> None:
    print(json.dumps(rec), flush=True)


def make_prompts(num: int, length: int, vocab: int) -> list[list[int]]:
    """The benchmark's prompts: random token ids (seed 0), the same in the peer's process and in jaxpipe's."""
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, length).tolist() for _ in range(num)]


def time_jaxpipe(llm, prompts, params, repeats: int) -> tuple[float, list]:
    llm.generate(prompts, params, use_tqdm=False)  # compiles
    times, outs = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), outs


def peer(cfg_dict: dict, prompts: list[list[int]], batch: int, dtype: str, repeats: int) -> dict | None:
    """transformers: random weights at the same shapes, forward of each batch, float32 log_softmax, gather of
    each next token's logprob (what a harness computes)."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if not k.startswith("_")})
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(tdtype).eval()
    ids = torch.tensor(prompts, device=device)

    def run():
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                x = ids[i:i + batch]
                logits = model(x).logits[:, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])
                total += float(lp.sum())
        if device == "cuda":
            torch.cuda.synchronize()
        return total

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"device": device, "s": statistics.median(times), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="preset name or a directory with config.json")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (needed for presets)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--logprobs", type=int, nargs="+", default=[0, 5], help="prompt_logprobs values to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-batch", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.peer_only:  # the child process below: no JAX here, so the GPU's memory is free for PyTorch
        from jaxpipe.presets import is_preset, preset_dict
        from transformers import AutoTokenizer

        cfg_dict = preset_dict(args.model) if is_preset(args.model) else json.load(
            open(os.path.join(args.model, "config.json")))
        if args.tokenizer:  # LLM resizes a preset's vocabulary to its tokenizer's
            cfg_dict["vocab_size"] = len(AutoTokenizer.from_pretrained(args.tokenizer))
        prompts = make_prompts(args.num_prompts, args.prompt_len, cfg_dict["vocab_size"])
        r = peer(cfg_dict, prompts, args.peer_batch, args.dtype, args.repeats)
        if r is not None:
            emit(bench="transformers_scoring", model=args.model, dtype=args.dtype, prompts=args.num_prompts,
                 prompt_len=args.prompt_len, peer_batch=args.peer_batch, s=round(r["s"], 4),
                 prompt_tok_s=args.num_prompts * args.prompt_len / r["s"], torch=r["torch"], peer_device=r["device"])
        return 0
    if not args.no_peer:
        # First, in its own process: JAX takes most of the GPU's memory when it starts and keeps it.
        import subprocess
        subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                        "--peer-only"], check=False)

    import jax

    from jaxpipe import LLM, SamplingParams

    llm = LLM(model=args.model, tokenizer=args.tokenizer, load_format="dummy", dtype=args.dtype,
              max_num_seqs=args.max_num_seqs, max_model_len=args.prompt_len + 16, progress=False)
    prompts = make_prompts(args.num_prompts, args.prompt_len, llm.cfg.vocab_size)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    tokens = args.num_prompts * args.prompt_len
    head = {"device": jax.devices()[0].device_kind, "model": args.model, "dtype": args.dtype,
            "prompts": args.num_prompts, "prompt_len": args.prompt_len, "max_num_seqs": llm.max_num_seqs}
    base_s, _ = time_jaxpipe(llm, inputs, SamplingParams(temperature=0.0, max_tokens=1), args.repeats)
    emit(bench="jaxpipe_prefill", **head, s=round(base_s, 4), prompt_tok_s=tokens / base_s)
    for k in args.logprobs:
        s, outs = time_jaxpipe(llm, inputs, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k),
                               args.repeats)
        scored = [o.prompt_logprobs for o in outs]
        assert all(len(p) == args.prompt_len and p[0] is None for p in scored)
        total = sum(d[t].logprob for p, ids in zip(scored, prompts) for d, t in zip(p[1:], ids[1:]))
        emit(bench="jaxpipe_scoring", **head, prompt_logprobs=k, s=round(s, 4), prompt_tok_s=tokens / s,
             vs_prefill=base_s / s, sum_logprob=round(total, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
