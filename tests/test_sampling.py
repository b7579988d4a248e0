"""SamplingParams validation and the on-device sampler, checked against NumPy references of vLLM's rules."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe.sampling import (SamplingParams, SamplingTensors, process_logits, prompt_mask, sample,
                              token_ranks, update_counts)

sample_jit = jax.jit(sample, static_argnames="num_logprobs")
process_jit = jax.jit(process_logits)
V = 64


def run(logits, params, seeds=None, step=0, pmask=None, counts=None, num_logprobs=0, pad_to=None, eos=()):
    logits = jnp.asarray(logits, jnp.float32)
    b = logits.shape[0]
    seeds = list(range(len(params))) if seeds is None else seeds
    st = SamplingTensors.build(params, seeds, pad_to or b, eos_token_ids=eos)
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))
    pmask = jnp.zeros(logits.shape, bool) if pmask is None else jnp.asarray(pmask)
    counts = jnp.zeros(logits.shape, jnp.int32) if counts is None else jnp.asarray(counts, jnp.int32)
    return sample_jit(logits, st, step, pmask, counts, num_logprobs=num_logprobs)


# ---------------------------------------------------------------- chi-square p-values without scipy

def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)
    (series for small x, Lentz's continued fraction for large x; Numerical Recipes 6.2)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10000):
            ap += 1
            term *= x / ap
            total += term
            if term < total * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(log_front) * h


def test_chi2_sf_matches_closed_forms():
    for x in (0.1, 1.0, 3.0, 10.0, 40.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)             # df=2: e^(-x/2)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)   # df=1: erfc
        assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-10)
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, abs=1e-4)  # table value


def chi2_pvalue(observed, probs):
    observed, probs = np.asarray(observed, float), np.asarray(probs, float)
    assert np.all(observed[probs == 0] == 0), "a token with probability 0 was drawn"
    keep = probs > 0
    expected = probs[keep] * observed.sum()
    assert expected.min() >= 5, "test design: expected counts too small for chi-square"
    stat = float(((observed[keep] - expected) ** 2 / expected).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


# ---------------------------------------------------------------- NumPy reference of vLLM's definitions

def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_penalise(logits, rep, pres, freq, pmask, counts):
    out = np.array(logits, np.float64)
    for i in range(out.shape[0]):
        for t in range(out.shape[1]):
            if pmask[i, t] or counts[i, t] > 0:
                out[i, t] = out[i, t] / rep[i] if out[i, t] > 0 else out[i, t] * rep[i]
            out[i, t] -= freq[i] * counts[i, t] + pres[i] * (counts[i, t] > 0)
    return out


def np_filter(row, temperature, top_k, top_p, min_p):
    """vLLM's positional top-k / top-p over an ascending sort (scattered back), then min-p on probs."""
    row = np.asarray(row, np.float64) / temperature
    order = np.argsort(row)
    s = row[order]
    if 0 < top_k < len(s):  # vLLM treats top_k >= vocab as off
        s = np.where(s < s[len(s) - top_k], -np.inf, s)
    if top_p < 1:
        cum = np.cumsum(np_softmax(s))
        mask = cum <= 1 - top_p
        mask[-1] = False
        s = np.where(mask, -np.inf, s)
    out = np.empty_like(row)
    out[order] = s
    if min_p > 0:
        p = np_softmax(out)
        out = np.where(p < min_p * p.max(), -np.inf, out)
    return out


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1.0), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.1),
    ("min_p", 1.5), ("max_tokens", 0), ("max_tokens", 16.0), ("max_tokens", "16"), ("min_tokens", -1),
    ("min_tokens", 17), ("logprobs", -1), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5), ("stop", [""]), ("stop", 5), ("stop_token_ids", [-1]), ("stop_token_ids", "a"),
])
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert f"SamplingParams.{field} must be" in msg and repr(value) in msg, msg


def test_validation_messages_give_the_allowed_range():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0\.0"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_tokens=4\], got 5"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match=r"n must be 1 when temperature is 0"):
        SamplingParams(n=2, temperature=0)


