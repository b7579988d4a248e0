"""vLLM's result objects: ``RequestOutput`` holds one prompt's ``CompletionOutput``s (``n`` of them)."""

from __future__ import annotations

import dataclasses
from typing import Literal

_SHOW = 16  # longer token-id lists are shown as head ... tail in reprs


@dataclasses.dataclass
class Logprob:
    """One token's log probability (vLLM's ``Logprob``). rank: 1 = the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated position: {token_id: Logprob} with the sampled token and the top-``logprobs`` tokens.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt position; the first is None (nothing precedes it).
PromptLogprobs = list[dict[int, Logprob] | None]


def _ids(ids) -> str:
    ids = list(ids) if ids is not None else None
    if ids is None or len(ids) <= _SHOW:
        return repr(ids)
    head = ", ".join(map(str, ids[:_SHOW // 2]))
    tail = ", ".join(map(str, ids[-4:]))
    return f"[{head}, ..., {tail}] ({len(ids)} ids)"


def _positions(logprobs) -> str:
    return "None" if logprobs is None else f"<{len(logprobs)} positions>"


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence.

    token_ids include the EOS or stop token that ended it; text does not (unless
    include_stop_str_in_output). finish_reason: "stop" (EOS, stop token or stop string), "length"
    (max_tokens) or None while unfinished. stop_reason: None for EOS or length, the stop token id, or the
    matched stop string. cumulative_logprob and logprobs are None unless logprobs were requested.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={_ids(self.token_ids)}, "
                f"cumulative_logprob={self.cumulative_logprob}, logprobs={_positions(self.logprobs)}, "
                f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason!r})")


@dataclasses.dataclass
class RequestOutput:
    """The result of one prompt: its completions (``outputs``, ``n`` of them, by index)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids={_ids(self.prompt_token_ids)}, "
                f"prompt_logprobs={_positions(self.prompt_logprobs)}, outputs={self.outputs!r}, "
                f"finished={self.finished})")
