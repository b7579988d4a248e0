"""Logit parity with transformers (float32, one device) for tiny random Llama variants.

For each variant, ``LLM.debug_logits`` runs a batch of three prompts of different lengths (one token, a
few, and one past the 16-token prompt bucket) and 16 greedy steps. transformers' forward over the whole
sequence (prompt + generated tokens) gives the reference logits of every step at once: the prefill logits
at every prompt position and the logits behind each generated token must agree to a relative error of
1e-5 (per position: ||ours - ref|| / ||ref||), and the tokens must be transformers' own greedy ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxpipe import LLM
from jaxpipe.config import LlamaConfig
from jaxpipe.model import Llama

MAX_TOKENS = 16
RTOL = 1e-5
PROMPTS = [[7], [5, 9, 23, 7, 100, 3, 42], [11 + (13 * i) % 240 for i in range(17)]]

VARIANTS = {
    "mha_untied": dict(heads=4, kv_heads=4),
    "gqa_untied": dict(heads=4, kv_heads=2, rope_theta=50000.0),
    "mqa_tied": dict(heads=4, kv_heads=1, tie=True),
    "gqa_tied": dict(heads=4, kv_heads=2, tie=True, layers=3),
    "rope_llama3": dict(kv_heads=2, rope="llama3", rope_theta=500000.0),
    "rope_linear": dict(kv_heads=2, rope="linear"),
    "old_spelling_llama3": dict(kv_heads=2, rope="llama3", rope_theta=500000.0, old_spelling=True),
    "old_spelling_linear": dict(kv_heads=2, rope="linear", old_spelling=True),
    "biases": dict(kv_heads=2, attention_bias=True, mlp_bias=True),
    "several_files": dict(kv_heads=2, layers=4, max_shard_size="100KB"),
}


def rel_err_rows(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Relative error of each row (position): ||ours - ref|| / ||ref||."""
    return np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(variant, tiny_checkpoint, hf_greedy):
    path, hf = tiny_checkpoint(**VARIANTS[variant])
    if VARIANTS[variant].get("max_shard_size"):
        assert len(list(path.glob("*.safetensors"))) > 1, "the variant should span several files"
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, devices=jax.devices()[:1], progress=False)
    tokens, prefill, decode = llm.debug_logits(PROMPTS, max_tokens=MAX_TOKENS)

    for i, prompt in enumerate(PROMPTS):
        n = len(prompt)
        assert len(tokens[i]) == MAX_TOKENS
        assert prefill[i].shape == (n, hf.config.vocab_size)
        assert decode[i].shape == (MAX_TOKENS, hf.config.vocab_size)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + list(tokens[i])])).logits[0].numpy()
        err_prefill = rel_err_rows(np.asarray(prefill[i], np.float32), ref[:n])
        err_decode = rel_err_rows(np.asarray(decode[i], np.float32), ref[n - 1: n - 1 + MAX_TOKENS])
        assert err_prefill.max() <= RTOL, f"prompt {i}: prefill relative errors {err_prefill}"
        assert err_decode.max() <= RTOL, f"prompt {i}: decode relative errors {err_decode}"
        # Greedy: each token is the argmax of its reference logits, and transformers generates the same.
        assert list(tokens[i]) == ref[n - 1: n - 1 + MAX_TOKENS].argmax(-1).tolist()
        assert list(tokens[i]) == hf_greedy(hf, prompt, MAX_TOKENS), f"prompt {i}"


def test_one_row_logits_are_that_row_computed_among_others():
    """``Llama.logits`` runs a single row as two (XLA:GPU would otherwise convert the whole head to float32
    on every batch-1 step): the same values, shape and dtype as the row computed in a batch."""
    cfg = LlamaConfig.from_hf_dict({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                                    "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
    model = Llama(cfg, num_layers=1, vocab_rows=96, end_slices=1, dtype=jnp.float32, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (3, 1, 32), jnp.float32)
    many = np.asarray(model.logits(h))
    for one, shape in ((model.logits(h[:1]), (1, 1, 96)), (model.logits(h[0, 0]), (96,))):
        assert one.shape == shape and one.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(one).reshape(96), many[0, 0], rtol=1e-6, atol=1e-6)
