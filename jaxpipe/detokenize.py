"""Host-side incremental detokenization and stop handling for one generated sequence (vLLM v1 semantics).

Per appended token, in vLLM's order:
1. Token stops (vLLM's scheduler ``check_stop``), skipped while fewer than ``min_tokens`` tokens exist:
   EOS (unless ignore_eos) -> finish "stop", stop_reason None; a ``stop_token_ids`` entry -> "stop",
   stop_reason = that id; otherwise reaching ``max_tokens`` -> "length". A stop token stays in
   ``token_ids`` but its text is left out of ``text`` unless include_stop_str_in_output (a special token
   such as EOS still decodes to "" when skip_special_tokens).
2. The token is decoded against a sliding window (prefix/read offsets, like vLLM and HF's streamers) so
   that characters split over several byte tokens appear only once complete: a window that still ends
   in U+FFFD emits nothing yet. If the sequence ends mid-character those bytes are dropped, as in vLLM.
   Decoding never applies ``clean_up_tokenization_spaces`` (vLLM's incremental decoders don't either).
3. Stop strings are searched in the text the new token added (plus the overlap a string can have with
   earlier text, so strings spanning tokens are found), only once more than ``min_tokens`` tokens exist.
   The first string of ``params.stop`` that matches wins; the text is cut before it (or after it with
   include_stop_str_in_output); finish "stop", stop_reason = the string. token_ids keep the token that
   completed the match.
"""

from __future__ import annotations

from collections.abc import Iterable

from jaxpipe.sampling import SamplingParams

# vLLM decodes the first output tokens after the last 5 prompt tokens, so that tokenizers which decide
# on a leading space from the previous token (SentencePiece) render the first token as in the full text.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Text and finish state of one sequence, fed one token at a time with ``append``.

    eos_token_ids: an int, a sequence of ints (the first is the primary EOS, as the tokenizer's
    eos_token_id; the others act like stop_token_ids, as vLLM does with generation_config's extra EOS ids),
    or None. ignore_eos ignores all of them.
    """

    def __init__(self, tokenizer, prompt_token_ids: Iterable[int], params: SamplingParams,
                 eos_token_ids: int | Iterable[int] | None = None, max_tokens: int | None = None):
        """``max_tokens``: the length at which the sequence finishes with "length" (default
        ``params.max_tokens``; the engine passes it capped by what max_model_len leaves)."""
        self.tokenizer = tokenizer
        self.params = params
        self.max_tokens = params.max_tokens if max_tokens is None else max_tokens
        eos = [] if eos_token_ids is None else [eos_token_ids] if isinstance(eos_token_ids, int) \
            else [int(t) for t in eos_token_ids]
        if params.ignore_eos:
            eos = []
        self._eos = eos[0] if eos else None
        self._stop_ids = frozenset(params.stop_token_ids) | frozenset(eos[1:])
        # Streaming holds back the chars a stop string could still claim (vLLM's output_text_buffer_length).
        self._hold = max(map(len, params.stop)) - 1 if params.stop and not params.include_stop_str_in_output \
            else 0
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._window = list(prompt_token_ids)[-_PROMPT_CONTEXT:]  # ids from the prefix offset on
        self._read = len(self._window)  # window[:read] has been emitted already; window[read:] is pending
        self._streamed = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> bool:
        """Add one generated token; returns True when the sequence has finished."""
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finish_reason}); cannot append {token_id}")
        p = self.params
        token_id = int(token_id)
        self.token_ids.append(token_id)
        n = len(self.token_ids)
        if n >= p.min_tokens:
            if token_id == self._eos:
                self.finish_reason = "stop"
            elif token_id in self._stop_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
            elif self.max_tokens is not None and n >= self.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason == "stop" and not p.include_stop_str_in_output:
            return True  # the stop token's own text is not shown
        if not p.detokenize:
            return self.finished
        start = len(self.text)
        self.text += self._decode_next(token_id)
        if p.stop and n > p.min_tokens and len(self.text) > start:
            self._check_stop_strings(new_chars=len(self.text) - start)
        return self.finished

    @property
    def held_back(self) -> int:
        """Chars at the end of ``text`` a stop string may still cut (0 once finished)."""
        return 0 if self.finished else min(self._hold, len(self.text))

    def stream_delta(self) -> str:
        """Text finalized since the last call. Until the sequence finishes, the last
        ``max(len(stop)) - 1`` chars are held back, since a stop string may still cut them."""
        end = len(self.text) - (0 if self.finished else self._hold)
        if end <= self._streamed:
            return ""
        delta, self._streamed = self.text[self._streamed:end], end
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_next(self, token_id: int) -> str:
        # Decode the window with and without its pending tail; the difference is the new text. The
        # prefix tokens before the read offset give the tokenizer the context for spaces.
        self._window.append(token_id)
        prefix_text = self._decode(self._window[:self._read])
        full_text = self._decode(self._window)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # an unfinished UTF-8 sequence, or a token that renders as nothing: wait
        # Slide: the emitted tail becomes the next prefix, so the window stays a few tokens long.
        del self._window[:self._read]
        self._read = len(self._window)
        return full_text[len(prefix_text):]

    def _check_stop_strings(self, new_chars: int) -> None:
        for stop in self.params.stop:
            # Only matches that end in the new text are new: start up to len(stop) - 1 chars before it.
            at = self.text.find(stop, max(0, len(self.text) - new_chars - len(stop) + 1))
            if at < 0:
                continue
            self.text = self.text[:at + len(stop) if self.params.include_stop_str_in_output else at]
            self.finish_reason, self.stop_reason = "stop", stop
            return
