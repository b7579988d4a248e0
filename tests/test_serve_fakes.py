"""A fake ``LLMEngine`` for the server's tests, and ``python tests/test_serve_fakes.py`` to serve it.

``FakeEngine`` follows the interface of ``jaxpipe.scheduler.LLMEngine`` (add_request / abort_request /
step / wait_for_requests / stats / warmup / shutdown, DELTA / CUMULATIVE / FINAL_ONLY outputs) with a
real tokenizer and jaxpipe's own ``IncrementalDetokenizer`` (so stop strings, min_tokens, EOS and finish
reasons behave as the engine's), but "generates" deterministic tokens from a fixed word list (and scores
prompts with deterministic ``prompt_logprobs``, in the first DELTA output only, as the engine): the routes,
protocol, streaming, errors, disconnects, metrics and shutdown of the server can be tested in seconds.
The tests of the server on the real engine are in test_serve_e2e.py.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections import deque
from types import SimpleNamespace

import pytest

import jaxpipe.sampling as sampling
from jaxpipe.detokenize import IncrementalDetokenizer
from jaxpipe.outputs import CompletionOutput, Logprob, RequestOutput


def _install_output_kind() -> None:
    """Until the engine of issue 9 lands (``RequestOutputKind``, ``SamplingParams.output_kind``), give
    ``jaxpipe.sampling`` vLLM's enum and field, so that the server can be written against them."""
    if hasattr(sampling, "RequestOutputKind"):
        return

    class RequestOutputKind(enum.IntEnum):
        CUMULATIVE = 0
        DELTA = 1
        FINAL_ONLY = 2

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class SamplingParams(sampling.SamplingParams):
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    sampling.RequestOutputKind = RequestOutputKind
    sampling.SamplingParams = SamplingParams


_install_output_kind()
RequestOutputKind = sampling.RequestOutputKind

WORDS = " the cat sat on a mat and then it ran to see the dog . Hello world ! Paris is nice , very nice indeed"
POISON = "POISON"  # a prompt containing it gets an output the server cannot format (an internal error)


@dataclasses.dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_requests_finished: int = 0


class _Seq:
    def __init__(self, detok: IncrementalDetokenizer) -> None:
        self.detok = detok
        self.logprobs: list[dict[int, Logprob]] = []
        self.sent_tokens = 0
        self.done_sent = False


class _Req:
    def __init__(self, request_id, prompt, ids, params, seqs) -> None:
        self.request_id, self.prompt, self.ids, self.params, self.seqs = request_id, prompt, ids, params, seqs
        self.prompt_logprobs = None
        self.sent_prompt_logprobs = False


