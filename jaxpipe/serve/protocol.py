"""OpenAI's request and response bodies (with vLLM's extra sampling fields) as pydantic models.

Requests refuse fields they do not know (``extra="forbid"``), as OpenAI does: a misspelt ``max_token``
is a 400 naming it rather than silently ignored. Fields that OpenAI defines but jaxpipe cannot honour
are declared, so that the server can refuse them by name with a reason (``suffix``, ...).

Prompt scoring: ``CompletionRequest.echo`` with ``logprobs`` gives the prompt tokens' logprobs in
``CompletionLogProbs`` (``None`` for the first prompt token, which nothing precedes), and vLLM's
``prompt_logprobs`` field gives ``CompletionChoice.prompt_logprobs``, one ``{token_id: Logprob}`` per
prompt token.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# vLLM's default --max-logprobs: the most top logprobs a request may ask for.
MAX_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields /v1/completions and /v1/chat/completions share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's logs; not used
    logit_bias: dict[str, float] | None = None  # refused unless empty
    # vLLM's extra sampling parameters (the openai client sends them through extra_body=)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, a list of strings, token ids or lists of token ids."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = 16  # OpenAI's default; None = until the context is full; 0 only with echo
    logprobs: int | None = None  # top logprobs per token (0 = the token's own only); with echo, prompt too
    echo: bool = False  # the prompt (and with logprobs, its tokens' logprobs) in front of the completion
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the top k, per choice
    suffix: str | None = None  # refused: no fill-in-the-middle
    best_of: int | None = None  # only None or n


class ChatMessage(BaseModel):
    """One message; extra keys (``tool_calls``, ``tool_call_id``, ...) go to the chat template as given."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # None (and max_tokens None): until the context is full
    max_tokens: int | None = None  # OpenAI's older name for max_completion_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    tools: list[dict[str, Any]] | None = None  # refused unless empty
    tool_choice: str | dict[str, Any] | None = None  # only "none" / "auto" without tools
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


# -- responses ------------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token of ``text``."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: a first prompt token (echo)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class Logprob(BaseModel):
    """vLLM's ``Logprob`` in ``prompt_logprobs``: rank 1 is the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended it
    # vLLM's: per prompt token (None for the first) the token and the top `prompt_logprobs`, by token id
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "jaxpipe"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo
