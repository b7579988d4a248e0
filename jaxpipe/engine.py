"""Running one wave of requests through the jitted prefill and decode programs.

The engine owns the device side: it picks the wave's geometry (microbatches, rows, prompt bucket, cache
length), builds the padded inputs, runs prefill, then dispatches decode (many ticks per dispatch, the next
dispatch queued before the previous one's tokens are read, so the host never stalls the devices) until
every row has finished. Tokens go back to the caller one by one through a callback, in order per row.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import partition
from jaxpipe.errors import MemoryPlanError
from jaxpipe.pipeline import Geometry, PipelineModel, Sampler, host_array
from jaxpipe.sampling import SamplingParams, SamplingTensors, prompt_mask, sample, token_ranks

MIN_PROMPT_BUCKET = 16
CACHE_ALIGN = 128


@dataclasses.dataclass
class Row:
    """One sequence to generate: its prompt, sampling parameters, seed and token budget."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new: int  # max_tokens, or less when max_model_len leaves less room


@dataclasses.dataclass
class TokenEvent:
    """One generated token of one row, with its log-probability, its rank among all tokens (1 = most
    likely), and the top-k alternatives when logprobs were asked for."""

    row: int
    token: int
    logprob: float
    rank: int
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass
class WaveStats:
    """Counts and times of one wave; compilation is timed apart from running."""

    prompt_tokens: int = 0
    generated_tokens: int = 0   # all tokens handed out, the first one (from prefill) included
    decode_tokens: int = 0      # tokens produced by decode dispatches, i.e. during decode_s
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0


def prompt_bucket(n: int) -> int:
    """Prompt lengths are padded to powers of two (at least 16), so few prefill programs compile."""
    return max(MIN_PROMPT_BUCKET, partition.next_power_of_two(n))