def test_params_defaults_normalisation_and_immutability():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens, p.min_tokens) == \
        (1, 1.0, 1.0, 0, 0.0, None, 16, 0)
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None and not p.greedy
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[5, 3, 5]).stop_token_ids == (5, 3)
    assert SamplingParams(seed=-1).seed is None and SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(temperature=1e-6).greedy
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-4).greedy
    with pytest.raises(TypeError):
        SamplingParams(no_such_field=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5


def test_vllm_fields_accepted_honoured_or_refused():
    from jaxpipe.sampling import RequestOutputKind

    assert SamplingParams(max_tokens=None).max_tokens is None  # vLLM: until max_model_len
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    assert SamplingParams(best_of=1).best_of == 1 and SamplingParams(extra_args={"a": 1}).extra_args == {"a": 1}
    assert SamplingParams(truncate_prompt_tokens=5).truncate_prompt_tokens == 5
    for field, value in (("best_of", 2), ("logit_bias", {1: 2.0}), ("allowed_token_ids", [1]),
                         ("bad_words", ["x"]), ("logits_processors", [print]), ("structured_outputs", {})):
        with pytest.raises(ValueError, match=rf"{field}.*not supported by jaxpipe"):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop="x", detokenize=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


# ---------------------------------------------------------------- sampler

def test_seed_key_matches_jax_prngkey():
    st = SamplingTensors.build([SamplingParams()] * 3, [0, 7, 2**31 - 1], 3)
    for row, seed in enumerate([0, 7, 2**31 - 1]):
        ref = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
        np.testing.assert_array_equal(np.asarray(st.key[row]), np.asarray(ref))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = jax.random.normal(jax.random.key(0), (8, V)) * 3
    greedy = np.argmax(np.asarray(logits), -1)
    for params in ([SamplingParams(temperature=1.5, top_k=1)] * 8,
                   [SamplingParams(temperature=1.5, top_p=1e-6)] * 8,
                   [SamplingParams(temperature=0)] * 8):
        for step in (0, 3):
            tokens, *_ = run(logits, params, step=step)
            np.testing.assert_array_equal(np.asarray(tokens), greedy)


def test_pad_rows_are_greedy():
    logits = jax.random.normal(jax.random.key(1), (8, V))
    tokens, *_ = run(logits, [SamplingParams(temperature=1.0, top_k=5)] * 2, pad_to=8)
    np.testing.assert_array_equal(np.asarray(tokens)[2:], np.argmax(np.asarray(logits), -1)[2:])


def draw_counts(row_logits, params, rows=1000, steps=20):
    """Token histogram of rows * steps draws: `rows` seeds, each at steps 0..steps-1."""
    logits = jnp.broadcast_to(jnp.asarray(row_logits, jnp.float32), (rows, len(row_logits)))
    counts = np.zeros(len(row_logits), np.int64)
    for step in range(steps):
        tokens, *_ = run(logits, [params] * rows, seeds=list(range(1000, 1000 + rows)), step=step)
        counts += np.bincount(np.asarray(tokens), minlength=len(row_logits))
    return counts


ROW = np.array([2.0, 1.5, 1.2, 1.0, 0.5, 0.2, -0.3, -1.0])


def test_temperature_sampling_matches_softmax():
    counts = draw_counts(ROW, SamplingParams(temperature=0.7))
    assert chi2_pvalue(counts, np_softmax(ROW / 0.7)) > 1e-3
    # The test has power: the same draws reject the untempered distribution.
    assert chi2_pvalue(counts, np_softmax(ROW)) < 1e-6


def test_top_k_top_p_min_p_sampling_matches_reference_distribution():
    for params in (SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=0.9, top_p=0.8),
                   SamplingParams(temperature=1.2, min_p=0.3), SamplingParams(top_k=6, top_p=0.9, min_p=0.1)):
        probs = np_softmax(np_filter(ROW, params.temperature, params.top_k, params.top_p, params.min_p))
        assert 0 < (probs > 0).sum() < len(ROW)  # the filter is exercised
        assert chi2_pvalue(draw_counts(ROW, params, steps=10), probs) > 1e-3, params


