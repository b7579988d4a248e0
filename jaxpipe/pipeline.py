"""The device programs: prefill (with insertion into cache slots) and the decode ring, as SPMD programs over a
``stage`` x ``tensor`` mesh (``jax.shard_map``); each device runs its stage's layers on the microbatch it
holds and hands activations to the next stage with ``lax.ppermute``. Which microbatch is where at each tick
is ``jaxpipe.schedule``'s arithmetic.

Slots. The engine has ``M * b`` slots (cache rows), ``M`` microbatches of ``b`` rows. Every stage's KV cache
holds ``T`` positions per slot; a slot's sequence starts at position 0 (no padding). Per slot, replicated
on every device: the last token, its position, whether the slot is live, how many tokens it generated and
how many it may, its output-token counts and prompt-token mask (for penalties).

Prefill (``PrefillSpec``): a chunk of up to ``C`` prompt tokens for each of ``n`` slots (any slots, given
by index), GPipe over ``Mp`` microbatches of them. Each chunk's keys and values go straight into its
slots' cache rows (the cache is donated) at the chunk's positions; the chunk attends to those rows'
earlier positions too, so a long prompt is prefilled chunk by chunk between decode dispatches. For a
slot whose chunk ends its prompt, the last stage samples the first token and the slot turns live.

Decode (``DecodeSpec``): the ring, ``steps * R`` ticks per dispatch. The activation each stage runs next
travels with its rows' liveness, so a slot that is freed or refilled between dispatches while its
microbatch is in flight is simply not written by the stages still ahead of it. A slot stops itself when it
has generated its allotted number of tokens; the host stops a slot earlier (EOS, stop strings, aborts) by
releasing it at the start of a dispatch. Every sampled token, with its logprobs and liveness, is returned
per tick; the host maps tick -> microbatch with the same ``RingSchedule``.

The lm_head is split by vocabulary rows over all devices (see ``partition.py``): the last stage's hidden
state is broadcast over ``stage`` (a psum of one stage's value), every device computes its slice of the
logits, an all-gather joins them, and every device samples the same token with the same key: the
per-slot tables stay identical everywhere, which is how a sampled token "travels back" to the first stage.
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
from jaxpipe.sampling import SamplerSpec, SamplingTensors, make_sampler
from jaxpipe.schedule import PrefillSchedule, RingSchedule


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """The fixed shape of an engine's state: ``microbatches`` x ``rows`` slots of ``cache_len`` positions."""

    microbatches: int   # M
    rows: int           # b, slots per microbatch
    cache_len: int      # T, cache positions per slot

    @property
    def slots(self) -> int:
        return self.microbatches * self.rows


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything static about a decode dispatch: the only compile key of a decode program."""

    shape: EngineShape
    steps: int               # tokens per microbatch per dispatch (ticks = steps * ring slots)
    kv_len: int              # cache positions attention reads (XLA attention; the Pallas kernel ignores it)
    sampler: SamplerSpec
    attention: str = "xla"   # decode attention kernel, see jaxpipe.kernels.decode_attention
    record_logits: bool = False


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
    """Everything static about a prefill dispatch: the only compile key of a prefill program."""

    shape: EngineShape
    microbatches: int        # Mp, GPipe microbatches of prompt chunks
    rows: int                # bp, chunks per microbatch (n = Mp * bp slots per dispatch)
    chunk: int               # C, tokens per chunk (right-padded)
    kv_len: int              # cache positions attention reads, >= every chunk's start + C
    sampler: SamplerSpec
    record_logits: bool = False   # return float32 logits of every chunk position (tests)
    score: bool = False           # score the prompt: each position's logprob and rank of the next prompt token
    score_top: int = 0            # ... and its top-k alternatives (prompt_logprobs), k = score_top

    @property
    def batch(self) -> int:
        return self.microbatches * self.rows


class SlotTables(NamedTuple):
    """Per-slot state, replicated on every device (``[slots]`` each)."""

    tokens: jax.Array    # int32: the last token (what the first stage feeds next)
    pos: jax.Array       # int32: its cache position (= tokens in the cache before it)
    live: jax.Array      # bool: the slot decodes
    step: jax.Array      # int32: tokens generated so far (the index of the next one: seeds, min_tokens)
    end: jax.Array       # int32: tokens the slot may generate (it stops itself there)


class EngineState(NamedTuple):
    """Everything that persists on the devices between dispatches (donated to every program)."""

    cache: KVCache
    inflight: jax.Array       # [S, b, H]: the activation each stage runs next (sharded over stage)
    inflight_live: jax.Array  # [S, b]: whether those rows were live when they entered the ring
    tables: SlotTables
    counts: jax.Array         # [slots, V] int32 output-token counts (penalties)
    prompt_mask: jax.Array    # [slots, V] bool: tokens of the prompt (repetition penalty)
    tick: jax.Array           # scalar int32: decode ticks run so far


class PrefillBatch(NamedTuple):
    """One prefill dispatch's inputs (host arrays), ``n = spec.batch`` entries."""

    tokens: np.ndarray   # [n, C] int32 chunk tokens, right-padded
    slots: np.ndarray    # [n] int32 target slot; slots >= engine slots are padding
    start: np.ndarray    # [n] int32 cache position of the chunk's first token
    length: np.ndarray   # [n] int32 real tokens in the chunk (0 for padding)
    final: np.ndarray    # [n] bool: the chunk ends its prompt (sample the first token, go live)
    end: np.ndarray      # [n] int32 tokens the slot may generate
    next_tokens: np.ndarray | None = None   # [n, C] int32: the prompt token after each position (scoring)