class Engine:
    """Generates tokens for waves of rows on a laid-out model."""

    def __init__(self, model: PipelineModel, params: dict, *, num_microbatches: int | None = None,
                 steps_per_dispatch: int = 16, eos_token_ids: tuple[int, ...] = (),
                 device_bytes: int | None = None) -> None:
        self.model, self.params = model, params
        self.num_microbatches = num_microbatches
        self.steps_per_dispatch = steps_per_dispatch
        self.eos_token_ids = eos_token_ids
        self.device_bytes = device_bytes
        self._samplers: dict[tuple, Sampler] = {}
        self._executables: dict[tuple, Callable] = {}

    def _compiled(self, key: tuple, program: Callable, args: tuple, stats: WaveStats) -> Callable:
        """The program compiled for these argument shapes (ahead of time, so compile time is its own)."""
        if key not in self._executables:
            t0 = time.perf_counter()
            self._executables[key] = program.lower(*args).compile()
            stats.compile_s += time.perf_counter() - t0
        return self._executables[key]

    # -- geometry ---------------------------------------------------------------------------------

    def geometry(self, n_rows: int, prompt_len: int, max_new: int) -> Geometry:
        S = self.model.layout.stages
        M = min(self.num_microbatches or S, n_rows)
        b = partition.next_power_of_two(partition.ceil_div(n_rows, M))
        M = partition.ceil_div(n_rows, b)  # a smaller b may leave microbatches empty: drop them
        cache_len = partition.ceil_div(prompt_len + max_new, CACHE_ALIGN) * CACHE_ALIGN
        return Geometry(microbatches=M, rows=b, cache_len=cache_len)

    def check_memory(self, geo: Geometry) -> None:
        plan = partition.plan_memory(self.model.cfg, self.model.layout, dtype=self.model.dtype,
                                     max_model_len=geo.cache_len, batch=geo.batch,
                                     device_bytes=self.device_bytes)
        if not plan.fits:
            raise MemoryPlanError(
                f"a wave of {geo.batch} rows with a {geo.cache_len}-position KV cache does not fit the "
                f"devices' memory; lower max_num_seqs or max_tokens:\n{plan.table()}")

    def _sampler(self, rows: list[Row]) -> Sampler:
        num_logprobs = max((r.params.logprobs or 0) for r in rows)
        num_logprobs = 0 if num_logprobs == 0 else partition.next_power_of_two(num_logprobs)
        all_greedy = all(r.params.greedy for r in rows)
        need_sort = any(not r.params.greedy and (r.params.top_k > 0 or r.params.top_p < 1) for r in rows)
        key = (num_logprobs, all_greedy, need_sort)
        if key not in self._samplers:
            def fn(logits, st, step, pmask, counts, _k=num_logprobs, _g=all_greedy, _s=need_sort):
                tok, lp, top_ids, top_lp = sample(logits, st, step, pmask, counts, num_logprobs=_k,
                                                  all_greedy=_g, need_sort=_s)
                return tok, lp, token_ranks(logits, tok), top_ids, top_lp
            self._samplers[key] = Sampler(fn=fn, num_outputs=5)
        return self._samplers[key]

    # -- one wave ---------------------------------------------------------------------------------

    def run(self, rows: list[Row], on_token: Callable[[TokenEvent], bool], *,
            record_logits: bool = False) -> tuple[WaveStats, tuple[list, list] | None]:
        """Generate for ``rows``; ``on_token`` returns True once its row has finished (stop string, EOS).

        Returns timing stats and, when ``record_logits``, ``(prefill logits per row [len, V], logits
        per generated token per row)`` in float32 (for tests against a reference).
        """
        pm, stats = self.model, WaveStats()
        n = len(rows)
        longest = max(len(r.prompt_ids) for r in rows)
        P = prompt_bucket(longest)
        max_new = max(r.max_new for r in rows)
        geo = self.geometry(n, P, max_new)
        self.check_memory(geo)
        B, b = geo.batch, geo.rows
        V = pm.cfg.vocab_size

        tokens = np.zeros((B, P), np.int32)
        kv_start = np.full((B,), P - 1, np.int32)  # padding rows see one (dummy) token
        for i, r in enumerate(rows):
            tokens[i, P - len(r.prompt_ids):] = r.prompt_ids
            kv_start[i] = P - len(r.prompt_ids)
        sampler = self._sampler(rows)
        st = SamplingTensors.build([r.params for r in rows], [r.seed for r in rows], B,
                                   eos_token_ids=self.eos_token_ids)
        st = jax.tree.map(lambda a: pm.replicate(np.asarray(a)), st)
        penalties = any(r.params.repetition_penalty != 1 or r.params.presence_penalty
                        or r.params.frequency_penalty for r in rows)
        if penalties:
            ids = np.full((B, P), -1, np.int32)
            ids[:n] = np.where(np.arange(P)[None] >= kv_start[:n, None], tokens[:n], -1)
            pmask = pm.replicate(np.asarray(prompt_mask(jnp.asarray(ids), V)))
            counts_np = np.zeros((B, V), np.int32)
        else:
            pmask = pm.replicate(np.zeros((B, 0), bool))
            counts_np = np.zeros((B, 0), np.int32)
        kv_start_dev = pm.replicate(kv_start)

        args = (self.params, pm.new_cache(geo), pm.replicate(tokens), kv_start_dev, st, pmask,
                pm.replicate(counts_np))
        prefill = self._compiled(("prefill", geo, P, sampler, record_logits),
                                 pm.prefill_program(geo, P, sampler, all_logits=record_logits), args, stats)
        t0 = time.perf_counter()
        cache, outs = prefill(*args)
        first = host_array(outs[0])
        stats.prefill_s = time.perf_counter() - t0
        stats.prompt_tokens = sum(len(r.prompt_ids) for r in rows)

        produced = [0] * n
        finished = [False] * n
        logits_log: list[list[np.ndarray]] | None = [[] for _ in range(n)] if record_logits else None

        def deliver(i: int, tok: int, lp: float, rank: int, top_ids, top_lps, logits_row=None) -> None:
            if finished[i]:
                return
            produced[i] += 1
            stats.generated_tokens += 1
            if logits_log is not None and logits_row is not None:
                logits_log[i].append(logits_row)
            done = on_token(TokenEvent(i, tok, lp, rank, top_ids, top_lps))
            finished[i] = bool(done) or produced[i] >= rows[i].max_new

        lp0, rank0, ids0, tlp0 = (host_array(o) for o in outs[1:5])
        all_logits = host_array(outs[5]) if record_logits else None
        for i in range(n):
            deliver(i, int(first[i]), float(lp0[i]), int(rank0[i]), ids0[i], tlp0[i],
                    None if all_logits is None else all_logits[i, -1])
        if logits_log is not None:
            prefill_logits = [all_logits[i, P - len(rows[i].prompt_ids):] for i in range(n)]
        if all(finished):
            return stats, (prefill_logits, logits_log) if record_logits else None

        if penalties:
            counts_np[np.arange(B), first] += 1
        state = pm.initial_decode_state(geo, cache, first, pm.replicate(counts_np))
        R = pm.ring_slots(geo)
        ticks = self.steps_per_dispatch * R
        P_dev = pm.replicate(np.int32(P))
        decode = self._compiled(("decode", geo, ticks, sampler, record_logits),
                                pm.decode_program(geo, ticks, sampler, record_logits=record_logits),
                                (self.params, state, P_dev, kv_start_dev, st, pmask), stats)

        def consume(base: int, outs) -> None:
            tok, lp, rank, ids, tlp = (host_array(o) for o in outs[:5])
            lg = host_array(outs[5]) if record_logits else None
            for j in range(ticks):
                origin = pm.tick_origin(geo, base + j)
                if origin is None:
                    continue
                mb, k = origin
                for r in range(b):
                    i = mb * b + r
                    if i < n and produced[i] == k:
                        deliver(i, int(tok[j, r]), float(lp[j, r]), int(rank[j, r]), ids[j, r], tlp[j, r],
                                None if lg is None else lg[j, r])

        # The last tick that can still produce a wanted token: row i (ring slot i // b) gets its token
        # k at tick (k - 1) * R + slot + S - 1.
        S = pm.layout.stages
        needed = max(((r.max_new - 2) * R + i // b + S) for i, r in enumerate(rows) if r.max_new >= 2)
        t0 = time.perf_counter()
        prefill_tokens = stats.generated_tokens
        base, pending = 0, None
        while True:
            new = None
            if base < needed and not all(finished):
                # Queue the next dispatch before reading the previous one's tokens: the devices never idle.
                state, outs = decode(self.params, state, P_dev, kv_start_dev, st, pmask)
                new = (base, outs)
                base += ticks
            if pending is not None:
                consume(*pending)
            pending = new
            if pending is None or all(finished):
                break
        jax.block_until_ready(state.tick)
        stats.decode_s = time.perf_counter() - t0
        stats.decode_tokens = stats.generated_tokens - prefill_tokens
        return stats, (prefill_logits, logits_log) if record_logits else None