def random_case(seed, b=8):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (b, V)).astype(np.float32)
    pmask = rng.random((b, V)) < 0.2
    counts = (rng.random((b, V)) < 0.15) * rng.integers(1, 4, (b, V))
    return logits, pmask, counts.astype(np.int32), rng


def test_penalties_match_reference():
    logits, pmask, counts, _ = random_case(0)
    params = [SamplingParams(temperature=0, repetition_penalty=r, presence_penalty=pp, frequency_penalty=fp)
              for r, pp, fp in [(1.0, 0, 0), (1.3, 0, 0), (0.7, 0, 0), (1.0, 1.5, 0), (1.0, 0, -0.8),
                                (1.2, -0.5, 0.6), (2.0, 2.0, 2.0), (0.5, -2.0, -2.0)]]
    st = SamplingTensors.build(params, [0] * 8, 8)
    penalised, _ = process_jit(jnp.asarray(logits), st, jnp.zeros(8, jnp.int32), jnp.asarray(pmask),
                               jnp.asarray(counts))
    ref = np_penalise(logits, [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                      [p.frequency_penalty for p in params], pmask, counts)
    np.testing.assert_allclose(np.asarray(penalised), ref, rtol=1e-5, atol=1e-5)
    tokens, *_ = run(logits, params, pmask=pmask, counts=counts)  # greedy takes the penalised argmax
    np.testing.assert_array_equal(np.asarray(tokens), ref.argmax(-1))


def test_filters_match_reference():
    logits, pmask, counts, _ = random_case(1)
    params = [SamplingParams(temperature=0.8, top_k=10), SamplingParams(temperature=1.1, top_p=0.7),
              SamplingParams(temperature=0.5, min_p=0.05), SamplingParams(top_k=20, top_p=0.5, min_p=0.02),
              SamplingParams(temperature=1.7, top_k=-1, repetition_penalty=1.5, frequency_penalty=0.5),
              SamplingParams(temperature=2.0, top_k=100, top_p=0.95, presence_penalty=1.0),
              SamplingParams(temperature=0.9, top_k=1), SamplingParams(temperature=0.3, top_p=0.99, min_p=0.5)]
    st = SamplingTensors.build(params, [0] * 8, 8)
    penalised, filtered = process_jit(jnp.asarray(logits), st, jnp.zeros(8, jnp.int32), jnp.asarray(pmask),
                                      jnp.asarray(counts))
    for i, p in enumerate(params):
        ref = np_filter(np.asarray(penalised)[i], p.temperature, max(p.top_k, 0), p.top_p, p.min_p)
        got = np.asarray(filtered)[i]
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref), err_msg=str(p))
        np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-5)


def test_no_sort_path_leaves_logits_unfiltered():
    logits, *_ = random_case(2)
    st = SamplingTensors.build([SamplingParams(temperature=0.5)] * 8, [0] * 8, 8)
    z = jnp.zeros((8, V), jnp.int32)
    _, filtered = process_jit(jnp.asarray(logits), st, z[:, 0], z.astype(bool), z)
    np.testing.assert_allclose(np.asarray(filtered), logits / 0.5, rtol=1e-6)


