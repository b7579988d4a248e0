"""The fused decode step (``jaxpipe.kernels.decode_attention.fused_decode_attention``, the GPUs' default
decode attention), run through Pallas' interpreter on CPU against the model's unfused step: rotary
embedding, the masked cache scatter and XLA attention. And the whole engine with it against XLA attention."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import model as model_mod
from jaxpipe.kernels import decode_attention as da

# The reference (the model's unfused step) lives with the GPU check, tools/check_decode_attention.py.
_spec = importlib.util.spec_from_file_location(
    "check_decode_attention", Path(__file__).resolve().parents[1] / "tools" / "check_decode_attention.py")
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)

# (name, layers, rows, kv_heads, group, head_dim, cache positions, batch rows, row0)
CASES = [
    ("mha_one_split", 2, 5, 2, 1, 32, 256, 3, 1),
    ("gqa_three_splits", 2, 4, 2, 3, 64, 1100, 4, 0),
    ("gqa_one_kv_head", 1, 2, 1, 4, 16, 600, 2, 0),
]


def _inputs(layers, rows, n_kv, group, d, n_pos, b, dtype, seed=0):
    rng = np.random.default_rng(seed)
    n_heads = n_kv * group
    shape = (layers, rows, n_kv, n_pos, d)
    k_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    qkv = jnp.asarray(rng.standard_normal((b, (n_heads + 2 * n_kv) * d)), dtype)
    # Positions at and around the split boundaries, the first and the last position, and a dead row.
    candidates = [0, da.SPLIT - 1, da.SPLIT, n_pos - 1, n_pos // 2, 7]
    positions = jnp.asarray([min(candidates[i % len(candidates)], n_pos - 1) for i in range(b)], jnp.int32)
    live = jnp.asarray([i != 1 for i in range(b)])
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    freqs = np.asarray(positions, np.float32)[:, None] * inv_freq.astype(np.float32)
    return qkv, jnp.cos(freqs), jnp.sin(freqs), k_cache, v_cache, positions, live, n_heads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_step_equals_the_unfused_step(case, dtype):
    _, layers, rows, n_kv, group, d, n_pos, b, row0 = case
    qkv, cos, sin, k_cache, v_cache, positions, live, n_heads = _inputs(layers, rows, n_kv, group, d, n_pos, b,
                                                                        dtype)
    layer = layers - 1
    fused = jax.jit(lambda *a: da.fused_decode_attention(*a, n_heads=n_heads, interpret=True))
    got = fused(qkv, cos, sin, k_cache, v_cache, jnp.int32(layer), jnp.int32(row0), positions, live)
    want = jax.jit(lambda *a: _tool.unfused_step(*a, n_heads=n_heads))(qkv, cos, sin, k_cache, v_cache, layer, row0,
                                                              positions, live)
    out, kc, vc = (np.asarray(a, np.float32) for a in got)
    out_w, kc_w, vc_w = (np.asarray(a, np.float32) for a in want)
    # The caches: the new keys and values written bit for bit where the scatter writes them (live rows at
    # their positions), every other position untouched.
    np.testing.assert_array_equal(vc, vc_w)
    np.testing.assert_array_equal(kc, kc_w)
    live_rows = np.asarray(live)
    changed = np.any(kc != np.asarray(k_cache, np.float32), axis=(2, 4))  # [layers, rows, positions]
    assert changed.sum() == live_rows.sum()
    for r in np.flatnonzero(live_rows):
        assert changed[layer, row0 + r, int(positions[r])]
    tol = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out[live_rows], out_w[live_rows], rtol=tol, atol=tol)
    assert np.all(out[~live_rows] == 0)  # a dead row attends to nothing


def test_engine_with_the_fused_step_equals_xla_attention(tiny_checkpoint, monkeypatch):
    """Greedy and sampled tokens of a stream of mixed requests through the decode ring with the fused step
    (interpreted) are those of XLA attention (GQA, several microbatches of slots). On one device only:
    Pallas' interpreter fails under ``shard_map(check_vma=True)`` over axes of size > 1 (its internal
    slices mix varying and invariant operands); the layouts' local shapes reach the kernel as they reach
    the XLA path, and the kernel test above covers row offsets, splits and dead rows."""
    from jaxpipe import LLM, SamplingParams

    path, _ = tiny_checkpoint(kv_heads=2)
    fused, traced = da.fused_decode_attention, []

    def interpreted(*a, **kw):
        traced.append(kw["n_heads"])
        return fused(*a, **kw, interpret=True)

    monkeypatch.setattr(model_mod, "fused_decode_attention", interpreted)
    prompts = [[3 + (i * 7 + j) % 200 for j in range(3 + 5 * i)] for i in range(6)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=4 + 3 * i, ignore_eos=True)
              for i in range(6)]
    tokens = {}
    for attention in ("xla", "pallas"):
        llm = LLM(str(path), max_num_seqs=4, max_model_len=64, attention=attention)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        tokens[attention] = [list(o.outputs[0].token_ids) for o in outs]
    assert traced and set(traced) == {4}  # the decode programs took the fused step (4 query heads)
    assert tokens["pallas"] == tokens["xla"]
    assert [len(t) for t in tokens["xla"]] == [4 + 3 * i for i in range(6)]
