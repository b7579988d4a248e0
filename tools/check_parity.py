"""Greedy tokens of jaxpipe against transformers on a small random Llama, for several layouts.

Runs on whatever devices JAX sees (GPU on the device machine; CPU with virtual devices here):

    python tools/check_parity.py --layouts 1x1x1 2x1x2     # pp x tp x microbatches

Writes the random model as an HF checkpoint to a temporary directory, generates through ``LLM`` (the
engine users run) with a stream of four prompts of different lengths, and compares with transformers'
greedy tokens. Prints one JSON line per layout; exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxpipe import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5, 9, 23, 7, 100, 3], [17, 2, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]


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
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
    failed = False
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        for spec in args.layouts:
            pp, tp, mb = (int(x) for x in spec.split("x"))
            llm = LLM(model=d, dtype="float32", max_model_len=64, pipeline_parallel_size=pp,
                      tensor_parallel_size=tp, num_microbatches=mb, max_num_seqs=4, progress=False,
                      tokenizer=None if os.path.exists(os.path.join(d, "tokenizer.json")) else _tokenizer(d))
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True),
                                use_tqdm=False)
            same = [list(o.outputs[0].token_ids) for o in outs] == ref
            failed |= not same
            print(json.dumps({"check": "parity", "device": jax.devices()[0].device_kind, "layout": spec,
                              "identical": same}), flush=True)
    sys.exit(1 if failed else 0)


def _tokenizer(d: str) -> str:
    """A word-level tokenizer saved next to the model (LLM needs one; the ids are what is compared)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<t{i}>": i for i in range(3, 256)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    return d


if __name__ == "__main__":
    main()
