"""The pipeline schedule: jitted prefill and decode programs over a ``stage`` x ``tensor`` mesh.

Both programs are one SPMD program (``jax.shard_map``); each device runs its stage's layers on the
microbatch it holds and hands activations to the next stage with ``lax.ppermute``.

Batch layout. A wave of prompts is split into ``M`` microbatches of ``b`` rows, left-padded to one prompt
bucket ``P``, so that every row's generated token ``k`` sits at cache position ``P + k``. The KV cache of
each stage has ``M * b`` rows and ``T >= P + max_new_tokens - 1`` positions.

Prefill (GPipe). Tick ``t = 0 .. M + S - 2``: stage ``s`` runs microbatch ``t - s`` when that is in
``[0, M)``; otherwise it idles (computes on stale data and leaves its cache untouched). The bubble is
``(S - 1) / (M + S - 1)`` of the ticks. The last stage's output for a microbatch goes straight to the
lm_head and the sampler, which give the first generated token.

Decode (the ring). There are ``R = max(M, S)`` ring slots; slots ``>= M`` are empty (the bubble when
``M < S``). Tick ``t``: stage ``s`` runs slot ``(t - s) mod R`` at step ``(t - s) div R``; its output moves
on to stage ``s + 1``; the last stage's output is turned into logits and a sampled token, which at tick
``t + 1`` is the first stage's input for the same slot. With ``M >= S`` no stage ever waits: the token
for slot ``(t + 1) mod R`` was sampled at the end of tick ``t + 1 - R + S - 1 <= t``. The in-flight
activations and the tick counter persist across dispatches, so splitting generation into dispatches of
many ticks (an on-device loop) adds no bubble.

The lm_head is split by vocabulary rows over all devices (see ``partition.py``): the last stage's hidden
state is broadcast over ``stage`` (a psum of one stage's value), every device computes its slice of the
logits, an all-gather joins them, and every device samples the same token from the same logits with the
same key. That is how a sampled token "travels back" to the first stage: everyone already has it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpipe import partition
from jaxpipe.config import LlamaConfig
from jaxpipe.model import STAGE_AXIS, KVCache, Llama, StepInputs
from jaxpipe.partition import CACHE_SPEC, REPLICATED, Layout


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shape of one generation wave; each distinct geometry compiles once."""

    microbatches: int   # M
    rows: int           # b, rows per microbatch
    cache_len: int      # T

    @property
    def batch(self) -> int:
        return self.microbatches * self.rows


class DecodeState(NamedTuple):
    """Everything decode carries from one dispatch to the next (donated)."""

    cache: KVCache
    inflight: jax.Array      # [S, b, H]: the activation each stage runs next
    tokens: jax.Array        # [R, b]: the latest token of each ring slot
    tick: jax.Array          # scalar: ticks run since prefill
    counts: jax.Array        # [M*b, V] int32 generated-token counts (penalties), or [M*b, 0] when unused


class Sampler(NamedTuple):
    """How logits become tokens: ``fn(logits, sampling_rows, step, prompt_mask_rows, counts_rows)``
    returns ``num_outputs`` per-row arrays, the sampled token ids first (the others, such as
    log-probabilities, are only collected for the host)."""

    fn: Callable[..., tuple[jax.Array, ...]]
    num_outputs: int


def _output_buffers(sampler: Sampler, lead: tuple[int, ...], b: int, V: int, samp, prompt_mask, counts):
    """Zero buffers ``lead + shape`` for each of the sampler's per-row outputs (shapes by tracing it)."""
    def rows_of(a):
        return jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype)
    shapes = jax.eval_shape(sampler.fn, jax.ShapeDtypeStruct((b, V), jnp.float32), jax.tree.map(rows_of, samp),
                            jax.ShapeDtypeStruct((b,), jnp.int32), rows_of(prompt_mask), rows_of(counts))
    return tuple(jnp.zeros(lead + sd.shape[1:], sd.dtype) for sd in shapes)


def flatten_paths(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_paths(v, path + "."))
        else:
            out[path] = v
    return out


def map_paths(fn: Callable[[str, Any], Any], tree: dict, prefix: str = "") -> dict:
    """Apply ``fn(dotted_path, leaf)`` to every leaf of a nested dict."""
    return {k: (map_paths(fn, v, f"{prefix}{k}.") if isinstance(v, dict) else fn(f"{prefix}{k}", v))
            for k, v in tree.items()}


