"""The vocabulary-parallel sampler (jaxpipe/sampler.py) gives exactly what the one-device reference sampler
(jaxpipe/sampling.py ``sample``) gives — tokens, ranks, top ids; logprobs to float rounding — with the
vocabulary in 1, 2 or 4 shards over a ``tensor`` mesh axis, for every sampling feature at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxpipe.sampler import sample_sharded
from jaxpipe.sampling import SamplerSpec, SamplingParams, SamplingTensors, sample, token_ranks

V = 250          # not a multiple of the shard counts: padding columns are exercised
ROWS = 16


def params_rows(rng):
    kinds = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_k=7),
             dict(temperature=0.9, top_p=0.7), dict(temperature=1.2, top_k=20, top_p=0.5),
             dict(temperature=1.0, min_p=0.3), dict(temperature=0.0, repetition_penalty=1.4),
             dict(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, top_p=0.9),
             dict(temperature=0.0, min_tokens=5, stop_token_ids=[3, 140, 249])]
    return [SamplingParams(seed=int(rng.integers(1 << 30)), **kinds[i % len(kinds)]) for i in range(ROWS)]


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("flat", [False, True], ids=["peaked", "flat"])
def test_sharded_sampler_equals_reference(shards, flat):
    rng = np.random.default_rng(shards + 10 * flat)
    params = params_rows(rng)
    st = SamplingTensors.build(params, [p.seed for p in params], ROWS, eos_token_ids=[2], stop_width=8)
    spec = SamplerSpec(num_logprobs=5, all_greedy=False, need_sort=True, penalties=True, stop_width=8)
    n = -(-V // shards)
    Vp = n * shards
    scale = 0.3 if flat else 4.0
    mesh = Mesh(np.array(jax.devices()[:shards]), ("tensor",))
    for step in (0, 3, 9):
        logits = (rng.standard_normal((ROWS, V)) * scale).astype(np.float32)
        pmask = rng.random((ROWS, V)) < 0.05
        counts = (rng.random((ROWS, V)) < 0.05).astype(np.int32) * rng.integers(1, 4, (ROWS, V)).astype(np.int32)
        steps = jnp.full((ROWS,), step, jnp.int32)
        tok, lp, top_ids, top_lp = sample(jnp.asarray(logits), st, steps, jnp.asarray(pmask), jnp.asarray(counts),
                                          num_logprobs=5, all_greedy=False, need_sort=True)
        rank = token_ranks(jnp.asarray(logits), tok)
        pad = lambda a, v: np.pad(a, ((0, 0), (0, Vp - V)), constant_values=v)  # noqa: E731
        axis = "tensor" if shards > 1 else None
        fn = jax.jit(jax.shard_map(
            lambda lg, pm, ct: sample_sharded(lg, st, steps, pm, ct, spec=spec, vocab_size=V, axis=axis,
                                              shards=shards),
            mesh=mesh, in_specs=(P(None, "tensor"),) * 3, out_specs=P(), check_vma=False))
        got = fn(jnp.asarray(pad(logits, 0)), jnp.asarray(pad(pmask, False)), jnp.asarray(pad(counts, 0)))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(tok), err_msg=f"tokens, step {step}")
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(lp), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(rank))
        np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(top_ids))
        np.testing.assert_allclose(np.asarray(got[4]), np.asarray(top_lp), atol=2e-5)
