"""Sampling over a vocabulary split over the ``tensor`` axis, without gathering the logits.

Each tensor shard of the last pipeline stage holds the logits of its own vocabulary columns. Everything
``jaxpipe.sampling.sample`` does (vLLM v1's order: raw logprobs, the min_tokens ban, penalties, greedy /
temperature -> top-k -> top-p -> min-p -> a categorical draw) is computed from per-shard reductions and a
few ``[rows]``-sized collectives over ``tensor``:

- greedy is a distributed argmax (each shard's max and its global index; ties go to the lowest index, as
  ``jnp.argmax``);
- the top-k and top-p thresholds are found by bisection on the order-preserving integer image of float32:
  32 rounds of "how many tokens (how much probability) lie above this value" summed over shards, which
  ends exactly on the k-th largest value and on the smallest value top-p keeps — the same thresholds the
  sort in ``sampling._top_k_top_p`` finds, with no sort and no gather;
- the categorical draw is Gumbel-max: the noise of token ``j`` is element ``j`` of
  ``jax.random.gumbel(fold_in(row key, step), [V])``, which every shard draws and slices. That is exactly
  ``jax.random.categorical``'s noise, so a seeded request draws the same token in every layout and batch;
- logprobs need the global log-sum-exp, the rank a psum of counts, the top-k logprobs each shard's top k.

With ``axis=None`` (one shard) the collectives vanish and the results equal ``sampling.sample``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpipe.sampling import SamplerSpec, SamplingTensors, apply_penalties

NEG_INF = -jnp.inf


def _psum(x, axis):
    return jax.lax.psum(x, axis) if axis else x


def _pmax(x, axis):
    return jax.lax.pmax(x, axis) if axis else x


def gather_shards(x: jax.Array, axis: str | None) -> jax.Array:
    """``x [..., k]`` of every shard of mesh axis ``axis`` -> ``[..., shards * k]`` (shard order), the same on
    every shard (typed invariant over ``axis``, which ``shard_map(check_vma=True)`` needs of replicated
    results); ``x`` itself when ``axis`` is None."""
    return jax.lax.all_gather(x, axis, axis=x.ndim - 1, tiled=True, to="invarying") if axis else x


def _ordered(x):
    """uint32 keys that order like the float32 values (-inf lowest)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _bisect_max(pred, like):
    """Per row, the largest uint32 ``t`` with ``pred(t)`` true (``pred`` monotone: true for small ``t``,
    and true at 0). ``like [b]``: the bounds start as arrays like it, so that they vary over the mesh axes
    the data does (a loop carry must keep its type under ``check_vma``)."""
    lo = jnp.zeros_like(like, jnp.uint32)
    hi = jnp.full_like(like, 0xFFFFFFFF, jnp.uint32)

    def body(_, lh):
        lo, hi = lh
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        ok = pred(mid) & (gap > 0)
        return jnp.where(ok, mid, lo), jnp.where(ok | (gap == 0), hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 33, body, (lo, hi))
    return lo