def _choose_partitioner(mesh: Mesh) -> None:
    """Use GSPMD for multi-GPU meshes unless the user chose a partitioner.

    JAX 0.11.2's Shardy partitioner segfaults while compiling these programs on several GPUs (seen on
    4x H200, 2026-11-27: the crash is inside the shardy-xla pass); GSPMD compiles them and gives the same
    tokens. CPU meshes keep JAX's default. ``JAX_USE_SHARDY_PARTITIONER`` overrides this.
    """
    if mesh.devices.size > 1 and mesh.devices.flat[0].platform == "gpu" \
            and "JAX_USE_SHARDY_PARTITIONER" not in os.environ:
        try:
            jax.config.update("jax_use_shardy_partitioner", False)
        except AttributeError:  # a JAX with a single partitioner
            pass


class PipelineModel:
    """A Llama laid out over a mesh: abstract shapes, sharding table and the jitted programs."""

    def __init__(self, cfg: LlamaConfig, layout: Layout, mesh: Mesh, dtype, *, unroll: int | bool = 1):
        _choose_partitioner(mesh)
        self.cfg, self.layout, self.mesh, self.dtype = cfg, layout, mesh, jnp.dtype(dtype)
        self.unroll = unroll
        self.vocab_padded = layout.padded_vocab(cfg.vocab_size)
        self.kv_sources = partition.kv_head_sources(cfg, layout.tensor_parallel)
        abstract = nnx.eval_shape(lambda: Llama(
            cfg, num_layers=layout.stages * layout.slots_per_stage, vocab_rows=self.vocab_padded,
            dtype=self.dtype, rngs=nnx.Rngs(0), tensor_parallel=layout.tensor_parallel,
            kv_size=len(self.kv_sources) * cfg.head_dim))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        self.abstract_params: dict = nnx.to_pure_dict(self._abstract_state)
        self.param_specs = map_paths(lambda path, _: partition.param_spec(path), self.abstract_params)
        self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.param_specs)
        self.param_shardings_flat = flatten_paths(self.param_shardings)
        self._programs: dict[tuple, Callable] = {}

    # -- building blocks --------------------------------------------------------------------------

    def module(self, params: dict) -> Llama:
        """The NNX module over (local) parameter arrays."""
        state = jax.tree.map(lambda x: x, self._abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def random_params(self, seed: int = 0) -> dict:
        """Random weights at real shapes, each device generating only its own shard."""
        cfg, layout = self.cfg, self.layout

        def init(key):
            model = Llama(cfg, num_layers=layout.stages * layout.slots_per_stage, vocab_rows=self.vocab_padded,
                          dtype=self.dtype, rngs=nnx.Rngs(key), tensor_parallel=layout.tensor_parallel,
                          kv_size=len(self.kv_sources) * cfg.head_dim)
            return nnx.to_pure_dict(nnx.split(model)[1])

        return jax.jit(init, out_shardings=self.param_shardings)(jax.random.key(seed))

    def cache_shape(self, geo: Geometry) -> tuple[int, ...]:
        return (self.layout.stages * self.layout.slots_per_stage, geo.batch, len(self.kv_sources),
                geo.cache_len, self.cfg.head_dim)

    def new_cache(self, geo: Geometry) -> KVCache:
        shape, shard = self.cache_shape(geo), NamedSharding(self.mesh, CACHE_SPEC)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=shard)
        return KVCache(zeros(), zeros())

    def ring_slots(self, geo: Geometry) -> int:
        return max(geo.microbatches, self.layout.stages)

    def _layer_count(self):
        counts = self.layout.layer_counts
        if self.layout.even:
            return counts[0]
        return jnp.asarray(counts, jnp.int32)[jax.lax.axis_index(STAGE_AXIS)]

    def _head(self, model: Llama, y_last: jax.Array) -> jax.Array:
        """Last stage's hidden states -> float32 logits over the real vocabulary, on every device."""
        S = self.layout.stages
        if S > 1:
            is_last = jax.lax.axis_index(STAGE_AXIS) == S - 1
            y_last = jax.lax.psum(jnp.where(is_last, y_last, jnp.zeros_like(y_last)), STAGE_AXIS)
        return model.logits(y_last)[..., : self.cfg.vocab_size]

    def _pass_on(self, y: jax.Array) -> jax.Array:
        S = self.layout.stages
        if S == 1:
            return y
        return jax.lax.ppermute(y, STAGE_AXIS, [(i, i + 1) for i in range(S - 1)])

    # -- prefill ----------------------------------------------------------------------------------

    def prefill_program(self, geo: Geometry, prompt_len: int, sampler: Sampler, *, all_logits: bool = False):
        key = ("prefill", geo, prompt_len, sampler, all_logits)
        if key not in self._programs:
            self._programs[key] = self._build_prefill(geo, prompt_len, sampler, all_logits)
        return self._programs[key]

    def _build_prefill(self, geo: Geometry, prompt_len: int, sampler: Sampler, all_logits: bool):
        S, M, b, Pl = self.layout.stages, geo.microbatches, geo.rows, prompt_len
        V, H = self.cfg.vocab_size, self.cfg.hidden_size
        rows = lambda a, mb: jax.lax.dynamic_slice_in_dim(a, mb * b, b, axis=0)  # noqa: E731

        def body(params, cache, tokens, kv_start, samp, prompt_mask, counts):
            model = self.module(params)
            stage = jax.lax.axis_index(STAGE_AXIS)
            n_layers = self._layer_count()
            embedded = model.embed_tokens(tokens).reshape(M, b, Pl, H)
            rope_pos = jnp.maximum(jnp.arange(Pl)[None, :] - kv_start[:, None], 0)

            out_logits = jnp.zeros((M * b, Pl, V) if all_logits else (0,), jnp.float32)

            def tick(t, carry):
                x_in, cache, outs = carry
                mb = t - stage
                active = (mb >= 0) & (mb < M)
                mbc = jnp.clip(mb, 0, M - 1)
                x = jnp.where(stage == 0, embedded[jnp.clip(t, 0, M - 1)], x_in)
                step = StepInputs(row0=mbc * b, cache_pos=jnp.int32(0), rope_pos=rows(rope_pos, mbc),
                                  kv_start=rows(kv_start, mbc), active=active)
                y, cache = model.layers(x, cache, step, num_layers=n_layers, prefill=True,
                                        unroll=self.unroll)
                x_next = self._pass_on(y)
                # The last stage finished microbatch t - (S - 1): sample its first token.
                mb_out = t - (S - 1)
                done = mb_out >= 0
                mbo = jnp.clip(mb_out, 0, M - 1)
                logits = self._head(model, y if all_logits else y[:, -1])
                last_logits = logits[:, -1] if all_logits else logits
                res = sampler.fn(last_logits, jax.tree.map(lambda a: rows(a, mbo), samp),
                                 jnp.zeros((b,), jnp.int32), rows(prompt_mask, mbo), rows(counts, mbo))

                def put(buf, val):
                    old = rows(buf, mbo)
                    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(done, val, old), mbo * b, axis=0)

                *sampled, o_logits = outs
                outs = (*map(put, sampled, res), put(o_logits, logits) if all_logits else o_logits)
                return x_next, cache, outs

            x0 = jnp.zeros((b, Pl, H), self.dtype)
            outs = (*_output_buffers(sampler, (M * b,), b, V, samp, prompt_mask, counts), out_logits)
            _, cache, outs = jax.lax.fori_loop(0, M + S - 1, tick, (x0, cache, outs))
            return cache, outs

        cache_specs = KVCache(CACHE_SPEC, CACHE_SPEC)
        fn = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(self.param_specs, cache_specs, REPLICATED, REPLICATED, REPLICATED, REPLICATED,
                      REPLICATED),
            out_specs=(cache_specs, (REPLICATED,) * (sampler.num_outputs + 1)), check_vma=False)
        return jax.jit(fn, donate_argnums=(1,))

    # -- decode -----------------------------------------------------------------------------------

    def decode_program(self, geo: Geometry, ticks: int, sampler: Sampler, *, record_logits: bool = False):
        key = ("decode", geo, ticks, sampler, record_logits)
        if key not in self._programs:
            self._programs[key] = self._build_decode(geo, ticks, sampler, record_logits)
        return self._programs[key]

    def replicate(self, x) -> jax.Array:
        """A host value as an array replicated on every device of the mesh (works across processes)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, REPLICATED), lambda idx: x[idx])

    def initial_decode_state(self, geo: Geometry, cache: KVCache, first_tokens: np.ndarray,
                             counts: jax.Array) -> DecodeState:
        """The ring before its first tick: empty pipeline, each slot holding its prefill token."""
        S, R, b = self.layout.stages, self.ring_slots(geo), geo.rows
        tokens = np.zeros((R, b), np.int32)
        tokens[: geo.microbatches] = np.asarray(first_tokens).reshape(-1, b)
        inflight = jax.jit(lambda: jnp.zeros((S, b, self.cfg.hidden_size), self.dtype),
                           out_shardings=NamedSharding(self.mesh, P(STAGE_AXIS)))()
        return DecodeState(cache=cache, inflight=inflight, tokens=self.replicate(tokens),
                           tick=self.replicate(np.int32(0)), counts=counts)

    def _build_decode(self, geo: Geometry, ticks: int, sampler: Sampler, record_logits: bool):
        S, M, b, T = self.layout.stages, geo.microbatches, geo.rows, geo.cache_len
        R = self.ring_slots(geo)
        V = self.cfg.vocab_size
        rows = lambda a, slot: jax.lax.dynamic_slice_in_dim(a, slot * b, b, axis=0)  # noqa: E731

        def body(params, state: DecodeState, prompt_len, kv_start, samp, prompt_mask):
            model = self.module(params)
            stage = jax.lax.axis_index(STAGE_AXIS)
            n_layers = self._layer_count()

            def tick(i, carry):
                cache, x_in, tokens, counts, outs = carry
                t = state.tick + i
                rel = t - stage
                slot, k = rel % R, rel // R
                active = (rel >= 0) & (slot < M) & (prompt_len + k < T)
                slot_c = jnp.minimum(slot, M - 1)
                # Every device joins the embedding lookup (vocabulary rows are spread); stage 0 uses it.
                x0 = model.embed_tokens(tokens[t % R])
                x = jnp.where(stage == 0, x0, x_in)[:, None, :]
                pad = rows(kv_start, slot_c)
                step = StepInputs(row0=slot_c * b, cache_pos=prompt_len + k,
                                  rope_pos=(prompt_len + k - pad)[:, None], kv_start=pad, active=active)
                y, cache = model.layers(x, cache, step, num_layers=n_layers, prefill=False,
                                        unroll=self.unroll)
                y = y[:, 0]
                x_next = self._pass_on(y)

                rel_out = t - (S - 1)
                slot_out, k_out = rel_out % R, rel_out // R
                valid = (rel_out >= 0) & (slot_out < M)
                so = jnp.minimum(slot_out, M - 1)
                logits = self._head(model, y)
                gen_step = jnp.full((b,), k_out + 1, jnp.int32)
                res = sampler.fn(logits, jax.tree.map(lambda a: rows(a, so), samp), gen_step,
                                 rows(prompt_mask, so), rows(counts, so))
                tok = res[0]
                tokens = jnp.where(valid, tokens.at[slot_out % R].set(tok), tokens)
                if counts.shape[-1]:
                    new_counts = rows(counts, so).at[jnp.arange(b), tok].add(1)
                    counts = jax.lax.dynamic_update_slice_in_dim(
                        counts, jnp.where(valid, new_counts, rows(counts, so)), so * b, axis=0)
                *sampled, o_logits = outs
                outs = (*(buf.at[i].set(v) for buf, v in zip(sampled, res)),
                        o_logits.at[i].set(logits) if record_logits else o_logits)
                return cache, x_next, tokens, counts, outs

            outs = (*_output_buffers(sampler, (ticks, b), b, V, samp, prompt_mask, state.counts),
                    jnp.zeros((ticks, b, V) if record_logits else (0,), jnp.float32))
            carry = (state.cache, state.inflight[0], state.tokens, state.counts, outs)
            cache, x_in, tokens, counts, outs = jax.lax.fori_loop(0, ticks, tick, carry)
            new_state = DecodeState(cache=cache, inflight=x_in[None], tokens=tokens,
                                    tick=state.tick + ticks, counts=counts)
            return new_state, outs

        state_specs = DecodeState(cache=KVCache(CACHE_SPEC, CACHE_SPEC), inflight=P(STAGE_AXIS),
                                  tokens=REPLICATED, tick=REPLICATED, counts=REPLICATED)
        fn = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(self.param_specs, state_specs, REPLICATED, REPLICATED, REPLICATED, REPLICATED),
            out_specs=(state_specs, (REPLICATED,) * (sampler.num_outputs + 1)), check_vma=False)
        return jax.jit(fn, donate_argnums=(1,))

    def tick_origin(self, geo: Geometry, tick: int) -> tuple[int, int] | None:
        """Which (microbatch, generated-token index) the last stage produced at decode tick ``tick``."""
        rel = tick - (self.layout.stages - 1)
        if rel < 0:
            return None
        R = self.ring_slots(geo)
        slot, k = rel % R, rel // R
        if slot >= geo.microbatches:
            return None
        return slot, k + 1


def greedy_sampler() -> Sampler:
    """Argmax sampling (no penalties, no top-k), for benchmarks and checks: outputs the token alone."""
    return Sampler(fn=_greedy, num_outputs=1)


def _greedy(logits, samp, step, prompt_mask, counts):
    return (jnp.argmax(logits, axis=-1).astype(jnp.int32),)


def host_array(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) array as numpy, from this process's first shard."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)
