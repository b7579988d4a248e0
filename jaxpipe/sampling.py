"""Sampling parameters (vLLM's ``SamplingParams``) and on-device token sampling.

``sample`` processes a batch of logits in vLLM's order:

    raw logits ──> logprobs (log_softmax of the raw model output: vLLM's default ``raw_logprobs`` mode)
      └─> min_tokens ban (EOS and stop_token_ids to -inf while fewer than min_tokens tokens were generated)
          └─> repetition penalty (prompt and output tokens) ─> frequency and presence penalties (output tokens)
              ├─> greedy rows: argmax
              └─> temperature ─> top-k ─> top-p ─> min-p ─> categorical with key fold_in(row key, step)

A row's random draw depends only on its seed and its own step, never on its batch position or the batch
size, so a seeded request reproduces whatever else is batched with it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
_SAMPLING_EPS = 1e-5
# vLLM raises temperatures in (0, 1e-2) to 1e-2 so that logits / T stays finite in float32.
_MIN_TEMPERATURE = 1e-2


class RequestOutputKind(enum.IntEnum):
    """What ``LLMEngine.step`` returns for a request (vLLM's enum): the whole output so far, only what is new
    since the last step, or only the final output."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _bad(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"SamplingParams.{field} must be {allowed}, got {value!r}")


def _int(field: str, value, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(field, value, f"an integer {allowed}")
    return int(value)


def _float(field: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(field, value, f"a finite number {allowed}")
    return float(value)


# Numeric fields: (integer?, valid?, the allowed range as error messages state it).
_RANGES = {
    "n": (True, lambda v: v >= 1, ">= 1"),
    "temperature": (False, lambda v: v >= 0, ">= 0 (0 means greedy)"),
    "top_p": (False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (True, lambda v: v >= -1, ">= 1, or 0 or -1 to disable"),
    "min_p": (False, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (False, lambda v: v > 0, "> 0"),
    "presence_penalty": (False, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (False, lambda v: -2 <= v <= 2, "in [-2, 2]"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """vLLM's sampling parameters (same names, defaults and meanings). Keyword-only, immutable.

    ``stop`` and ``stop_token_ids`` are normalised to tuples (``()`` when not given), ``seed=-1`` to None
    and ``logprobs=True`` to 1, as vLLM does. ``top_k`` 0 and -1 both mean off.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's other fields. Honoured: max_tokens=None (up to max_model_len), output_kind, detokenize,
    # truncate_prompt_tokens, prompt_logprobs (k >= 0: each prompt token's logprob and rank, and the top k). Accepted and without effect: spaces_between_special_tokens (fast tokenizers
    # have no such option), extra_args. Accepted when they ask for nothing (None / empty / best_of == n)
    # and refused otherwise: best_of, logit_bias, allowed_token_ids, bad_words, logits_processors,
    # guided_decoding, structured_outputs.
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenize: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None
    logit_bias: dict | None = None
    allowed_token_ids: Sequence[int] | None = None
    bad_words: Sequence[str] | None = None
    logits_processors: Sequence | None = None
    guided_decoding: object = None
    structured_outputs: object = None
    extra_args: dict | None = None

    def __post_init__(self):
        def put(name, value):  # frozen dataclass: normalise fields in place
            object.__setattr__(self, name, value)

        for name, (integer, ok, allowed) in _RANGES.items():
            value = (_int if integer else _float)(name, getattr(self, name), allowed)
            if not ok(value):
                raise _bad(name, value, allowed)
            put(name, value)
        if self.max_tokens is not None:  # None: until the sequence fills max_model_len (vLLM)
            put("max_tokens", _int("max_tokens", self.max_tokens, ">= 1 or None"))
            if self.max_tokens < 1:
                raise _bad("max_tokens", self.max_tokens, ">= 1 or None")
        try:
            put("output_kind", RequestOutputKind(self.output_kind))
        except ValueError:
            raise _bad("output_kind", self.output_kind, "a RequestOutputKind") from None
        if self.truncate_prompt_tokens is not None:
            put("truncate_prompt_tokens", _int("truncate_prompt_tokens", self.truncate_prompt_tokens,
                                               ">= 1 or None"))
            if self.truncate_prompt_tokens < 1:
                raise _bad("truncate_prompt_tokens", self.truncate_prompt_tokens, ">= 1 or None")
        if self.prompt_logprobs is not None:
            put("prompt_logprobs", _int("prompt_logprobs", self.prompt_logprobs, ">= 0 or None"))
            if self.prompt_logprobs < 0:
                raise _bad("prompt_logprobs", self.prompt_logprobs, ">= 0 or None")
        unsupported = {
            "best_of": self.best_of not in (None, 1) and self.best_of != self.n,
            "logit_bias": bool(self.logit_bias), "allowed_token_ids": self.allowed_token_ids is not None,
            "bad_words": bool(self.bad_words), "logits_processors": bool(self.logits_processors),
            "guided_decoding": self.guided_decoding is not None,
            "structured_outputs": self.structured_outputs is not None,
        }
        for name, asked in unsupported.items():
            if asked:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is not supported by jaxpipe; "
                                 f"leave it unset")
        if self.seed is not None:
            put("seed", _int("seed", self.seed, "or None"))
            if self.seed == -1:
                put("seed", None)

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Iterable):
            stop = tuple(stop)
        else:
            raise _bad("stop", stop, "a string, a list of strings or None")
        if not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop", self.stop, "a string or a list of non-empty strings")
        put("stop", stop)

        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise _bad("stop_token_ids", ids, "a list of token ids >= 0 or None")
        ids = tuple(dict.fromkeys(_int("stop_token_ids", t, ">= 0") for t in ids))  # dedupe, keep order
        if any(t < 0 for t in ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        put("stop_token_ids", ids)

        put("min_tokens", _int("min_tokens", self.min_tokens, f"in [0, max_tokens={self.max_tokens}]"))
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise _bad("min_tokens", self.min_tokens, f"in [0, max_tokens={self.max_tokens}]")
        if self.logprobs is not None:
            logprobs = int(self.logprobs) if isinstance(self.logprobs, bool) else self.logprobs  # True -> 1
            put("logprobs", _int("logprobs", logprobs, ">= 0 or None"))
            if self.logprobs < 0:
                raise _bad("logprobs", self.logprobs, ">= 0 or None")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop needs detokenize=True: stop strings are found in the text")
        if self.greedy and self.n > 1:  # vLLM: n identical greedy completions are refused
            raise _bad("n", self.n, "1 when temperature is 0 (greedy sampling)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static part of sampling, part of every program's compile key.

    num_logprobs: top-k logprobs computed per row (0 when no row asks; else the engine's max_logprobs,
    sliced per row on the host). all_greedy: no row samples (skip the random draw and the filters).
    need_sort: some row uses top-k or top-p (the sort). penalties: some row uses a repetition, presence
    or frequency penalty. stop_width: columns of ``SamplingTensors.stop_ids``.
    """

    num_logprobs: int = 0
    all_greedy: bool = True
    need_sort: bool = False
    penalties: bool = False
    stop_width: int = 8

    @classmethod
    def covering(cls, params: Iterable[SamplingParams], *, max_logprobs: int, num_eos: int) -> SamplerSpec:
        """The cheapest spec that samples every one of ``params`` exactly."""
        params = list(params)
        logprobs = any(p.logprobs for p in params)
        width = max([0] + [len(p.stop_token_ids) + num_eos for p in params if p.min_tokens])
        return cls(num_logprobs=max_logprobs if logprobs else 0,
                   all_greedy=all(p.greedy for p in params),
                   need_sort=any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params),
                   penalties=any(uses_penalties(p) for p in params),
                   stop_width=max(8, _pow2_at_least(width)))

    @classmethod
    def full(cls, *, max_logprobs: int, stop_width: int) -> SamplerSpec:
        """Every feature on: samples any request exactly (for prefill, where its cost does not matter)."""
        return cls(num_logprobs=max_logprobs, all_greedy=False, need_sort=True, penalties=True,
                   stop_width=stop_width)


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def make_sampler(spec: SamplerSpec):
    """``fn(logits, st, step, prompt_mask, counts) -> (tokens, token_logprob, rank, top_ids, top_logprobs)``
    for rows sampled under ``spec`` (see ``sample``; penalties are skipped when ``spec.penalties`` is off)."""
    def fn(logits, st, step, pmask, counts):
        if not spec.penalties:
            pmask, counts = pmask[:, :0], counts[:, :0]
        tok, lp, top_ids, top_lp = sample(logits, st, step, pmask, counts, num_logprobs=spec.num_logprobs,
                                          all_greedy=spec.all_greedy, need_sort=spec.need_sort)
        return tok, lp, token_ranks(logits, tok), top_ids, top_lp
    return fn


def _row_key_data(seed: int) -> tuple[int, int]:
    """threefry2x32 key data for a seed, as ``jax.random.PRNGKey(seed)`` lays it out: (high, low) words."""
    seed &= (1 << 64) - 1
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_TENSOR_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "key", "greedy", "min_tokens", "stop_ids")


@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters as device arrays (a pytree; pass it straight into jitted code).

    temperature, top_p, min_p, the three penalties: float32 [B]. top_k: int32 [B], 0 = off.
    key: uint32 [B, 2], threefry key data of the row's seed. greedy: bool [B].
    min_tokens: int32 [B]. stop_ids: int32 [B, S], -1 padded: the tokens banned while step < min_tokens
    (the row's stop_token_ids and the EOS ids; empty for rows without min_tokens). S is a power of two so
    that few shapes get compiled. Greedy and pad rows carry neutral top_p / top_k / min_p / temperature.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    key: jax.Array
    greedy: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array

    @classmethod
    def build(cls, params_list: Sequence[SamplingParams], seeds: Sequence[int], pad_to: int, *,
              eos_token_ids: Iterable[int] = (), stop_width: int | None = None) -> SamplingTensors:
        """Rows ``i < len(params_list)`` follow ``params_list[i]`` and draw from ``seeds[i]``; rows up to
        ``pad_to`` are greedy, unpenalised padding. ``eos_token_ids`` join each row's min_tokens ban list.
        ``stop_width``: columns of ``stop_ids`` (default: the next power of two that holds every row's)."""
        if len(seeds) != len(params_list):
            raise ValueError(f"got {len(params_list)} SamplingParams but {len(seeds)} seeds")
        if pad_to < len(params_list):
            raise ValueError(f"pad_to={pad_to} is smaller than the number of rows ({len(params_list)})")
        table = SamplingTable(pad_to, eos_token_ids)
        for i, (p, seed) in enumerate(zip(params_list, seeds)):
            table.set_row(i, p, seed)
        return cls(**{k: jnp.asarray(v) for k, v in table.arrays(stop_width).items()})


class SamplingTable:
    """Host-side per-row sampling parameters of an engine's slots (NumPy); ``arrays`` gives what
    ``SamplingTensors`` holds. Unused rows are greedy, unpenalised padding."""

    _PAD = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                frequency_penalty=0.0, greedy=True, min_tokens=0)
    _DTYPES = dict(top_k=np.int32, greedy=np.bool_, min_tokens=np.int32)

    def __init__(self, rows: int, eos_token_ids: Iterable[int] = ()):
        self.eos = tuple(int(t) for t in eos_token_ids)
        self.cols = {name: np.full((rows,), v, self._DTYPES.get(name, np.float32)) for name, v in self._PAD.items()}
        self.key = np.zeros((rows, 2), np.uint32)
        self.stop_ids: list[tuple[int, ...]] = [()] * rows

    def set_row(self, i: int, p: SamplingParams, seed: int) -> None:
        g = p.greedy
        values = dict(temperature=1.0 if g else max(p.temperature, _MIN_TEMPERATURE),
                      top_p=1.0 if g else p.top_p,          # vLLM resets these for greedy requests,
                      top_k=0 if g else max(p.top_k, 0),    # which also keeps them out of the sort
                      min_p=0.0 if g else p.min_p, repetition_penalty=p.repetition_penalty,
                      presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, greedy=g,
                      min_tokens=p.min_tokens)
        for name, v in values.items():
            self.cols[name][i] = v
        self.key[i] = _row_key_data(int(seed))
        self.stop_ids[i] = tuple(dict.fromkeys(p.stop_token_ids + self.eos)) if p.min_tokens else ()

    def clear_row(self, i: int) -> None:
        for name, v in self._PAD.items():
            self.cols[name][i] = v
        self.key[i] = 0
        self.stop_ids[i] = ()

    def arrays(self, stop_width: int | None = None) -> dict[str, np.ndarray]:
        longest = max([1] + [len(s) for s in self.stop_ids])
        width = _pow2_at_least(longest) if stop_width is None else stop_width
        if width < longest:
            raise ValueError(f"stop_width={width} cannot hold a row's {longest} banned ids")
        stop = np.full((len(self.stop_ids), width), -1, np.int32)
        for i, s in enumerate(self.stop_ids):
            stop[i, :len(s)] = s
        return dict(self.cols, key=self.key.copy(), stop_ids=stop)


jax.tree_util.register_dataclass(SamplingTensors, data_fields=list(_TENSOR_FIELDS), meta_fields=[])


def _ban_stop_tokens(logits, st: SamplingTensors, step):
    """EOS and stop_token_ids may not be sampled before min_tokens tokens exist (vLLM's MinTokens processor)."""
    b, v = logits.shape
    ids = jnp.where(st.stop_ids < 0, v, st.stop_ids)  # padding -> out of range -> dropped by the scatter
    banned = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
    return jnp.where(banned & (step < st.min_tokens)[:, None], -jnp.inf, logits)


def apply_penalties(logits, st: SamplingTensors, prompt_mask, output_counts):
    """vLLM's penalties: repetition over prompt and output tokens (positive logits divided by the penalty,
    negative ones multiplied), then OpenAI's frequency (x count) and presence (x seen) over output tokens."""
    if output_counts.shape[-1] == 0:  # no request in the batch uses penalties: nothing is tracked
        return logits
    seen = output_counts > 0
    rp = st.repetition_penalty[:, None]
    logits = jnp.where(prompt_mask | seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - st.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - st.presence_penalty[:, None] * seen.astype(jnp.float32)


def _top_k_top_p(logits, top_k, top_p):
    """vLLM's top-k then top-p, with one ascending sort of the values. Instead of scattering the sorted
    mask back, each row's smallest surviving value becomes a threshold (so ties at the edge all survive)."""
    v = logits.shape[-1]
    asc = jnp.sort(logits, axis=-1)
    k = jnp.clip(top_k, 0, v)[:, None]
    kth = jnp.take_along_axis(asc, v - jnp.maximum(k, 1), axis=-1)  # k-th largest value
    kth = jnp.where(k > 0, kth, -jnp.inf)
    asc = jnp.where(asc >= kth, asc, -jnp.inf)
    # Drop the low tail whose total probability is <= 1 - p; the cumsum is non-decreasing, so the dropped
    # entries are a prefix and the first kept one is at index n_drop. The largest always survives.
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    n_drop = jnp.sum(cum[:, :-1] <= 1 - top_p[:, None], axis=-1, keepdims=True)
    pth = jnp.where(top_p[:, None] < 1, jnp.take_along_axis(asc, n_drop, axis=-1), -jnp.inf)
    return jnp.where(logits >= jnp.maximum(kth, pth), logits, -jnp.inf)


def _temper_and_filter(logits, st: SamplingTensors, need_sort: bool = True):
    logits = logits / st.temperature[:, None]
    if need_sort:  # static: the host knows whether any row of the batch uses top-k or top-p
        logits = _top_k_top_p(logits, st.top_k, st.top_p)
    # min-p: keep p_i >= min_p * p_max, i.e. logit_i >= max + log(min_p) (log 0 = -inf keeps all).
    # Top-k/top-p renormalisation does not change p_i / p_max, so applying it last is exact.
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(st.min_p)[:, None]
    return jnp.where(logits >= floor, logits, -jnp.inf)


def process_logits(logits, st: SamplingTensors, step, prompt_mask, output_counts):
    """(penalised, filtered) float32 [B, V]: greedy rows take argmax of ``penalised``, random rows sample
    from ``filtered`` (temperature applied, -inf = removed by top-k/top-p/min-p). For tests and debugging."""
    penalised = apply_penalties(_ban_stop_tokens(logits.astype(jnp.float32), st, step), st,
                                prompt_mask, output_counts)
    return penalised, _temper_and_filter(penalised, st, True)


def sample(logits, st: SamplingTensors, step, prompt_mask, output_counts, num_logprobs: int = 0,
           all_greedy: bool = False, need_sort: bool = True):
    """Sample one token per row. jit with ``static_argnames=("num_logprobs", "all_greedy", "need_sort")``.

    ``all_greedy`` (no row samples) and ``need_sort`` (some row uses top-k or top-p) are static flags the
    host sets per batch: Python branches instead of ``lax.cond``, because a conditional on the GPU waits
    for its predicate on the host, which would stall every decode step.

    logits f32 [B, V]; step int32 [B] (index of the token being generated, 0 for the first);
    prompt_mask bool [B, V] (token occurs in the prompt); output_counts int32 [B, V] (times generated so far).
    Returns tokens int32 [B], token_logprob f32 [B], top_ids int32 [B, K], top_logprobs f32 [B, K] with
    K = num_logprobs. Logprobs are vLLM's default "raw" ones: log_softmax of the unprocessed logits, before
    the min_tokens ban, penalties and temperature.
    """
    logits = logits.astype(jnp.float32)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    penalised = apply_penalties(_ban_stop_tokens(logits, st, step), st, prompt_mask, output_counts)
    greedy_tokens = jnp.argmax(penalised, axis=-1).astype(jnp.int32)

    def draw():
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(st.key, impl="threefry2x32"), step)
        drawn = jax.vmap(jax.random.categorical)(keys, _temper_and_filter(penalised, st, need_sort))
        return jnp.where(st.greedy, greedy_tokens, drawn.astype(jnp.int32))

    # An all-greedy batch (the common case) skips the random numbers and the filtering entirely.
    tokens = greedy_tokens if all_greedy else draw()
    token_logprob = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    if num_logprobs > 0:
        top_logprobs, top_ids = lax.top_k(raw_logprobs, num_logprobs)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return tokens, token_logprob, top_ids.astype(jnp.int32), top_logprobs


def token_ranks(logits, tokens):
    """vLLM's ``Logprob.rank`` of each token: how many vocabulary entries score at least as high (1 = best).
    Ranks by raw logits equal ranks by raw logprobs. int32 [B]."""
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)
    return jnp.sum(logits >= chosen, axis=-1, dtype=jnp.int32)


def update_counts(output_counts, tokens):
    """output_counts int32 [B, V] with each row's newly generated token counted once more."""
    return output_counts.at[jnp.arange(tokens.shape[0]), tokens].add(1, mode="drop")


def prompt_mask(prompt_ids, vocab_size: int):
    """bool [B, V]: which tokens occur in each row's prompt. prompt_ids int32 [B, L], negative = padding."""
    ids = jnp.where(prompt_ids < 0, vocab_size, prompt_ids)
    b = prompt_ids.shape[0]
    return jnp.zeros((b, vocab_size), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