def test_logprobs_are_raw_log_softmax():
    logits, pmask, counts, _ = random_case(3)
    params = [SamplingParams(temperature=t, repetition_penalty=1.4, top_k=k, logprobs=4)
              for t, k in [(0, 0), (0.7, 0), (1.0, 3), (1.5, 0), (0, 0), (0.3, 8), (1.0, 0), (0, 0)]]
    tokens, token_lp, top_ids, top_lp = run(logits, params, pmask=pmask, counts=counts, num_logprobs=4)
    ref = np_log_softmax(logits)
    tokens = np.asarray(tokens)
    np.testing.assert_allclose(np.asarray(token_lp), ref[np.arange(8), tokens], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(top_ids), np.argsort(-ref, -1)[:, :4])
    np.testing.assert_allclose(np.asarray(top_lp), np.sort(ref, -1)[:, ::-1][:, :4], atol=1e-5)
    ranks = np.asarray(token_ranks(jnp.asarray(logits), jnp.asarray(tokens)))
    np.testing.assert_array_equal(ranks, 1 + (ref > ref[np.arange(8), tokens][:, None]).sum(-1))
    _, _, ids0, lp0 = run(logits, params, num_logprobs=0)
    assert ids0.shape == (8, 0) and lp0.shape == (8, 0) and ids0.dtype == jnp.int32


def test_same_seed_same_token_regardless_of_batch_position_and_size():
    rng = np.random.default_rng(4)
    row = rng.normal(0, 0.3, V).astype(np.float32)  # flat: draws are genuinely random
    p = SamplingParams(temperature=1.0, top_p=0.95)
    others = [SamplingParams(temperature=0.6, top_k=7), SamplingParams(temperature=0), SamplingParams(min_p=0.1)]
    for step in range(6):
        alone, *_ = run(row[None], [p], seeds=[1234], step=step)
        for size, pos, pad in ((4, 3, 8), (8, 5, 8), (12, 0, 16)):
            logits = rng.normal(0, 1, (pad, V)).astype(np.float32)
            logits[pos] = row
            params = [others[i % 3] for i in range(size)]
            params[pos] = p
            seeds = [int(s) for s in rng.integers(0, 2**31, size)]
            seeds[pos] = 1234
            steps = rng.integers(0, 50, pad).astype(np.int32)
            steps[pos] = step
            tokens, *_ = run(logits, params, seeds=seeds, step=steps, pad_to=pad)
            assert int(tokens[pos]) == int(alone[0]), (step, size, pos)
    draws = [int(run(row[None], [p], seeds=[1234], step=s)[0][0]) for s in range(12)]
    assert len(set(draws)) > 3  # the step does change the draw


def test_min_tokens_masks_eos_and_stop_token_ids():
    eos, stop = 2, 5
    logits = np.zeros((8, V), np.float32)
    logits[:, eos], logits[:, stop], logits[:, 9] = 10.0, 9.0, 1.0
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop]),
              SamplingParams(temperature=0.8, min_tokens=3, stop_token_ids=[stop], seed=3),
              SamplingParams(temperature=0, stop_token_ids=[stop])]  # no min_tokens: free to stop
    for step in range(5):
        tokens, token_lp, *_ = run(logits, params, step=step, eos=[eos], pad_to=8)
        tokens = np.asarray(tokens)
        if step < 3:
            assert tokens[0] == 9 and tokens[1] not in (eos, stop), (step, tokens)
        else:
            assert tokens[0] == eos
        assert tokens[2] == eos
        # logprobs stay those of the raw logits (the ban is a sampling rule, not part of the model output)
        np.testing.assert_allclose(np.asarray(token_lp), np_log_softmax(logits)[np.arange(8), tokens], atol=1e-5)


def test_update_counts_and_prompt_mask():
    counts = jnp.zeros((3, 8), jnp.int32)
    counts = update_counts(update_counts(counts, jnp.array([1, 2, 1])), jnp.array([1, 0, 7]))
    expect = np.zeros((3, 8), np.int32)
    expect[0, 1], expect[1, 2], expect[1, 0], expect[2, 1], expect[2, 7] = 2, 1, 1, 1, 1
    np.testing.assert_array_equal(np.asarray(counts), expect)
    mask = prompt_mask(jnp.array([[3, 4, -1], [7, 7, 0]]), 8)
    np.testing.assert_array_equal(np.asarray(mask).nonzero(), ([0, 0, 1, 1], [3, 4, 0, 7]))


def test_build_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pad_to"):
        SamplingTensors.build([SamplingParams()] * 3, [0, 1, 2], 2)
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.build([SamplingParams()] * 3, [0, 1], 4)