def _argmax(x, gid, axis):
    """Distributed argmax of ``x [b, n_local]`` whose columns are the global ids ``gid [n_local]``."""
    m = jnp.max(x, axis=-1)
    i = jnp.argmax(x, axis=-1)
    g = gid[i]
    if not axis:
        return g.astype(jnp.int32)
    ms, gs = gather_shards(m[:, None], axis), gather_shards(g[:, None], axis)
    best = jnp.max(ms, axis=-1, keepdims=True)
    # the first shard holding the maximum: its lowest index (shards hold increasing id ranges)
    first = jnp.argmax(ms == best, axis=-1)
    return jnp.take_along_axis(gs, first[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _filter(l, st: SamplingTensors, need_sort: bool, axis, vocab_size: int):
    """Temperature-scaled logits ``l`` -> ``l`` with -inf where top-k / top-p / min-p remove a token."""
    key = _ordered(l)
    if need_sort:
        k = jnp.minimum(st.top_k, vocab_size)
        kth = _bisect_max(lambda t: _psum(jnp.sum(key >= t[:, None], axis=-1), axis) >= jnp.maximum(k, 1), key[:, 0])
        kth = jnp.where(k > 0, kth, jnp.uint32(0))
        l = jnp.where(key >= kth[:, None], l, NEG_INF)
        key = _ordered(l)
        # top-p over what top-k kept: drop the ascending prefix whose probability is <= 1 - p
        m = _pmax(jnp.max(l, axis=-1), axis)
        e = jnp.exp(l - m[:, None])
        z = _psum(jnp.sum(e, axis=-1), axis)
        budget = (1 - st.top_p) * z
        pth = _bisect_max(lambda t: _psum(jnp.sum(jnp.where(key < t[:, None], e, 0.0), axis=-1), axis) <= budget,
                          key[:, 0])
        pth = jnp.where(st.top_p < 1, pth, jnp.uint32(0))
        l = jnp.where(key >= pth[:, None], l, NEG_INF)
    # min-p: keep p_i >= min_p * p_max (top-k/top-p renormalisation does not change p_i / p_max)
    floor = _pmax(jnp.max(l, axis=-1), axis) + jnp.log(st.min_p)
    return jnp.where(l >= floor[:, None], l, NEG_INF)


def sample_sharded(logits, st: SamplingTensors, step, prompt_mask, output_counts, *, spec: SamplerSpec,
                   vocab_size: int, axis: str | None, shards: int = 1):
    """``sampling.sample`` (+ ranks) for this shard's columns of the vocabulary.

    logits: float32 ``[b, n]``, the columns ``[shard * n, shard * n + n)`` of the (padded) vocabulary;
    columns ``>= vocab_size`` are padding; ``shards`` (static) is the size of ``axis``. prompt_mask / output_counts: the same columns (or ``[b, 0]``
    when ``spec.penalties`` is off). Returns, identical on every shard: tokens int32 ``[b]``, token logprob
    ``[b]``, rank ``[b]``, top ids ``[b, K]``, top logprobs ``[b, K]`` (K = ``spec.num_logprobs``).
    """
    b, n = logits.shape
    off = jax.lax.axis_index(axis) * n if axis else 0
    gid = off + jnp.arange(n)
    valid = gid < vocab_size
    raw = jnp.where(valid[None], logits.astype(jnp.float32), NEG_INF)
    lse = log_sum_exp(raw, axis)

    # min_tokens: EOS and stop ids banned while step < min_tokens (ids outside this shard drop out)
    local = st.stop_ids - off
    mine = (st.stop_ids >= 0) & (local >= 0) & (local < n)
    banned = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], jnp.where(mine, local, n)].set(True, mode="drop")
    x = jnp.where(banned & (step < st.min_tokens)[:, None], NEG_INF, raw)
    if spec.penalties:
        x = apply_penalties(x, st, prompt_mask, output_counts)
    tokens = _argmax(x, gid, axis)
    if not spec.all_greedy:
        l = _filter(x / st.temperature[:, None], st, spec.need_sort, axis, vocab_size)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(st.key, impl="threefry2x32"), step)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)
        noise = jnp.pad(noise, ((0, 0), (0, n * shards - vocab_size)))
        noise = jax.lax.dynamic_slice_in_dim(noise, off, n, axis=1)
        drawn = _argmax(jnp.where(l > NEG_INF, l + noise, NEG_INF), gid, axis)
        tokens = jnp.where(st.greedy, tokens, drawn)

    lp, rank, top_ids, top_lp = token_stats(raw, tokens, lse, gid, spec.num_logprobs, axis)
    return tokens, lp, rank, top_ids, top_lp


def log_sum_exp(raw, axis):
    """Per row, log(sum(exp(raw))) over every shard's columns (raw: -inf on padding)."""
    m = _pmax(jnp.max(raw, axis=-1), axis)
    return jnp.log(_psum(jnp.sum(jnp.exp(raw - m[..., None]), axis=-1), axis)) + m


def token_stats(raw, tokens, lse, gid, K: int, axis):
    """For the token ``tokens [...]`` of each row of ``raw [..., n]`` (this shard's columns ``gid``): its raw
    logprob, its rank among all tokens (1 = best), and the top ``K`` ids and logprobs; the same on every shard."""
    chosen = _psum(jnp.sum(jnp.where(gid == tokens[..., None], raw, 0.0), axis=-1), axis)
    rank = _psum(jnp.sum(raw >= chosen[..., None], axis=-1, dtype=jnp.int32), axis)
    if K:
        top_l, top_i = jax.lax.top_k(raw, min(K, raw.shape[-1]))
        all_l, all_i = gather_shards(top_l, axis), gather_shards(gid[top_i], axis)
        best_l, pos = jax.lax.top_k(all_l, K)
        top_ids = jnp.take_along_axis(all_i, pos, axis=-1).astype(jnp.int32)
        top_lp = best_l - lse[..., None]
    else:
        top_ids = jnp.zeros(tokens.shape + (0,), jnp.int32)
        top_lp = jnp.zeros(tokens.shape + (0,), jnp.float32)
    return chosen - lse, rank, top_ids, top_lp


def make_sampler(spec: SamplerSpec, *, vocab_size: int, axis: str | None, shards: int = 1):
    """``fn(logits, st, step, prompt_mask, counts) -> (tokens, logprob, rank, top_ids, top_logprobs)`` over
    this shard's vocabulary columns (``sample_sharded``)."""
    def fn(logits, st, step, pmask, counts):
        if not spec.penalties:
            pmask, counts = pmask[:, :0], counts[:, :0]
        return sample_sharded(logits, st, step, pmask, counts, spec=spec, vocab_size=vocab_size, axis=axis,
                              shards=shards)
    return fn
