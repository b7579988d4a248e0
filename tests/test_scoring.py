"""Scoring prompts (issue 16): ``SamplingParams(prompt_logprobs=k)`` against transformers on the same weights.

Every prompt token after the first gets the raw log-softmax of the model's output at the position before it
(within 1e-4 of transformers' float32 forward), its rank among all tokens, and the top k (the same ids), in
every layout and through chunked prefill; scoring requests share the engine with generating ones.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxpipe import LLM, SamplingParams

ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              long_prefill_token_threshold=32, steps_per_dispatch=4, progress=False)
PROMPTS = [[5, 9, 23, 7, 100, 3, 42], [3 + (29 * i) % 250 for i in range(75)], [17, 4]]
K = 3


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(layers=4, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def reference(tiny):
    """Per prompt: transformers' log-softmax at every position ``[len, V]`` (float32)."""
    _, hf = tiny
    with torch.no_grad():
        return [torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1).numpy() for p in PROMPTS]


def check(out, prompt, ref, k):
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        entry, tok, row = plp[pos], prompt[pos], ref[pos - 1]
        assert tok in entry
        assert abs(entry[tok].logprob - row[tok]) <= 1e-4, (pos, entry[tok].logprob, row[tok])
        assert entry[tok].rank == int((row >= row[tok]).sum())
        want = [int(t) for t in np.argsort(-row, kind="stable")[:k]]   # the top k ids, with their logprobs
        assert set(want) <= set(entry) and len(entry) <= k + 1, (pos, sorted(entry), want)
        for t in want:
            assert abs(entry[int(t)].logprob - row[t]) <= 1e-4


@pytest.mark.parametrize("layout", ["one", "pp2", "pp4", "tp2", "pp2xtp2"])
def test_prompt_logprobs_match_transformers(layout, tiny, reference):
    sizes = {"one": {}, "pp2": dict(pipeline_parallel_size=2), "pp4": dict(pipeline_parallel_size=4),
             "tp2": dict(tensor_parallel_size=2), "pp2xtp2": dict(pipeline_parallel_size=2, tensor_parallel_size=2)}
    kw = dict(devices=jax.devices()[:1]) if layout == "one" else {}
    llm = LLM(model=str(tiny[0]), **ENGINE, **kw, **sizes[layout])
    params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=K),
              SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=6)]   # a generating request beside the scoring ones
    for rep in range(2):  # the second time through, everything is reused
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        check(outs[0], PROMPTS[0], reference[0], K)
        check(outs[1], PROMPTS[1], reference[1], 0)
        assert outs[2].prompt_logprobs is None and len(outs[2].outputs[0].token_ids) == 6
        assert len(outs[0].outputs[0].token_ids) == 1


def test_prompt_logprobs_bad_values(tiny):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    llm = LLM(model=str(tiny[0]), **ENGINE, devices=jax.devices()[:1], max_logprobs=5)
    with pytest.raises(ValueError, match=r"prompt_logprobs=6 is more than max_logprobs=5"):
        llm.generate([1, 2, 3], SamplingParams(prompt_logprobs=6), use_tqdm=False)
