"""Greedy tokens of jaxpipe against transformers on a small random Llama, for several layouts.

Runs on whatever devices JAX sees (GPU on the device machine; CPU with virtual devices here):

    python tools/check_parity.py --layouts 1x1x1 2x1x2     # pp x tp x microbatches

Prints one JSON line per layout with the tokens' agreement; exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxpipe  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxpipe.config import LlamaConfig  # noqa: E402
from jaxpipe.loading import load_params  # noqa: E402
from jaxpipe.partition import make_layout, make_mesh  # noqa: E402
from jaxpipe.pipeline import Geometry, PipelineModel, greedy_sampler, host_array  # noqa: E402

_HF = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
       "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias",
       "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias",
       "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
       "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}


class StateDictReader:
    """The checkpoint-reader interface over an in-memory transformers state dict."""

    def __init__(self, sd):
        self.sd = {k: v.float().numpy() for k, v in sd.items()}

    def read(self, name, layer=None, rows=None):
        if layer is not None:
            w = self.sd[f"model.layers.{layer}.{_HF[name]}"]
            return w.T if w.ndim == 2 else w
        w = self.sd[{"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                     "lm_head": "lm_head.weight"}[name]]
        return w if rows is None else w[rows]


def generate(pm: PipelineModel, params, prompts, microbatches: int, new: int) -> list[list[int]]:
    B = len(prompts)
    b = -(-B // microbatches)
    rows = b * microbatches
    Pl = max(len(p) for p in prompts)
    geo = Geometry(microbatches, b, Pl + new)
    toks = np.zeros((rows, Pl), np.int32)
    kv_start = np.full(rows, Pl - 1, np.int32)
    for i, p in enumerate(prompts):
        toks[i, Pl - len(p):] = p
        kv_start[i] = Pl - len(p)
    sampler, empty = greedy_sampler(), jnp.zeros((rows, 0), jnp.int32)
    cache, outs = pm.prefill_program(geo, Pl, sampler)(params, pm.new_cache(geo), jnp.asarray(toks),
                                                       jnp.asarray(kv_start), {}, empty, empty)
    gen = [[int(t)] for t in host_array(outs[0])]
    state = pm.initial_decode_state(geo, cache, host_array(outs[0]), empty)
    ticks = pm.ring_slots(geo) * 4
    decode = pm.decode_program(geo, ticks, sampler)
    done_ticks = 0
    while min(len(g) for g in gen[:B]) < new:
        state, o = decode(params, state, jnp.int32(Pl), jnp.asarray(kv_start), {}, empty)
        tok = host_array(o[0])
        for i in range(ticks):
            origin = pm.tick_origin(geo, done_ticks + i)
            if origin:
                mb, k = origin
                for r in range(b):
                    if len(gen[mb * b + r]) == k:
                        gen[mb * b + r].append(int(tok[i, r]))
        done_ticks += ticks
    return [g[:new] for g in gen[:B]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["1x1x1"])
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  attention_bias=True)
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = [[5, 9, 23, 7, 100, 3], [17, 2, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False)[0, len(p):].tolist() for p in prompts]
    cfg = LlamaConfig.from_hf_dict(hc.to_dict())
    reader = StateDictReader(hf.state_dict())
    failed = False
    for spec in args.layouts:
        pp, tp, mb = (int(x) for x in spec.split("x"))
        layout = make_layout(cfg, pp, tp)
        pm = PipelineModel(cfg, layout, make_mesh(layout), jnp.float32)
        got = generate(pm, load_params(reader, pm), prompts, mb, args.new_tokens)
        same = got == ref
        failed |= not same
        print(json.dumps({"check": "parity", "device": jax.devices()[0].device_kind, "layout": spec,
                          "identical": same}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