class FakeEngine:
    """Deterministic tokens: position k of completion j of a prompt is ``words[(h + 5 k + 11 j) % len]``,
    h from the prompt ids (and the seed for sampled requests). Each step takes ``step_s`` seconds."""

    def __init__(self, tokenizer, *, max_model_len: int = 256, max_num_seqs: int = 4, step_s: float = 0.004):
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(vocab_size=len(tokenizer))
        self.max_model_len, self.max_num_seqs, self.step_s = max_model_len, max_num_seqs, step_s
        self.words = tokenizer(WORDS, add_special_tokens=False)["input_ids"]
        self.eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
        self._cond = threading.Condition()
        self._new: deque[_Req] = deque()
        self._aborts: set[str] = set()
        self._signal = False
        self._ids: set[str] = set()  # live request ids (duplicates are refused)
        self._waiting: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}
        self._stats = EngineStats()
        self.fail_next_step = False  # test hook: the next step() raises
        self.aborted: list[str] = []  # ids whose abort the engine carried out
        self.warmed = self.shut_down = False
        self.steps = 0

    # -- thread-safe submission -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt, params, arrival_time: float | None = None) -> None:
        if isinstance(prompt, dict):
            text = prompt.get("prompt")
            ids = list(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else \
                self.tokenizer(text)["input_ids"]
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer(prompt)["input_ids"]
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"request {request_id}: prompt of {len(ids)} tokens leaves no room in "
                             f"max_model_len={self.max_model_len}")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise ValueError(f"request {request_id}: token ids outside the vocabulary")
        seqs = [_Seq(IncrementalDetokenizer(self.tokenizer, ids, params, self.eos)) for _ in range(params.n)]
        req = _Req(request_id, text, ids, params, seqs)
        if getattr(params, "prompt_logprobs", None) is not None:
            req.prompt_logprobs = self.prompt_logprobs_of(ids, params.prompt_logprobs)
        with self._cond:
            if request_id in self._ids:
                raise ValueError(f"request id {request_id} is already live")
            self._ids.add(request_id)
            self._new.append(req)
            self._signal = True
            self._cond.notify_all()

    def abort_request(self, request_id) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._cond:
            self._aborts.update(ids)
            self._signal = True
            self._cond.notify_all()

    def wait_for_requests(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._signal:
                self._cond.wait(timeout)
            got, self._signal = self._signal, False
            return got

    def has_unfinished_requests(self) -> bool:
        return self.get_num_unfinished_requests() > 0

    def get_num_unfinished_requests(self) -> int:
        with self._cond:
            return len(self._new) + len(self._waiting) + len(self._running)

    def stats(self) -> EngineStats:
        with self._cond:
            return dataclasses.replace(self._stats)

    def warmup(self) -> None:
        self.warmed = True

    def shutdown(self) -> None:
        self.shut_down = True

    # -- the engine thread ------------------------------------------------------------------------

    def _token(self, req: _Req, j: int, k: int) -> int:
        h = sum(req.ids) + (0 if req.params.greedy else 31 * (req.params.seed or 12345))
        return self.words[(h + 5 * k + 11 * j) % len(self.words)]

    def _logprobs(self, token: int, k: int, top: int) -> dict[int, Logprob]:
        dec = lambda t: self.tokenizer.decode([t])  # noqa: E731
        entry = {token: Logprob(-0.25 - 0.01 * k, 1, dec(token))}
        others = [t for t in dict.fromkeys(self.words) if t != token]
        for rank, t in enumerate(others[:max(0, top - 1)], start=2):
            entry[t] = Logprob(-1.0 - rank, rank, dec(t))
        return entry

    def prompt_logprobs_of(self, ids: list[int], top: int) -> list[dict[int, Logprob] | None]:
        """The fake's scores of a prompt, shaped as the engine's: None, then per token the token itself
        (rank 1 at odd positions, else rank 3 + position) and the top ``top`` (ranks 1..top)."""
        dec = lambda t: self.tokenizer.decode([t])  # noqa: E731
        out: list[dict[int, Logprob] | None] = [None]
        for pos in range(1, len(ids)):
            tok = ids[pos]
            first = pos % 2 == 1
            entry = {tok: Logprob(-0.5 - 0.01 * pos if first else -3.0 - 0.01 * pos, 1 if first else 3 + pos,
                                  dec(tok))}
            others = [t for t in dict.fromkeys(self.words) if t != tok]
            best = ([tok] if first else []) + others
            for rank, t in enumerate(best[:top], start=1):
                entry.setdefault(t, Logprob(-1.0 - 0.1 * rank, rank, dec(t)))
            out.append(entry)
        return out

    def step(self) -> list[RequestOutput]:
        with self._cond:
            new, self._new = list(self._new), deque()
            aborts, self._aborts = self._aborts, set()
            fail, self.fail_next_step = self.fail_next_step, False
        self.steps += 1
        self._waiting.extend(new)
        for rid in aborts:
            if rid in self._running or any(r.request_id == rid for r in self._waiting):
                self.aborted.append(rid)
            self._running.pop(rid, None)
            self._waiting = deque(r for r in self._waiting if r.request_id != rid)
            with self._cond:
                self._ids.discard(rid)
        if fail:
            raise RuntimeError("injected step failure")
        used = sum(r.params.n for r in self._running.values())
        while self._waiting and used + self._waiting[0].params.n <= self.max_num_seqs:
            r = self._waiting.popleft()
            self._running[r.request_id] = r
            used += r.params.n
            with self._cond:
                self._stats.prompt_tokens_total += len(r.ids)
        outputs = []
        for r in list(self._running.values()):
            for j, s in enumerate(r.seqs):
                if not s.detok.finished:
                    k = len(s.detok.token_ids)
                    t = self._token(r, j, k)
                    s.detok.append(t)
                    if r.params.logprobs is not None:
                        s.logprobs.append(self._logprobs(t, k, r.params.logprobs))
                    with self._cond:
                        self._stats.generation_tokens_total += 1
            out = self._output(r)
            if out is not None:
                outputs.append(out)
            if all(s.detok.finished for s in r.seqs):
                del self._running[r.request_id]
                with self._cond:
                    self._ids.discard(r.request_id)
                    self._stats.num_requests_finished += 1
        with self._cond:
            self._stats.num_running = sum(r.params.n for r in self._running.values())
            self._stats.num_waiting = len(self._waiting) + len(self._new)
        time.sleep(self.step_s)
        return outputs

    def _output(self, r: _Req) -> RequestOutput | None:
        kind = r.params.output_kind
        finished = all(s.detok.finished for s in r.seqs)
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        comps = []
        for j, s in enumerate(r.seqs):
            d = s.detok
            if kind == RequestOutputKind.DELTA:
                if s.done_sent:
                    continue
                ids, lps, text = d.token_ids[s.sent_tokens:], s.logprobs[s.sent_tokens:], d.stream_delta()
            else:
                ids, lps, text = list(d.token_ids), list(s.logprobs), d.text
            s.sent_tokens, s.done_sent = len(d.token_ids), d.finished
            if POISON in (r.prompt or "") and ids:
                text = None  # not a str: the server cannot format it
            comps.append(CompletionOutput(
                index=j, text=text, token_ids=list(ids),
                cumulative_logprob=sum(e[t].logprob for t, e in zip(d.token_ids, s.logprobs))
                if r.params.logprobs is not None else None,
                logprobs=lps if r.params.logprobs is not None else None,
                finish_reason=d.finish_reason, stop_reason=d.stop_reason))
        prompt_lp = r.prompt_logprobs
        if kind == RequestOutputKind.DELTA:  # as the engine (and vLLM): in the first output only
            prompt_lp, r.sent_prompt_logprobs = (None if r.sent_prompt_logprobs else prompt_lp), True
        return RequestOutput(request_id=r.request_id, prompt=r.prompt, prompt_token_ids=r.ids, outputs=comps,
                             finished=finished, prompt_logprobs=prompt_lp)

    # -- offline reference ------------------------------------------------------------------------

    def expected(self, prompt_ids: list[int], params) -> list[str]:
        """The texts of the n completions of one request (the server must return exactly these)."""
        r = _Req("ref", None, list(prompt_ids), params,
                 [_Seq(IncrementalDetokenizer(self.tokenizer, prompt_ids, params, self.eos))
                  for _ in range(params.n)])
        for j, s in enumerate(r.seqs):
            while not s.detok.finished:
                s.detok.append(self._token(r, j, len(s.detok.token_ids)))
        return [s.detok.text for s in r.seqs]


# -- the fake on its own ----------------------------------------------------------------------------------


def test_fake_engine_follows_the_interface(smollm2_tokenizer):
    eng = FakeEngine(smollm2_tokenizer, step_s=0)
    p = sampling.SamplingParams(temperature=0, max_tokens=6, output_kind=RequestOutputKind.DELTA)
    eng.add_request("a", "Hello", p)
    with pytest.raises(ValueError, match="already live"):
        eng.add_request("a", "Hello", p)
    text, done = "", False
    while not done:
        for out in eng.step():
            text += out.outputs[0].text
            done = out.finished
    ids = smollm2_tokenizer("Hello")["input_ids"]
    assert text == eng.expected(ids, p)[0] and len(text) > 5
    assert not eng.has_unfinished_requests() and eng.stats().generation_tokens_total == 6


if __name__ == "__main__":  # serve a FakeEngine: python tests/test_serve_fakes.py TOKENIZER_DIR PORT_FILE
    import sys

    from transformers import AutoTokenizer

    from jaxpipe.serve.app import OpenAIServer, bind_socket, run_server

    tok_dir, port_file = sys.argv[1], sys.argv[2]
    engine = FakeEngine(AutoTokenizer.from_pretrained(tok_dir), step_s=0.02)
    sock = bind_socket("127.0.0.1", 0)
    server = OpenAIServer(engine, ["fake"])
    with open(port_file + ".tmp", "w") as f:
        f.write(str(sock.getsockname()[1]))
    import os
    os.replace(port_file + ".tmp", port_file)
    try:
        run_server(server, sock, log_level="warning")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        print("engine shut down:", engine.shut_down, flush=True)
