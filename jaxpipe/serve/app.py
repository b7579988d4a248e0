"""The OpenAI-compatible HTTP server: FastAPI routes over an ``LLMEngine`` driven by :class:`AsyncEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent
events), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Errors are OpenAI's JSON body
``{"error": {"message", "type", "param", "code"}}``: 400 for bad parameters, malformed JSON and prompts
too long for ``max_model_len``; 401 for a wrong API key; 404 for an unknown model; 503 with
``Retry-After`` when the waiting queue is full or the server is stopping; 500 when one request fails
inside the server (the others go on).

Every engine request gets ``output_kind=DELTA``: each step's outputs carry only the new text, tokens and
logprobs, which stream as they are and add up for non-streamed responses (``prompt_logprobs`` come in a
request's first output only).

Prompt scoring, as vLLM's server: ``echo`` puts the prompt in front of the completion and, with
``logprobs=k``, its tokens (the first with a ``null`` logprob) in front of the completion's logprobs;
``max_tokens=0`` with ``echo`` returns the prompt alone (the engine generates one token, which is
dropped); vLLM's ``prompt_logprobs`` field fills each choice's ``prompt_logprobs``.

Tokenization and chat templates run on one worker thread (the HF tokenizer is not safe to mutate from
several threads; one thread also keeps the order of arrival), so the event loop only routes bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxpipe.outputs import CompletionOutput, RequestOutput
from jaxpipe.sampling import RequestOutputKind, SamplingParams
from jaxpipe.serve import protocol as p
from jaxpipe.serve.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from jaxpipe.serve.metrics import RequestTimer, ServerMetrics

logger = logging.getLogger("jaxpipe.serve")

# Seconds a client should wait before retrying a 503 (queue full or stopping).
RETRY_AFTER_S = 1
# The floor put on logprobs in responses, as vLLM's server: JSON has no -inf.
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class ApiError(Exception):
    """An error response: HTTP status, OpenAI's error fields, optional headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                503: "service_unavailable_error"}.get(self.status, "server_error" if self.status >= 500
                                                       else "invalid_request_error")
        return p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=kind, param=self.param,
                                                 code=self.code if self.code is not None else self.status)
                               ).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _sse(obj: BaseModel | dict[str, Any] | str, exclude: set[str] | None = None) -> str:
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(exclude=exclude)
    else:
        text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {text}\n\n"


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineDeadError):
        return ApiError(503, f"{e}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineStepError):
        return ApiError(500, str(e))
    logger.error("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


_FIELD = re.compile(r"SamplingParams\.(\w+)")


@dataclasses.dataclass(frozen=True)
class _Echo:
    """What ``echo`` puts in front of one prompt's completions: its text and token ids."""

    text: str
    ids: list[int]


@dataclasses.dataclass(frozen=True)
class _CompletionShape:
    """How one /v1/completions request's outputs become choices: ``n`` per prompt, ``logprobs`` (top k or
    None), ``echoes`` (per prompt, or None without echo), ``prompt_only`` (echo with max_tokens=0)."""

    n: int
    logprobs: int | None
    echoes: list[_Echo] | None
    prompt_only: bool


class _Choice:
    """One completion being assembled from DELTA outputs (text, token count, logprobs, finish)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[tuple[int, dict]] = []  # (sampled id, {id: Logprob}) per token

    def add(self, c: CompletionOutput) -> None:
        self.text.append(c.text)
        self.num_tokens += len(c.token_ids)
        if c.logprobs is not None:
            self.logprobs += list(zip(c.token_ids, c.logprobs))
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


class OpenAIServer:
    """The request handlers; one per app. ``engine`` follows ``jaxpipe.scheduler.LLMEngine``'s interface."""

    def __init__(self, engine: Any, served_model_names: Sequence[str], *, model_root: str | None = None,
                 api_key: str | None = None, max_waiting_requests: int | None = None) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.engine = engine
        self.names = list(served_model_names)
        self.model_root = model_root
        self.api_key = api_key
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = int(engine.model_config.vocab_size)
        self.max_logprobs = int(getattr(engine, "max_logprobs", p.MAX_LOGPROBS))
        if max_waiting_requests is None:
            max_waiting_requests = 4 * int(engine.max_num_seqs)
        from jaxpipe import distributed
        self.client = AsyncEngine(engine, max_waiting_requests, lockstep=distributed.is_initialized())
        self.metrics = ServerMetrics(engine, self.names[0])
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpipe-tokenize")
        self.stopping = False

    # -- life cycle ---------------------------------------------------------------------------------

    async def startup(self) -> None:
        self.client.start()

    def begin_shutdown(self) -> None:
        """Stop taking requests and fail what runs, so open streams end now (on the event loop)."""
        self.stopping = True
        self.client.close()

    async def shutdown(self) -> None:
        self.stopping = True
        await self.client.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # -- shared checks ------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str:
        if model is None or model in self.names:
            return self.names[0]
        raise ApiError(404, f"The model `{model}` does not exist. This server serves: "
                            f"{', '.join(self.names)}.", param="model", code="model_not_found")

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: pass it as the header "
                                "'Authorization: Bearer <key>' (the openai client's api_key=).",
                           code="invalid_api_key")

    def _check_common(self, req: p._SamplingFields) -> None:
        if self.stopping:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options can only be given with stream=true", param="stream_options")
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported by jaxpipe", param="logit_bias")

    async def _tokenize(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def _check_ids(self, ids: list[int], i: int, param: str) -> None:
        where = f"prompt {i}" if param == "prompt" else "the conversation"
        if not ids:
            raise ApiError(400, f"{where} is empty: it has no tokens", param=param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"{where} has token ids outside the vocabulary [0, {self.vocab_size}): "
                                f"{bad[:5]}", param=param)
        if len(ids) + 1 > self.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens, but "
                                f"{where} has {len(ids)} tokens, which leaves no room to generate. Shorten it.",
                           param=param, code="context_length_exceeded")

    def _max_tokens(self, asked: int | None, prompt_len: int, param: str, field: str,
                    echo: bool | None = None) -> int:
        """The completion's length; ``echo``: None where echo does not exist (chat), else the request's."""
        room = self.max_model_len - prompt_len
        if asked is None:
            return room
        if asked == 0 and echo:  # the prompt scored alone (vLLM's server allows it with echo)
            return 0
        if asked < 1:
            hint = " (0 is allowed with echo=true: the prompt scored, nothing generated)" if echo is False else ""
            raise ApiError(400, f"{field} must be at least 1, got {asked}{hint}", param=field)
        if asked > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_len + asked} tokens ({prompt_len} in the {param}, "
                                f"{asked} for the completion). Please reduce the length of the {param} or "
                                f"{field}.", param=field, code="context_length_exceeded")
        return asked

    def _check_logprobs(self, k: int | None, param: str) -> None:
        if k is not None and not 0 <= k <= self.max_logprobs:
            raise ApiError(400, f"{param} must be in [0, {self.max_logprobs}], got {k}" +
                           (" (-1, the whole vocabulary, is not supported)" if k == -1 else ""), param=param)

    def _sampling_params(self, req: p._SamplingFields, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        self._check_logprobs(logprobs, "top_logprobs" if isinstance(req, p.ChatCompletionRequest) else "logprobs")

        def opt(value, default):
            return default if value is None else value

        kwargs = dict(
            n=req.n, temperature=opt(req.temperature, 1.0), top_p=opt(req.top_p, 1.0), top_k=opt(req.top_k, 0),
            min_p=opt(req.min_p, 0.0), seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            repetition_penalty=opt(req.repetition_penalty, 1.0),
            presence_penalty=opt(req.presence_penalty, 0.0), frequency_penalty=opt(req.frequency_penalty, 0.0),
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA)
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            m = _FIELD.search(str(e))
            raise ApiError(400, _FIELD.sub(lambda m: m.group(1), str(e)), param=m.group(1) if m else None) from None

    def _submit(self, request_id: str, prompts: list[dict[str, Any]], params: list[SamplingParams]) -> asyncio.Queue:
        """Submit every prompt (tag = its index) to one queue, all or nothing."""
        seqs = sum(sp.n for sp in params)
        slots, waiting = int(self.engine.max_num_seqs), self.client.max_waiting_requests
        if seqs > slots + waiting:  # would never fit, even on an idle server: retrying cannot help
            raise ApiError(400, f"this request needs {seqs} sequences ({len(params)} prompts x n={params[0].n}), "
                                f"more than the server holds at once ({slots} slots (--max-num-seqs) + {waiting} "
                                f"waiting (--max-waiting-requests)); send fewer prompts per request (lm-eval: "
                                f"a smaller --batch_size) or raise --max-waiting-requests", param="prompt")
        if not self.client.has_room(seqs):
            self.metrics.rejected()
            raise ApiError(503, f"the server is at capacity: {self.client.num_waiting_sequences} sequences are "
                                f"already waiting for a slot (--max-waiting-requests "
                                f"{self.client.max_waiting_requests}); retry later",
                           code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        queue: asyncio.Queue = asyncio.Queue()
        added: list[str] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                rid = f"{request_id}-{i}"
                self.client.add(rid, prompt, sp, queue, tag=i)
                added.append(rid)
        except ValueError as e:
            self.client.abort(added)
            m = _FIELD.search(str(e))
            raise ApiError(400, _FIELD.sub(lambda m: m.group(1), str(e)), param=m.group(1) if m else "prompt") from None
        except BaseException:
            self.client.abort(added)
            raise
        return queue

    async def _outputs(self, queue: asyncio.Queue, count: int,
                       timers: list[RequestTimer]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(tag, output)`` until all ``count`` requests are finished; raises what a request failed with."""
        done = 0
        while done < count:
            tag, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            now = time.perf_counter()
            timers[tag].tokens(now, max((len(c.token_ids) for c in item.outputs), default=0))
            if item.finished:
                done += 1
                timers[tag].finished(now, [c.finish_reason for c in item.outputs])
            yield tag, item

    # -- /v1/completions ----------------------------------------------------------------------------

    def _prompt_logprobs(self, req: p.CompletionRequest) -> int | None:
        """The top-k prompt logprobs to ask the engine for: vLLM's ``prompt_logprobs`` field, and with
        ``echo`` and ``logprobs=k`` the top k of every prompt token (the larger of the two)."""
        k = req.prompt_logprobs
        if k is not None:
            if req.stream:
                raise ApiError(400, "prompt_logprobs are not available with stream=true (as vLLM's server); "
                                    "stream echo=true with logprobs instead, or do not stream",
                               param="prompt_logprobs")
            self._check_logprobs(k, "prompt_logprobs")
        if req.echo and req.logprobs is not None:
            self._check_logprobs(req.logprobs, "logprobs")
            k = req.logprobs if k is None else max(k, req.logprobs)
        return k

    async def completions(self, req: p.CompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        model = self.check_model(req.model)
        self._check_common(req)
        for field, bad, why in (
                ("suffix", req.suffix is not None, "suffix (fill-in-the-middle) is not supported"),
                ("best_of", req.best_of not in (None, req.n), "best_of other than n is not supported")):
            if bad:
                raise ApiError(400, why, param=field)
        prompt_logprobs = self._prompt_logprobs(req)
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        texts = [x for x in items if isinstance(x, str)]
        # echo of a token-id prompt: its text, decoded as vLLM's server does (special tokens kept)
        to_decode = [x for x in items if not isinstance(x, str)] if req.echo else []

        def tokenize() -> tuple[list[list[int]], list[str]]:
            return ([self.tokenizer(t)["input_ids"] for t in texts],
                    [self.tokenizer.decode([int(t) for t in x]) for x in to_decode])

        encoded, decoded = await self._tokenize(tokenize) if texts or to_decode else ([], [])
        encoded, decoded = iter(encoded), iter(decoded)
        prompts, params, echoes = [], [], []
        for i, x in enumerate(items):
            ids = [int(t) for t in (next(encoded) if isinstance(x, str) else x)]
            self._check_ids(ids, i, "prompt")
            max_tokens = self._max_tokens(req.max_tokens, len(ids), "prompt", "max_tokens", echo=req.echo)
            # max_tokens=0 (echo only): the engine generates one token, which the response leaves out
            params.append(self._sampling_params(req, max(max_tokens, 1), req.logprobs, prompt_logprobs))
            prompts.append({"prompt_token_ids": ids, **({"prompt": x} if isinstance(x, str) else {})})
            if req.echo:
                echoes.append(_Echo(x if isinstance(x, str) else next(decoded), ids))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        queue = self._submit(request_id, prompts, params)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        timers = [self.metrics.timer(arrival) for _ in prompts]
        n = req.n
        usage = p.UsageInfo(prompt_tokens=sum(len(x["prompt_token_ids"]) for x in prompts))
        shape = _CompletionShape(n=n, logprobs=req.logprobs, echoes=echoes if req.echo else None,
                                 prompt_only=req.max_tokens == 0)
        if req.stream:
            return self._stream(self._completion_chunks(queue, ids, timers, request_id, model, shape, usage,
                                                        req.stream_options))
        try:
            choices = {i: _Choice(i) for i in range(len(prompts) * n)}
            scored: dict[int, list] = {}  # prompt index -> its prompt_logprobs (in its first output)
            async for tag, out in self._outputs(queue, len(prompts), timers):
                if out.prompt_logprobs is not None:
                    scored.setdefault(tag, out.prompt_logprobs)
                for c in out.outputs:
                    choices[tag * n + c.index].add(c)
        finally:
            self.client.abort(ids)  # a no-op unless the client left or something failed
        if prompt_logprobs is not None and len(scored) < len(prompts):
            raise ApiError(500, "the engine returned no prompt_logprobs for a request that asked for them")
        body_choices = []
        for c in choices.values():
            tag = c.index // n
            text, entries = "".join(c.text), c.logprobs
            finish, stop = c.finish_reason, c.stop_reason
            if shape.prompt_only:
                text, entries, finish, stop = "", [], "length", None
            if shape.echoes is not None:
                echo = shape.echoes[tag]
                text = echo.text + text
                if req.logprobs is not None:
                    entries = list(zip(echo.ids, scored[tag])) + entries
            body_choices.append(p.CompletionChoice(
                index=c.index, text=text, finish_reason=finish, stop_reason=stop,
                logprobs=self._completion_logprobs(entries, req.logprobs) if req.logprobs is not None else None,
                prompt_logprobs=(self._prompt_logprobs_body(prompts[tag]["prompt_token_ids"], scored[tag],
                                                            req.prompt_logprobs)
                                 if req.prompt_logprobs is not None else None)))
        usage.completion_tokens = 0 if shape.prompt_only else sum(c.num_tokens for c in choices.values())
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        body = p.CompletionResponse(id=request_id, model=model, usage=usage, choices=body_choices)
        return JSONResponse(body.model_dump())

    def _completion_logprobs(self, entries: list[tuple[int, dict | None]], k: int,
                             offset: int = 0) -> p.CompletionLogProbs:
        """OpenAI's parallel lists from ``(token id, {id: Logprob} or None)`` per token: the token's text
        and logprob and the top ``k`` (plus the token itself), by decoded text; None (the first prompt
        token) gives a ``null`` logprob and ``null`` top_logprobs, as vLLM's server."""
        out = p.CompletionLogProbs()
        for tid, d in entries:
            if d is None:
                token = self.tokenizer.decode([tid])
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                lp = d[tid]
                token = lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([tid])
                out.token_logprobs.append(_finite(lp.logprob))
                top: dict[str, float] = {}
                for t, v in sorted(d.items(), key=lambda item: item[1].rank or 0):
                    if t == tid or (v.rank is not None and v.rank <= k):
                        top.setdefault(v.decoded_token or "", _finite(v.logprob))
                out.top_logprobs.append(top)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
        return out

    @staticmethod
    def _prompt_logprobs_body(ids: list[int], scored: list, k: int) -> list[dict[int, p.Logprob] | None]:
        """vLLM's ``prompt_logprobs``: per prompt token the token itself and the top ``k``, by token id."""
        return [None if d is None else
                {t: p.Logprob(logprob=_finite(v.logprob), rank=v.rank, decoded_token=v.decoded_token)
                 for t, v in d.items() if t == tid or (v.rank is not None and v.rank <= k)}
                for tid, d in zip(ids, scored)]

    async def _completion_chunks(self, queue, ids, timers, request_id, model, shape: _CompletionShape, usage,
                                 options):
        include_usage = options is not None and options.include_usage
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        scored: dict[int, list] = {}
        n = shape.n
        # no prompt_logprobs field in chunks (it is refused with stream, as vLLM's server)
        exclude: dict[str, Any] = {"choices": {"__all__": {"prompt_logprobs"}}}
        if not include_usage:
            exclude["usage"] = True

        def chunk(choices: list[p.CompletionChoice], final_usage: p.UsageInfo | None = None) -> str:
            body = p.CompletionResponse(id=request_id, model=model, choices=choices, usage=final_usage)
            return _sse(body, exclude=exclude)

        try:
            async for tag, out in self._outputs(queue, len(ids), timers):
                if out.prompt_logprobs is not None:
                    scored.setdefault(tag, out.prompt_logprobs)
                for c in out.outputs:
                    index = tag * n + c.index
                    text, entries = c.text, list(zip(c.token_ids, c.logprobs or []))
                    finish, stop = c.finish_reason, c.stop_reason
                    if shape.prompt_only:
                        text, entries = "", []
                        finish, stop = ("length" if finish is not None else None), None
                    else:
                        usage.completion_tokens += len(c.token_ids)
                    if shape.echoes is not None and index not in echoed:  # the prompt, in the first chunk
                        echoed.add(index)
                        echo = shape.echoes[tag]
                        text = echo.text + text
                        if shape.logprobs is not None:
                            if tag not in scored:
                                raise ApiError(500, "the engine returned no prompt_logprobs for a request that "
                                                    "asked for them")
                            entries = list(zip(echo.ids, scored[tag])) + entries
                    elif not text and finish is None and (shape.prompt_only or not c.token_ids):
                        continue
                    logprobs = None
                    if shape.logprobs is not None:
                        logprobs = self._completion_logprobs(entries, shape.logprobs, offsets.get(index, 0))
                        offsets[index] = offsets.get(index, 0) + sum(map(len, logprobs.tokens))
                    yield chunk([p.CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                    finish_reason=finish, stop_reason=stop)])
            if include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield chunk([], usage)
        except Exception as e:  # noqa: BLE001 (the response has started: report in the stream)
            yield _sse(_engine_error(e).body())
        finally:
            self.client.abort(ids)
        yield _sse("[DONE]")

    # -- /v1/chat/completions -----------------------------------------------------------------------

    def _conversation(self, req: p.ChatCompletionRequest) -> list[dict[str, Any]]:
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        conv = []
        for i, m in enumerate(req.messages):
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                parts = []
                for part in m.content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", "
                                            f"\"text\": ...}}) are supported, got type {part.get('type')!r}",
                                       param="messages")
                    parts.append(part["text"])
                d["content"] = "\n".join(parts)
            conv.append(d)
        return conv

    def _render_chat(self, conv, add_generation_prompt: bool, kwargs: dict[str, Any]) -> tuple[str, list[int]]:
        text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def chat(self, req: p.ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        model = self.check_model(req.model)
        self._check_common(req)
        if req.tools:
            raise ApiError(400, "tools (function calling) are not supported by jaxpipe", param="tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice is not supported by jaxpipe (no tools)", param="tool_choice")
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported",
                           param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions",
                           param="messages")
        conv = self._conversation(req)
        try:
            text, ids = await self._tokenize(self._render_chat, conv, req.add_generation_prompt,
                                             req.chat_template_kwargs or {})
        except Exception as e:  # noqa: BLE001 (a template may raise on a conversation it refuses)
            raise ApiError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}",
                           param="messages") from None
        ids = [int(t) for t in ids]
        self._check_ids(ids, 0, "messages")
        asked, field = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
        max_tokens = self._max_tokens(asked, len(ids), "messages", field)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._sampling_params(req, max_tokens, top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        queue = self._submit(request_id, [{"prompt": text, "prompt_token_ids": ids}], [params])
        rids = [f"{request_id}-0"]
        timers = [self.metrics.timer(arrival)]
        usage = p.UsageInfo(prompt_tokens=len(ids))
        if req.stream:
            return self._stream(self._chat_chunks(queue, rids, timers, request_id, model, req.n, top, usage,
                                                  req.stream_options))
        try:
            choices = {i: _Choice(i) for i in range(req.n)}
            async for _, out in self._outputs(queue, 1, timers):
                for c in out.outputs:
                    choices[c.index].add(c)
        finally:
            self.client.abort(rids)
        usage.completion_tokens = sum(c.num_tokens for c in choices.values())
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        body = p.ChatCompletionResponse(
            id=request_id, model=model, usage=usage,
            choices=[p.ChatChoice(index=c.index, message=p.ChatResponseMessage(content="".join(c.text)),
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                  logprobs=self._chat_logprobs(c.logprobs, top) if top is not None else None)
                     for c in choices.values()])
        return JSONResponse(body.model_dump())

    @staticmethod
    def _chat_logprobs(entries: list[tuple[int, dict]], k: int) -> p.ChatLogprobs:
        def item(lp, cls=p.TopLogprob, **extra):
            token = lp.decoded_token or ""
            return cls(token=token, logprob=lp.logprob, bytes=list(token.encode("utf-8")), **extra)

        content = []
        for tid, d in entries:
            top = sorted((v for v in d.values() if v.rank is not None and v.rank <= k), key=lambda v: v.rank)
            content.append(item(d[tid], p.ChatLogprobToken, top_logprobs=[item(v) for v in top]))
        return p.ChatLogprobs(content=content)

    async def _chat_chunks(self, queue, rids, timers, request_id, model, n, top, usage, options):
        include_usage = options is not None and options.include_usage

        def chunk(choices: list[p.ChatStreamChoice], final_usage: p.UsageInfo | None = None) -> str:
            body = p.ChatCompletionChunk(id=request_id, model=model, choices=choices, usage=final_usage)
            return _sse(body, exclude=None if include_usage else {"usage"})

        try:
            for i in range(n):  # OpenAI's first chunk of each choice names the role
                yield chunk([p.ChatStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))])
            async for _, out in self._outputs(queue, 1, timers):
                for c in out.outputs:
                    usage.completion_tokens += len(c.token_ids)
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    logprobs = None
                    if top is not None and c.logprobs is not None:
                        logprobs = self._chat_logprobs(list(zip(c.token_ids, c.logprobs)), top)
                    yield chunk([p.ChatStreamChoice(index=c.index, delta=p.DeltaMessage(content=c.text),
                                                    logprobs=logprobs, finish_reason=c.finish_reason,
                                                    stop_reason=c.stop_reason)])
            if include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield chunk([], usage)
        except Exception as e:  # noqa: BLE001
            yield _sse(_engine_error(e).body())
        finally:
            self.client.abort(rids)
        yield _sse("[DONE]")

    @staticmethod
    def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- /v1/models, /health, /metrics --------------------------------------------------------------

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=name, root=self.model_root, max_model_len=self.max_model_len)
                                 for name in self.names])

    def health(self) -> Response:
        if self.stopping:
            return ApiError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        if self.client.dead is not None:
            return ApiError(503, f"the engine stopped: {self.client.dead}").response()
        return Response(status_code=200)


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro) -> Response:
    """Run a handler, cancelling it when the client disconnects first (its requests are then aborted)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)  # nobody is there to read it
    try:
        return task.result()
    except Exception as e:  # noqa: BLE001 (one request's failure is its own 4xx/5xx response)
        return _engine_error(e).response()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return (f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                None)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", param
    if first.get("type") == "missing":
        return f"Missing required parameter: {'.'.join(loc)}", param
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}", param


def build_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app over ``server``; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = FastAPI(title="jaxpipe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _engine_error(exc).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            try:
                server.check_key(request)
            except ApiError as e:
                return e.response()
        return await call_next(request)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, raw: Request):
        return await _unless_disconnected(raw, server.completions(req, raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, raw: Request):
        return await _unless_disconnected(raw, server.chat(req, raw))

    @app.get("/v1/models")
    async def models():
        return JSONResponse(server.models().model_dump())

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket early (before the model loads), so a taken port fails in a second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick "
                               "another --port)") from None
    sock.set_inheritable(True)
    return sock


def run_server(server: OpenAIServer, sock: socket.socket, *, log_level: str = "info", access_log: bool = True,
               graceful_timeout_s: float = 5.0) -> None:
    """Serve HTTP on ``sock`` until SIGINT/SIGTERM: then stop accepting, fail what runs (streams end
    with an error event, waiting requests get 503), stop the engine thread and return (uvicorn then
    re-raises the signal: KeyboardInterrupt for SIGINT)."""
    import uvicorn

    signals: list[int] = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            signals.append(sig)
            loop = getattr(self, "_jaxpipe_loop", None)
            if loop is not None and not self.should_exit:
                loop.call_soon_threadsafe(server.begin_shutdown)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            self._jaxpipe_loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if not self.should_exit:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                logger.info("jaxpipe serve: ready at http://%s:%d/v1 (model %s)", shown, port, server.names[0])

    config = uvicorn.Config(build_app(server), log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_timeout_s, lifespan="on")
    _Server(config).run(sockets=[sock])
    # uvicorn re-raises the signal that stopped it once it is done; when a signal lands while asyncio's own
    # SIGINT handler is in place, that can be lost and run() returns. Then do it here: the exit status
    # says a signal ended the server (130 for SIGINT, killed by SIGTERM).
    if signals:
        if signals[0] == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signals[0], signal.SIG_DFL)
        signal.raise_signal(signals[0])
