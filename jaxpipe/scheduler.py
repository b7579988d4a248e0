"""``LLMEngine``: requests, a waiting queue, slots, admission, abort and ``step()`` — vLLM's engine, on the ring.

Each request gets ``n`` slots (one per completion) when enough are free, first come first served. Its
prompt is prefilled in chunks of at most ``max_prefill_chunk`` tokens, one prefill dispatch per step with
up to ``max_num_batched_tokens`` prompt tokens, so a long prompt never stops the running slots for long;
the chunk that ends the prompt samples the first token and the slot starts decoding. Every step then
queues one decode dispatch (``steps_per_dispatch`` tokens for every live slot) and only afterwards reads
the previous step's results, so the devices always have the next dispatch queued while the host
detokenizes, checks stops and admits. A slot whose sequence finished (EOS, stop token or string,
``max_tokens``, ``max_model_len``) or was aborted is released at the next dispatch and refilled by the
next waiting request; every other slot keeps decoding.

Exactness: a slot's computation never reads another slot's data, and a request's random draws depend
only on its seed and its own token index, so a request gets the same tokens whatever runs beside it and
whenever it arrives.

Several processes (``jax.distributed``): every process runs the same schedule. Requests and aborts are
taken on process 0 only; at the start of each step process 0 publishes them through the distributed
runtime's key-value store and every other process applies the same ones, so all make the same
decisions and issue the same programs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from typing import Any, Iterable

import numpy as np

from jaxpipe import partition
from jaxpipe.detokenize import IncrementalDetokenizer
from jaxpipe.engine import Engine
from jaxpipe.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpipe.pipeline import DecodeSpec, EngineShape, PipelineModel, PrefillBatch, PrefillSpec
from jaxpipe.sampling import RequestOutputKind, SamplerSpec, SamplingParams, SamplingTable

PromptType = str | list[int] | dict[str, Any]
MIN_CHUNK = 16          # smallest prompt-chunk bucket
MIN_KV_BUCKET = 128     # smallest attention window bucket


def _bucket(n: int, lo: int, hi: int, base: int = 2) -> int:
    """The smallest ``lo * base**k >= n``, at most ``hi``. Prefill shapes use base 4: every distinct shape
    is a compile, and a prompt chunk padded up to 4x costs little next to a compile stall."""
    b = lo
    while b < n:
        b *= base
    return min(hi, b)


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring (``/metrics``): gauges and monotonic totals."""

    num_running: int = 0
    num_waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_requests_finished: int = 0
    num_compiled_programs: int = 0
    compile_s: float = 0.0


class _Seq:
    """One completion of a request: its slot, detokenizer and progress."""

    def __init__(self, req: "_Request", index: int, seed: int, detok: IncrementalDetokenizer):
        self.req, self.index, self.seed, self.detok = req, index, seed, detok
        self.slot: int | None = None
        self.prefilled = 0          # prompt tokens queued for prefill so far
        self.dispatched = 0         # tokens the devices will have generated once all queued work has run
        self.logprobs: list[dict[int, Logprob]] | None = [] if req.params.logprobs is not None else None
        self.cumulative = 0.0
        self.done = False
        self.sent_tokens = 0        # for DELTA outputs: what was handed out already
        self.sent_text = 0
        self.sent_final = False

    @property
    def prefill_left(self) -> int:
        return len(self.req.prompt_ids) - self.prefilled


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 arrival: float, max_new: int):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.arrival, self.max_new = arrival, max_new
        self.seqs: list[_Seq] = []
        self.aborted = False
        # prompt_logprobs: one entry per prompt token, None for the first (filled as chunks are read)
        self.prompt_logprobs: list | None = (None if params.prompt_logprobs is None
                                             else [None] * len(prompt_ids))
        self.sent_prompt_logprobs = False

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.seqs)