SAMPLE_OUTPUTS = ("tokens", "logprobs", "ranks", "top_ids", "top_logprobs")
SCORE_OUTPUTS = ("logprobs", "ranks", "top_ids", "top_logprobs")
SCORE_BLOCK = 128   # prompt positions whose full-vocabulary logits exist at once while scoring


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


def _rows(a: jax.Array, first, n: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, first, n, axis=0)


def _put_rows(a: jax.Array, first, new: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a, new, first, axis=0)


class PipelineModel:
    """A Llama laid out over a mesh: abstract shapes, sharding table and the programs built from specs."""

    def __init__(self, cfg: LlamaConfig, layout: Layout, mesh: Mesh, dtype, *, unroll: int | bool = 1,
                 quantization: str | None = None):
        """``quantization``: None (every weight in ``dtype``), or "int8" / "fp8": the decoder matrices in 8 bits
        with per-output-channel float32 scales (``jaxpipe.quantize``; ``model.QUANTIZED_PARAMS``)."""
        _choose_partitioner(mesh)
        self.cfg, self.layout, self.mesh, self.dtype = cfg, layout, mesh, jnp.dtype(dtype)
        self.unroll = unroll
        self.quantization = quantization
        self.vocab_padded = layout.padded_vocab(cfg.vocab_size)
        self.kv_sources = partition.kv_head_sources(cfg, layout.tensor_parallel)
        abstract = nnx.eval_shape(lambda: Llama(
            cfg, num_layers=layout.stages * layout.slots_per_stage, vocab_rows=self.vocab_padded,
            dtype=self.dtype, rngs=nnx.Rngs(0), tensor_parallel=layout.tensor_parallel,
            kv_size=len(self.kv_sources) * cfg.head_dim, quantization=quantization))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        self.abstract_params: dict = nnx.to_pure_dict(self._abstract_state)
        self.param_specs = map_paths(lambda path, _: partition.param_spec(path), self.abstract_params)
        self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.param_specs)
        self.param_shardings_flat = flatten_paths(self.param_shardings)

    # -- building blocks --------------------------------------------------------------------------

    def module(self, params: dict) -> Llama:
        """The NNX module over (local) parameter arrays."""
        state = jax.tree.map(lambda x: x, self._abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def random_params(self, seed: int = 0) -> dict:
        """Random weights at real shapes, each device generating only its own shard (8-bit values and scales
        when quantized)."""
        cfg, layout = self.cfg, self.layout

        def init(key):
            model = Llama(cfg, num_layers=layout.stages * layout.slots_per_stage, vocab_rows=self.vocab_padded,
                          dtype=self.dtype, rngs=nnx.Rngs(key), tensor_parallel=layout.tensor_parallel,
                          kv_size=len(self.kv_sources) * cfg.head_dim, quantization=self.quantization)
            return nnx.to_pure_dict(nnx.split(model)[1])

        return jax.jit(init, out_shardings=self.param_shardings)(jax.random.key(seed))

    def cache_shape(self, shape: EngineShape) -> tuple[int, ...]:
        return (self.layout.stages * self.layout.slots_per_stage, shape.slots, len(self.kv_sources),
                shape.cache_len, self.cfg.head_dim)

    def replicate(self, x) -> jax.Array:
        """A host value as an array replicated on every device of the mesh (works across processes)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, REPLICATED), lambda idx: x[idx])

    def ring(self, shape: EngineShape) -> RingSchedule:
        return RingSchedule(self.layout.stages, shape.microbatches)

    def state_shardings(self) -> EngineState:
        rep = NamedSharding(self.mesh, REPLICATED)
        cache = NamedSharding(self.mesh, CACHE_SPEC)
        stage = NamedSharding(self.mesh, P(STAGE_AXIS))
        return EngineState(cache=KVCache(cache, cache), inflight=stage, inflight_live=stage,
                           tables=SlotTables(rep, rep, rep, rep, rep), counts=rep, prompt_mask=rep, tick=rep)

    def new_state(self, shape: EngineShape) -> EngineState:
        """An empty engine state: zero caches, every slot free, the ring empty."""
        S, B, V, H = self.layout.stages, shape.slots, self.cfg.vocab_size, self.cfg.hidden_size
        cache_shape, dtype = self.cache_shape(shape), self.dtype

        def make():
            zeros_i = jnp.zeros((B,), jnp.int32)
            return EngineState(
                cache=KVCache(jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype)),
                inflight=jnp.zeros((S, shape.rows, H), dtype), inflight_live=jnp.zeros((S, shape.rows), bool),
                tables=SlotTables(zeros_i, zeros_i, jnp.zeros((B,), bool), zeros_i, zeros_i),
                counts=jnp.zeros((B, V), jnp.int32), prompt_mask=jnp.zeros((B, V), bool),
                tick=jnp.zeros((), jnp.int32))

        return jax.jit(make, out_shardings=self.state_shardings())()

    def _layer_count(self):
        counts = self.layout.layer_counts
        if self.layout.even:
            return counts[0]
        return jnp.asarray(counts, jnp.int32)[jax.lax.axis_index(STAGE_AXIS)]

    def _from_last_stage(self, x: jax.Array) -> jax.Array:
        """The last stage's value of ``x`` on every device (a psum of one stage's value)."""
        S = self.layout.stages
        if S == 1:
            return x
        is_last = jax.lax.axis_index(STAGE_AXIS) == S - 1
        return jax.lax.psum(jnp.where(is_last, x, jnp.zeros_like(x)), STAGE_AXIS)

    def _pass_on(self, x: jax.Array) -> jax.Array:
        S = self.layout.stages
        if S == 1:
            return x
        return jax.lax.ppermute(x, STAGE_AXIS, [(i, i + 1) for i in range(S - 1)])

    def _logits(self, model: Llama, y: jax.Array) -> jax.Array:
        """Final hidden states (every device has the last stage's) -> float32 logits over the real vocabulary."""
        return model.logits(y)[..., : self.cfg.vocab_size]

    def _state_specs(self) -> EngineState:
        rep = REPLICATED
        return EngineState(cache=KVCache(CACHE_SPEC, CACHE_SPEC), inflight=P(STAGE_AXIS),
                           inflight_live=P(STAGE_AXIS), tables=SlotTables(rep, rep, rep, rep, rep),
                           counts=rep, prompt_mask=rep, tick=rep)

    def _sample_buffers(self, sampler_fn, lead: tuple[int, ...], b: int, samp: SamplingTensors, stop_width: int):
        """Zero buffers ``lead + shape`` for each of the sampler's per-row outputs (shapes by tracing it)."""
        V = self.cfg.vocab_size

        def rows_of(a):
            return jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype)

        shapes = jax.eval_shape(sampler_fn, jax.ShapeDtypeStruct((b, V), jnp.float32), jax.tree.map(rows_of, samp),
                                jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, V), bool),
                                jax.ShapeDtypeStruct((b, V), jnp.int32))
        return tuple(jnp.zeros(lead + sd.shape[1:], sd.dtype) for sd in shapes)

    # -- prefill ----------------------------------------------------------------------------------

    def prefill_program(self, spec: PrefillSpec) -> Callable:
        """``fn(params, state, samp, tokens, slots, start, length, final, end) -> (state, outputs)``, jitted
        with the state donated. outputs: the first token's ``SAMPLE_OUTPUTS`` per entry ``[n, ...]`` (only
        meaningful where ``final``), float32 logits ``[n, C, V]`` when ``spec.record_logits``, then, when
        ``spec.score``, ``SCORE_OUTPUTS`` per position ``[n, C, ...]``: the raw logprob and rank of the next
        prompt token (``next_tokens``) and the top ``score_top`` (id, logprob) pairs. Scoring reduces the
        logits on the devices ``SCORE_BLOCK`` positions at a time: no ``[C, V]`` array per row is returned."""
        S, Mp, bp, C = self.layout.stages, spec.microbatches, spec.rows, spec.chunk
        B, V, H = spec.shape.slots, self.cfg.vocab_size, self.cfg.hidden_size
        n = spec.batch
        sched = PrefillSchedule(S, Mp)
        ring = self.ring(spec.shape)
        sampler_fn = make_sampler(spec.sampler)

        K = spec.score_top

        def score(model, y, next_tok):
            """Per position of ``y [bp, C, H]`` (the last stage's): logprob and rank of ``next_tok`` and top-K."""
            parts = []
            for a in range(0, C, SCORE_BLOCK):
                logits = self._logits(model, y[:, a:a + SCORE_BLOCK])             # [bp, blk, V] float32
                logprobs = jax.nn.log_softmax(logits, axis=-1)
                nxt = jnp.clip(next_tok[:, a:a + SCORE_BLOCK], 0, V - 1)[..., None]
                chosen = jnp.take_along_axis(logits, nxt, axis=-1)
                rank = jnp.sum(logits >= chosen, axis=-1, dtype=jnp.int32)
                top_lp, top_ids = jax.lax.top_k(logprobs, K) if K else (
                    jnp.zeros(logits.shape[:-1] + (0,), jnp.float32), jnp.zeros(logits.shape[:-1] + (0,), jnp.int32))
                parts.append((jnp.take_along_axis(logprobs, nxt, axis=-1)[..., 0], rank, top_ids.astype(jnp.int32),
                              top_lp))
            return tuple(jnp.concatenate(x, axis=1) for x in zip(*parts))

        def body(params, state: EngineState, samp, tokens, slots, start, length, final, end, next_tokens):
            model = self.module(params)
            stage = jax.lax.axis_index(STAGE_AXIS)
            n_layers = self._layer_count()
            valid = length > 0
            safe = jnp.where(valid, slots, B)  # padding entries touch no slot (out of range: dropped)

            # The prompt mask accumulates chunk by chunk; a prompt's first chunk clears the slot's old one.
            pm = state.prompt_mask.at[safe].set(jnp.where((start == 0)[:, None], False,
                                                          state.prompt_mask[jnp.clip(safe, 0, B - 1)]), mode="drop")
            in_chunk = jnp.arange(C)[None, :] < length[:, None]
            pm = pm.at[safe[:, None], jnp.where(in_chunk, tokens, V)].set(True, mode="drop")
            counts = state.counts.at[safe].set(0, mode="drop")

            embedded = model.embed_tokens(tokens).reshape(Mp, bp, C, H)
            outs = self._sample_buffers(sampler_fn, (n,), bp, samp, spec.sampler.stop_width)
            logits_buf = jnp.zeros((n, C, V) if spec.record_logits else (0,), jnp.float32)
            if spec.score:
                scores = (jnp.zeros((n, C), jnp.float32), jnp.zeros((n, C), jnp.int32),
                          jnp.zeros((n, C, K), jnp.int32), jnp.zeros((n, C, K), jnp.float32))
            else:
                scores = tuple(jnp.zeros((0,), d) for d in (jnp.float32, jnp.int32, jnp.int32, jnp.float32))

            def tick(t, carry):
                x_in, cache, outs, logits_buf, scores = carry
                mb = jnp.clip(sched.microbatch(stage, t), 0, Mp - 1)
                runs = sched.runs(stage, t)
                x = jnp.where(stage == 0, embedded[jnp.clip(t, 0, Mp - 1)], x_in)
                first = mb * bp
                positions = _rows(start, first, bp)[:, None] + jnp.arange(C)[None, :]
                step = StepInputs(rows=_rows(safe, first, bp), row0=None, positions=positions,
                                  live=runs & _rows(valid, first, bp), kv_len=spec.kv_len)
                y, cache = model.layers(x, cache, step, num_layers=n_layers, unroll=self.unroll)
                x_next = self._pass_on(y)

                # The last stage finished microbatch t - (S - 1): the first token of its final chunks.
                mbo = jnp.clip(sched.output_microbatch(t), 0, Mp - 1)
                done = sched.outputs(t)
                fo = mbo * bp
                last = jnp.clip(_rows(length, fo, bp) - 1, 0, C - 1)
                if spec.record_logits:
                    logits = self._logits(model, self._from_last_stage(y))      # [bp, C, V]
                    last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
                    logits_buf = _put_rows(logits_buf, fo, jnp.where(done, logits, _rows(logits_buf, fo, bp)))
                else:
                    y_last = jnp.take_along_axis(y, last[:, None, None], axis=1)[:, 0]
                    last_logits = self._logits(model, self._from_last_stage(y_last))
                out_slots = jnp.clip(_rows(safe, fo, bp), 0, B - 1)
                res = sampler_fn(last_logits, jax.tree.map(lambda a: a[out_slots], samp),
                                 jnp.zeros((bp,), jnp.int32), pm[out_slots], counts[out_slots])
                outs = tuple(_put_rows(buf, fo, jnp.where(done, v, _rows(buf, fo, bp))) for buf, v in zip(outs, res))
                if spec.score:
                    got = score(model, self._from_last_stage(y), _rows(next_tokens, fo, bp))
                    scores = tuple(_put_rows(buf, fo, jnp.where(done, v, _rows(buf, fo, bp)))
                                   for buf, v in zip(scores, got))
                return x_next, cache, outs, logits_buf, scores

            x0 = jnp.zeros((bp, C, H), self.dtype)
            _, cache, outs, logits_buf, scores = jax.lax.fori_loop(
                0, sched.ticks, tick, (x0, state.cache, outs, logits_buf, scores))

            # The slots' tables: where the prompt now ends, and for final chunks the first token.
            first_tok = outs[0]
            tab = state.tables
            go = final & valid
            live = go & (end > 1)
            tables = SlotTables(
                tokens=tab.tokens.at[safe].set(jnp.where(go, first_tok, 0), mode="drop"),
                pos=tab.pos.at[safe].set(start + length, mode="drop"),
                live=tab.live.at[safe].set(live, mode="drop"),
                step=tab.step.at[safe].set(jnp.where(go, 1, 0), mode="drop"),
                end=tab.end.at[safe].set(end, mode="drop"))
            counts = counts.at[safe, first_tok].add(go.astype(jnp.int32), mode="drop")
            # Rows of these slots still in flight belong to whoever held the slot before: kill them.
            held = ring.slot(stage, state.tick)
            held_rows = held * spec.shape.rows + jnp.arange(spec.shape.rows)
            refilled = jnp.isin(held_rows, jnp.where(valid, slots, -1))
            inflight_live = state.inflight_live & ~refilled[None, :]
            new_state = state._replace(cache=cache, tables=tables, counts=counts, prompt_mask=pm,
                                       inflight_live=inflight_live)
            return new_state, (*outs, logits_buf, *scores)

        rep = REPLICATED
        samp_specs = jax.tree.map(lambda _: rep, SamplingTensors(*([0] * 11)))
        fn = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(self.param_specs, self._state_specs(), samp_specs, rep, rep, rep, rep, rep, rep, rep),
            out_specs=(self._state_specs(), (rep,) * (len(SAMPLE_OUTPUTS) + 1 + len(SCORE_OUTPUTS))),
            check_vma=False)
        return jax.jit(fn, donate_argnums=(1,))

    # -- decode -----------------------------------------------------------------------------------

    def decode_program(self, spec: DecodeSpec) -> Callable:
        """``fn(params, state, samp, release) -> (state, outputs)``, jitted with the state donated.

        ``release [slots]`` bool: slots to stop before the first tick (finished or aborted on the host).
        outputs, per tick ``[ticks, b, ...]``: ``SAMPLE_OUTPUTS`` of the microbatch the last stage finished
        at that tick (``RingSchedule.output_slot``), whether each row was live (a real token), then float32
        logits ``[ticks, b, V]`` when ``spec.record_logits``.
        """
        shape = spec.shape
        M, b = shape.microbatches, shape.rows
        V = self.cfg.vocab_size
        ring = self.ring(shape)
        ticks = ring.ticks_for_steps(spec.steps)
        sampler_fn = make_sampler(spec.sampler)

        def body(params, state: EngineState, samp, release):
            model = self.module(params)
            stage = jax.lax.axis_index(STAGE_AXIS)
            n_layers = self._layer_count()
            tab = state.tables._replace(live=state.tables.live & ~release)
            held = jnp.minimum(ring.slot(stage, state.tick), M - 1) * b + jnp.arange(b)
            live_in = state.inflight_live[0] & ~release[held]

            def tick(i, carry):
                cache, x_in, live_in, tab, counts, outs = carry
                t = state.tick + i
                # Every device embeds the first stage's tokens (the vocabulary is spread); stage 0 uses them.
                first0 = jnp.minimum(ring.slot(0, t), M - 1) * b
                x0 = model.embed_tokens(_rows(tab.tokens, first0, b))
                live0 = _rows(tab.live, first0, b)
                mine = jnp.minimum(ring.slot(stage, t), M - 1) * b
                x = jnp.where(stage == 0, x0, x_in)
                live = jnp.where(stage == 0, live0, live_in) & ring.runs(stage, t)
                step = StepInputs(rows=mine + jnp.arange(b), row0=mine,
                                  positions=_rows(tab.pos, mine, b)[:, None], live=live, kv_len=spec.kv_len)
                y, cache = model.layers(x[:, None, :], cache, step, num_layers=n_layers, unroll=self.unroll,
                                        attention=spec.attention)
                y = y[:, 0]
                # One transfer to the next stage: the activation with its rows' liveness as an extra column.
                packed = self._pass_on(jnp.concatenate([y, live[:, None].astype(y.dtype)], axis=-1))
                x_next, live_next = packed[:, :-1], packed[:, -1] > 0.5

                # The last stage finished the microbatch that entered S - 1 ticks ago: sample its tokens.
                out = jnp.minimum(ring.output_slot(t), M - 1) * b
                last = self._from_last_stage(jnp.concatenate([y, live[:, None].astype(y.dtype)], axis=-1))
                live_out = (last[:, -1] > 0.5) & ring.outputs(t)
                logits = self._logits(model, last[:, :-1])
                samp_rows = jax.tree.map(lambda a: _rows(a, out, b), samp)
                res = sampler_fn(logits, samp_rows, _rows(tab.step, out, b), _rows(state.prompt_mask, out, b),
                                 _rows(counts, out, b))
                tok = res[0]
                new_step = _rows(tab.step, out, b) + live_out
                tab = SlotTables(
                    tokens=_put_rows(tab.tokens, out, jnp.where(live_out, tok, _rows(tab.tokens, out, b))),
                    pos=_put_rows(tab.pos, out, _rows(tab.pos, out, b) + live_out),
                    live=_put_rows(tab.live, out, _rows(tab.live, out, b) & ~(live_out & (new_step >= _rows(tab.end, out, b)))),
                    step=_put_rows(tab.step, out, new_step), end=tab.end)
                if spec.sampler.penalties:
                    counts = _put_rows(counts, out, _rows(counts, out, b).at[jnp.arange(b), tok].add(
                        live_out.astype(jnp.int32)))
                *sampled, o_live, o_logits = outs
                outs = (*(buf.at[i].set(v) for buf, v in zip(sampled, res)), o_live.at[i].set(live_out),
                        o_logits.at[i].set(logits) if spec.record_logits else o_logits)
                return cache, x_next, live_next, tab, counts, outs

            outs = (*self._sample_buffers(sampler_fn, (ticks, b), b, samp, spec.sampler.stop_width),
                    jnp.zeros((ticks, b), bool),
                    jnp.zeros((ticks, b, V) if spec.record_logits else (0,), jnp.float32))
            carry = (state.cache, state.inflight[0], live_in, tab, state.counts, outs)
            cache, x_in, live_in, tab, counts, outs = jax.lax.fori_loop(0, ticks, tick, carry)
            new_state = state._replace(cache=cache, inflight=x_in[None], inflight_live=live_in[None],
                                       tables=tab, counts=counts, tick=state.tick + ticks)
            return new_state, outs

        rep = REPLICATED
        samp_specs = jax.tree.map(lambda _: rep, SamplingTensors(*([0] * 11)))
        fn = jax.shard_map(
            body, mesh=self.mesh, in_specs=(self.param_specs, self._state_specs(), samp_specs, rep),
            out_specs=(self._state_specs(), (rep,) * (len(SAMPLE_OUTPUTS) + 2)), check_vma=False)
        return jax.jit(fn, donate_argnums=(1,))


def host_array(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) array as numpy, from this process's first shard."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)