class LLMEngine:
    """Continuous batching over the pipeline ring, with vLLM's ``LLMEngine`` API.

    Built by ``LLM`` (``llm.llm_engine``). ``add_request`` and ``abort_request`` may be called from any
    thread; ``step`` from one thread only.
    """

    _instances = 0

    def __init__(self, model: PipelineModel, params: dict, tokenizer, *, max_num_seqs: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], seed: int = 0, num_microbatches: int | None = None,
                 steps_per_dispatch: int = 4, max_num_batched_tokens: int = 2048, max_prefill_chunk: int = 512,
                 max_logprobs: int = 20, attention: str = "xla") -> None:
        self.model, self.tokenizer = model, tokenizer
        self._texts: dict[int, str] = {}  # token id -> its text alone (logprob entries' decoded_token)
        self.model_config = model.cfg
        self.max_model_len, self.eos_token_ids, self.seed = max_model_len, tuple(eos_token_ids), seed
        self.max_logprobs, self.attention = max_logprobs, attention
        self.steps_per_dispatch = steps_per_dispatch
        S = model.layout.stages
        M = max(1, min(num_microbatches or S, max_num_seqs))
        b = partition.ceil_div(max_num_seqs, M)
        self.chunk = min(max_prefill_chunk, _bucket(max_model_len, MIN_CHUNK, max_prefill_chunk))
        self.token_budget = max(max_num_batched_tokens, self.chunk)
        cache_len = partition.ceil_div(max_model_len, self.chunk) * self.chunk
        self.shape = EngineShape(microbatches=M, rows=b, cache_len=cache_len)
        self.max_num_seqs = self.shape.slots
        self.engine = Engine(model, params, self.shape)
        self.table = SamplingTable(self.shape.slots, self.eos_token_ids)
        self._table_version = 0
        self._slots: list[_Seq | None] = [None] * self.shape.slots
        self._free = collections.deque(range(self.shape.slots))
        self._release: set[int] = set()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[str, _Request] = {}
        self._pending: collections.deque = collections.deque()   # queued dispatches not read yet
        self._lock = threading.Condition()
        self._submitted: list[tuple[str, Any]] = []              # ("add", request) / ("abort", ids)
        self._known: set[str] = set()                             # live request ids (duplicate check)
        self._counter = 0
        import jax
        self._coordinated = jax.process_count() > 1   # process 0 decides; the others follow (see _sync)
        self._step_no = 0
        # Keys of this engine in the run's key-value store: every process builds its engines in the same
        # order, so the n-th engine has the same prefix everywhere.
        LLMEngine._instances += 1
        self._kv_prefix = f"jaxpipe/engine/{LLMEngine._instances}"
        self._read_no = 0
        # Processes that hold neither the first nor the last stage get the outputs from process 0.
        self._relay = self._coordinated and self._needs_relay()
        self._shutdown = False
        self.stats_ = EngineStats()
        self.record_logits = False   # tests: keep float32 logits of prefill positions and generated tokens
        # Benchmarks: a list to record every dispatch in, ("prefill", rows, tokens) or
        # ("decode", steps, live slots, mean context of each live slot); None records nothing.
        self.trace: list | None = None
        self._recorded: dict[str, tuple[list, list]] = {}

    # -- submission (any thread) ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Tokenizes here, in the caller's thread, and raises ``ValueError`` on a bad
        prompt before anything is queued. On processes other than 0 of a multi-process run, requests come
        from process 0 instead: the call only validates."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.max_logprobs:
                raise ValueError(f"SamplingParams.{name}={k} is more than max_logprobs={self.max_logprobs}; "
                                 "ask for fewer or raise LLM(max_logprobs=...)")
        text, ids = self.tokenize(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        self.check_prompt(ids)
        if params.n > self.max_num_seqs:
            raise ValueError(f"SamplingParams.n={params.n} is more than the engine's {self.max_num_seqs} slots "
                             "(max_num_seqs); lower n or raise max_num_seqs")
        request_id = str(request_id)
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"request id {request_id!r} is already running; ids must be unique")
            if self._coordinated and not self._is_coordinator():
                return
            self._known.add(request_id)
            self._submitted.append(("add", (request_id, text, ids, params,
                                            time.time() if arrival_time is None else arrival_time)))
            self._lock.notify_all()

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests: they produce no more outputs, their slots are freed at the next step."""
        ids = [request_id] if isinstance(request_id, str) else [str(i) for i in request_id]
        with self._lock:
            self._submitted.append(("abort", ids))
            self._lock.notify_all()

    def wait_for_requests(self, timeout: float | None = None) -> bool:
        """Block until something is submitted (True) or ``timeout`` seconds pass (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: bool(self._submitted) or self._shutdown, timeout)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt (text, token ids, or a dict with ``prompt`` / ``prompt_token_ids``) -> (text, ids)."""
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], list(self.tokenizer(prompt["prompt"])["input_ids"])
            raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def check_prompt(self, ids: list[int]) -> None:
        """Raise ``ValueError`` if the prompt is empty, too long for max_model_len, or has unknown ids."""
        if not ids:
            raise ValueError("the prompt is empty: it has no tokens")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: it leaves no room "
                "to generate. Shorten the prompt or raise max_model_len.")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    # -- queries -----------------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            submitted = any(kind == "add" for kind, _ in self._submitted)
        return bool(self._waiting or self._running or submitted)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            submitted = sum(kind == "add" for kind, _ in self._submitted)
        return len(self._waiting) + len(self._running) + submitted

    def pending_prefill(self) -> int:
        """Slots whose prompt is not fully queued for prefill yet."""
        return sum(1 for s in self._slots if s is not None and not s.done and s.prefill_left > 0)

    def block(self) -> None:
        """Wait until everything queued on the devices has run."""
        self.engine.block()

    def stats(self) -> EngineStats:
        s = self.stats_
        s.num_running, s.num_waiting = len(self._running), len(self._waiting)
        s.num_compiled_programs, s.compile_s = self.engine.num_compiled, self.engine.compile_s
        return dataclasses.replace(s)

    # -- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: take submissions, admit, queue a prefill and a decode dispatch, read the
        previous step's results. Returns the outputs of requests that progressed (per their output_kind)."""
        self._take_submissions()
        self._admit()
        queued = 0
        prefill = self._schedule_prefill()
        if prefill is not None:
            self._pending.append(prefill)
            queued += 1
        decode = self._schedule_decode()
        if decode is not None:
            self._pending.append(decode)
            queued += 1
        touched: dict[str, _Request] = {}
        # Read everything queued before this step; what was just queued waits for the next step, unless
        # nothing else is left to overlap it with.
        while len(self._pending) > queued or (self._pending and not queued):
            self._read(self._pending.popleft(), touched)
        self._step_no += 1
        return self._outputs(touched)

    def _take_submissions(self) -> None:
        with self._lock:
            items, self._submitted = self._submitted, []
        if self._coordinated:
            items = self._sync(items)
        for kind, item in items:
            if kind == "add":
                request_id, text, ids, params, arrival = item
                self._known.add(request_id)
                self._waiting.append(self._new_request(request_id, text, ids, params, arrival))
            else:
                for rid in item:
                    self._abort(rid)

    def _new_request(self, request_id, text, ids, params: SamplingParams, arrival) -> _Request:
        room = self.max_model_len - len(ids)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        req = _Request(request_id, text, ids, params, arrival, max_new)
        # Unseeded requests draw from the engine's seed and their arrival number (the same on every
        # process); completion j of a request uses seed + j, as vLLM does.
        base = params.seed if params.seed is not None else int(
            np.random.default_rng([self.seed, self._counter]).integers(2 ** 62))
        self._counter += 1
        for j in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, ids, params, self.eos_token_ids, max_tokens=max_new)
            req.seqs.append(_Seq(req, j, base + j, detok))
        return req

    def _abort(self, request_id: str) -> None:
        for req in list(self._waiting):
            if req.request_id == request_id:
                self._waiting.remove(req)
                self._forget(req)
                return
        req = self._running.pop(request_id, None)
        if req is not None:
            req.aborted = True
            for s in req.seqs:
                if not s.done:
                    s.done = True
                    self._free_slot(s)
            self._forget(req)

    def _forget(self, req: _Request) -> None:
        with self._lock:
            self._known.discard(req.request_id)

    def _free_slot(self, s: _Seq) -> None:
        if s.slot is not None:
            self._slots[s.slot] = None
            self.table.clear_row(s.slot)
            self._table_version += 1
            self._release.add(s.slot)
            self._free.append(s.slot)
            s.slot = None
        # The slot's device-side occupant is stopped by the next decode dispatch, unless a prefill for a
        # new occupant is queued first (that resets the slot itself).

    def _admit(self) -> None:
        while self._waiting and len(self._free) >= len(self._waiting[0].seqs):
            req = self._waiting.popleft()
            self._running[req.request_id] = req
            for s in req.seqs:
                s.slot = self._free.popleft()
                self._slots[s.slot] = s
                self.table.set_row(s.slot, req.params, s.seed)
            self._table_version += 1
            self.stats_.prompt_tokens_total += len(req.prompt_ids)

    def _sampler_spec(self) -> SamplerSpec:
        params = [s.req.params for s in self._slots if s is not None]
        return SamplerSpec.covering(params, max_logprobs=self.max_logprobs, num_eos=len(self.eos_token_ids))

    def _schedule_prefill(self):
        """Chunks of the waiting prompts, first come first served, within the token budget."""
        pending = [s for s in self._slots if s is not None and not s.done and s.prefill_left > 0]
        if not pending:
            return None
        pending.sort(key=lambda s: (s.req.arrival, s.slot))
        chosen: list[tuple[_Seq, int]] = []
        longest = 0
        for s in pending:
            n = min(s.prefill_left, self.chunk)
            width = _bucket(max(longest, n), MIN_CHUNK, self.chunk, 4)
            if chosen and (len(chosen) + 1) * width > self.token_budget:
                break
            chosen.append((s, n))
            longest = max(longest, n)
        C = _bucket(longest, MIN_CHUNK, self.chunk, 4)
        cap = max(1, self.token_budget // C)
        n = _bucket(len(chosen), 1, cap, 4)
        S = self.model.layout.stages
        Mp = max(1, min(S, n))
        bp = partition.ceil_div(n, Mp)
        rows = Mp * bp
        tokens = np.zeros((rows, C), np.int32)
        slots = np.full((rows,), self.shape.slots, np.int32)
        start = np.zeros((rows,), np.int32)
        length = np.zeros((rows,), np.int32)
        final = np.zeros((rows,), bool)
        end = np.zeros((rows,), np.int32)
        scoring = [s.req.params.prompt_logprobs is not None and s.index == 0 for s, _ in chosen]
        next_tokens = np.full((rows, C), -1, np.int32) if any(scoring) else None
        starts = []
        for i, (s, k) in enumerate(chosen):
            a = s.prefilled
            starts.append(a)
            tokens[i, :k] = s.req.prompt_ids[a:a + k]
            if scoring[i]:
                nxt = s.req.prompt_ids[a + 1:a + k + 1]
                next_tokens[i, :len(nxt)] = nxt
            slots[i], start[i], length[i] = s.slot, a, k
            final[i] = a + k == len(s.req.prompt_ids)
            end[i] = s.req.max_new
            s.prefilled += k
            self._release.discard(s.slot)
            if final[i]:
                s.dispatched = 1
        kv_len = _bucket(int((start + C).max()), MIN_KV_BUCKET, self.shape.cache_len)
        sampler = SamplerSpec.full(max_logprobs=self.max_logprobs, stop_width=self._sampler_spec().stop_width)
        # Top-k alternatives per prompt position: as many as the chunk's widest request, in powers of two (few
        # compiles). A top-k over the vocabulary at every position is the cost of scoring: on one H200, 64 x 512
        # prompt tokens with prompt_logprobs=5 took 2.3x their prefill when k was max_logprobs (20), against
        # 1.02x with prompt_logprobs=0 (BENCHMARKS.md 2026-12-02).
        top = max([s.req.params.prompt_logprobs for sc, (s, _) in zip(scoring, chosen) if sc] + [0])
        spec = PrefillSpec(shape=self.shape, microbatches=Mp, rows=bp, chunk=C, kv_len=kv_len, sampler=sampler,
                           record_logits=self.record_logits, score=next_tokens is not None,
                           score_top=_bucket(top, 1, self.max_logprobs) if top else 0)
        samp = self.engine.sampling_tensors(self.table, self._table_version, sampler.stop_width)
        outs = self.engine.prefill(spec, samp, PrefillBatch(tokens, slots, start, length, final, end, next_tokens))
        if self.trace is not None:
            self.trace.append(("prefill", len(chosen), int(length.sum())))
        return ("prefill", [(s, k, bool(final[i]), starts[i], scoring[i]) for i, (s, k) in enumerate(chosen)], outs)

    def _schedule_decode(self):
        live = [s for s in self._slots if s is not None and not s.done and s.prefill_left == 0
                and s.dispatched < s.req.max_new]
        if not live:
            return None
        D = self.steps_per_dispatch
        need = max(len(s.req.prompt_ids) + min(s.dispatched + D, s.req.max_new) for s in live) + 1
        kv_len = self.shape.cache_len if self.attention == "pallas" else \
            _bucket(need, MIN_KV_BUCKET, self.shape.cache_len)
        sampler = self._sampler_spec()
        spec = DecodeSpec(shape=self.shape, steps=D, kv_len=kv_len, sampler=sampler, attention=self.attention,
                          record_logits=self.record_logits)
        release = np.zeros((self.shape.slots,), bool)
        release[list(self._release)] = True
        self._release.clear()
        samp = self.engine.sampling_tensors(self.table, self._table_version, sampler.stop_width)
        tick0, outs = self.engine.decode(spec, samp, release)
        if self.trace is not None:
            self.trace.append(("decode", D, len(live),
                               [len(s.req.prompt_ids) + s.dispatched + (D - 1) / 2 for s in live]))
        for s in live:
            s.dispatched = min(s.dispatched + D, s.req.max_new)
        return ("decode", list(self._slots), (tick0, outs))

    # -- reading results ----------------------------------------------------------------------------------

    def _needs_relay(self) -> bool:
        import jax
        S = self.model.layout.stages
        ends = {d.process_index for s in (0, S - 1) for d in self.model.mesh.devices[s]}
        return len(ends) < jax.process_count()

    def _fetch(self, outs, from_last: tuple[int, ...]) -> list[np.ndarray]:
        """The outputs of one dispatch on the host: read from this process's devices, or, on a process
        holding neither end stage, published by process 0 through the key-value store."""
        from jaxpipe import distributed

        n, self._read_no = self._read_no, self._read_no + 1
        if not self._relay:
            return self.engine.fetch(outs, from_last)
        key = f"{self._kv_prefix}/out/{n}"
        if self.engine.readable_stage is None:
            return _unpack_arrays(distributed.kv_get(key))
        arrays = self.engine.fetch(outs, from_last)
        if self._is_coordinator():
            distributed.kv_set(key, _pack_arrays(arrays))
            if n >= 64:  # followers lag at most a few dispatches: the device programs keep them in step
                distributed.kv_delete(f"{self._kv_prefix}/out/{n - 64}")
        return arrays

    def _read(self, item, touched: dict[str, _Request]) -> None:
        kind, owners, payload = item
        if kind == "prefill":
            tok, lp, rank, top_ids, top_lp, logits, *scores = self._fetch(payload, from_last=(5,))
            for i, (s, k, final, a, scoring) in enumerate(owners):
                if s.done:
                    continue
                if scoring:
                    self._record_prompt_logprobs(s.req, i, k, a, scores)
                if self.record_logits and s.index == 0:
                    rec = self._recorded.setdefault(s.req.request_id, ([], []))
                    rec[0].append(logits[i, :k])
                    if final:
                        rec[1].append(logits[i, k - 1])
                if final:
                    self._deliver(s, int(tok[i]), float(lp[i]), int(rank[i]), top_ids[i], top_lp[i], touched)
            return
        tick0, outs = payload
        tok, lp, rank, top_ids, top_lp, live, logits = self._fetch(outs, from_last=(6,))
        b = self.shape.rows
        slots = self.engine.ring.output_slots(tick0, tok.shape[0])
        for j, r in zip(*np.nonzero(live)):
            mb = slots[j]
            if mb is None:
                continue
            s = owners[mb * b + r]
            if s is not None and not s.done:
                if self.record_logits and s.index == 0:
                    self._recorded[s.req.request_id][1].append(logits[j, r])
                self._deliver(s, int(tok[j, r]), float(lp[j, r]), int(rank[j, r]), top_ids[j, r], top_lp[j, r],
                              touched)

    def _record_prompt_logprobs(self, req: _Request, i: int, k: int, a: int, scores) -> None:
        """Prompt positions a .. a+k-1 scored the tokens after them: entries a+1 .. a+k of prompt_logprobs."""
        lp, rank, top_ids, top_lp = scores
        want = req.params.prompt_logprobs
        text = self._token_text
        ids = req.prompt_ids
        k = max(0, min(k, len(ids) - 1 - a))
        # Python lists first: indexing NumPy arrays element by element costs more than the rest of this loop.
        lp, rank = lp[i, :k].tolist(), rank[i, :k].tolist()
        top_ids, top_lp = top_ids[i, :k, :want].tolist(), top_lp[i, :k, :want].tolist()
        for j in range(k):
            tok = ids[a + j + 1]
            entry = {tok: Logprob(lp[j], rank[j], text(tok))}
            for r, (tid, tlp) in enumerate(zip(top_ids[j], top_lp[j]), start=1):
                if tid not in entry:
                    entry[tid] = Logprob(tlp, r, text(tid))
            req.prompt_logprobs[a + j + 1] = entry

    def _token_text(self, tid: int) -> str:
        """``tokenizer.decode([tid])``, once per token id (scoring asks for the same ids at many positions)."""
        out = self._texts.get(tid)
        if out is None:
            out = self._texts[tid] = self.tokenizer.decode([tid])
        return out

    def _deliver(self, s: _Seq, tok: int, lp: float, rank: int, top_ids, top_lp, touched) -> None:
        req = s.req
        touched[req.request_id] = req
        self.stats_.generation_tokens_total += 1
        s.cumulative += lp
        if s.logprobs is not None:
            k = req.params.logprobs
            text = self._token_text
            entry = {tok: Logprob(lp, rank, text(tok))}
            for r, (tid, tlp) in enumerate(zip(top_ids[:k].tolist(), top_lp[:k].tolist()), start=1):
                if tid not in entry:
                    entry[tid] = Logprob(tlp, r, text(tid))
            s.logprobs.append(entry)
        done = s.detok.append(tok)
        if done or len(s.detok.token_ids) >= req.max_new:
            s.done = True
            self._free_slot(s)
            if req.finished:
                self._running.pop(req.request_id, None)
                self._forget(req)
                self.stats_.num_requests_finished += 1

    def _outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        outs = []
        for req in touched.values():
            if req.aborted:
                continue
            kind = req.params.output_kind
            finished = req.finished
            if kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            completions = []
            for s in req.seqs:
                c = self._completion(s, kind)
                if c is not None:
                    completions.append(c)
            if completions or finished:
                prompt_lp = req.prompt_logprobs
                if kind == RequestOutputKind.DELTA:  # as vLLM: only in the first delta
                    prompt_lp, req.sent_prompt_logprobs = (None if req.sent_prompt_logprobs else prompt_lp), True
                outs.append(RequestOutput(request_id=req.request_id, prompt=req.prompt,
                                          prompt_token_ids=req.prompt_ids, outputs=completions, finished=finished,
                                          prompt_logprobs=None if prompt_lp is None else list(prompt_lp)))
        return outs

    def _completion(self, s: _Seq, kind: RequestOutputKind) -> CompletionOutput | None:
        d = s.detok
        finish = (d.finish_reason or "length") if s.done else None
        if kind != RequestOutputKind.DELTA:
            text = d.text if s.done else d.text[:len(d.text) - d.held_back]
            return CompletionOutput(index=s.index, text=text, token_ids=list(d.token_ids),
                                    cumulative_logprob=s.cumulative if s.logprobs is not None else None,
                                    logprobs=None if s.logprobs is None else list(s.logprobs),
                                    finish_reason=finish, stop_reason=d.stop_reason if s.done else None)
        if s.sent_final:
            return None
        new_ids = d.token_ids[s.sent_tokens:]
        delta = d.stream_delta()
        if not new_ids and not delta and not s.done:
            return None
        logprobs = None if s.logprobs is None else s.logprobs[s.sent_tokens:]
        s.sent_tokens = len(d.token_ids)
        s.sent_final = s.done
        return CompletionOutput(index=s.index, text=delta, token_ids=list(new_ids),
                                cumulative_logprob=s.cumulative if s.logprobs is not None else None,
                                logprobs=logprobs, finish_reason=finish, stop_reason=d.stop_reason if s.done else None)

    def take_recorded_logits(self) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
        """Tests: per request id, (prefill logits ``[prompt_len, V]``, the logits behind each generated
        token of its first completion), recorded while ``record_logits`` was on; then forgotten."""
        out = {rid: (np.concatenate(pre), dec) for rid, (pre, dec) in self._recorded.items()}
        self._recorded = {}
        return out

    # -- several processes ----------------------------------------------------------------------------------

    @staticmethod
    def _is_coordinator() -> bool:
        import jax
        return jax.process_index() == 0

    def _sync(self, items: list) -> list:
        """Process 0's submissions of this step, on every process (through the key-value store)."""
        from jaxpipe import distributed

        key = f"{self._kv_prefix}/step/{self._step_no}"
        if self._is_coordinator():
            payload = json.dumps({"items": [_encode(k, v) for k, v in items], "shutdown": self._shutdown})
            distributed.kv_set(key, payload)
            # Keep a window: a follower is at most a few steps behind (device programs keep processes in
            # step; steps without a dispatch do not, so the window is wide).
            if self._step_no >= 64:
                distributed.kv_delete(f"{self._kv_prefix}/step/{self._step_no - 64}")
            return items
        data = json.loads(distributed.kv_get(key))
        if data["shutdown"]:
            self._shutdown = True
        return [_decode(k, v) for k, v in data["items"]]

    def shutdown(self) -> None:
        """Stop the run: on process 0 the next step tells the other processes' ``run_worker`` to return."""
        with self._lock:
            self._shutdown = True
            self._lock.notify_all()

    def run_worker(self) -> None:
        """On processes other than 0: follow process 0's steps until it shuts down."""
        while not self._shutdown:
            self.step()

    # -- warm-up --------------------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile the programs the first requests need (a short greedy prompt and its decode) by running
        one; leaves the request counter and the statistics as they were."""
        counter, stats = self._counter, dataclasses.replace(self.stats_)
        self.add_request("__jaxpipe_warmup__", [0] * min(8, self.max_model_len - 2),
                         SamplingParams(temperature=0.0, max_tokens=2 * self.steps_per_dispatch, ignore_eos=True,
                                        output_kind=RequestOutputKind.FINAL_ONLY))
        while self.has_unfinished_requests():
            self.step()
        self._counter, self.stats_ = counter, stats


def _pack_arrays(arrays: list[np.ndarray]) -> str:
    import base64
    import io
    buf = io.BytesIO()
    np.savez(buf, *arrays)
    return base64.b64encode(buf.getvalue()).decode()


def _unpack_arrays(text: str) -> list[np.ndarray]:
    import base64
    import io
    with np.load(io.BytesIO(base64.b64decode(text))) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _encode(kind: str, item) -> list:
    if kind == "add":
        request_id, text, ids, params, arrival = item
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
        fields["output_kind"] = int(fields["output_kind"])
        return [kind, [request_id, text, ids, fields, arrival]]
    return [kind, item]


def _decode(kind: str, item) -> tuple:
    if kind == "add":
        request_id, text, ids, fields, arrival = item
        return kind, (request_id, text, ids, SamplingParams(**fields), arrival)
    return kind, item
