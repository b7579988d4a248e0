"""`jaxpipe serve` on a fake engine (test_serve_fakes.FakeEngine): routes, protocol, streaming, errors,
disconnects, metrics and shutdown, through the official `openai` client and raw HTTP.

The server runs in a thread of this process (uvicorn on a free loopback port) except for the signal
tests, which start it as a subprocess. The same server on the real engine: test_serve_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_serve_fakes import POISON, FakeEngine, RequestOutputKind

httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e '.[test]')")
openai = pytest.importorskip("openai", reason="openai is a test dependency (pip install -e '.[test]')")

import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jaxpipe.sampling import SamplingParams  # noqa: E402  (after the fake's RequestOutputKind)
from jaxpipe.serve.app import OpenAIServer, bind_socket, build_app  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def serving(engine, names=("fake", "alias"), **kwargs):
    server = OpenAIServer(engine, list(names), **kwargs)
    sock = bind_socket("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield SimpleNamespace(url=url, server=server, engine=engine,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30))
    finally:
        uv.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def srv(tok):
    with serving(FakeEngine(tok, max_num_seqs=8, step_s=0.002)) as s:
        yield s


def expected(srv, prompt_ids, **kw):
    return srv.engine.expected(prompt_ids, SamplingParams(**kw))


def metric(url, name, labels=None):
    text = httpx.get(url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    raise KeyError(name)


def error_of(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- completions --------------------------------------------------------------------------------------


def test_completion_matches_the_engine(srv, tok):
    r = srv.client.completions.create(model="fake", prompt="The capital of France is", max_tokens=12,
                                      temperature=0)
    ids = tok("The capital of France is")["input_ids"]
    assert r.choices[0].text == expected(srv, ids, temperature=0, max_tokens=12)[0]
    assert r.choices[0].finish_reason == "length" and r.model == "fake" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    # token ids as the prompt, the alias name, and max_tokens defaulting to 16 as OpenAI's
    r2 = srv.client.completions.create(model="alias", prompt=ids, temperature=0)
    assert r2.choices[0].text == expected(srv, ids, temperature=0, max_tokens=16)[0]
    assert r2.model == "fake" and r2.usage.completion_tokens == 16


def test_streamed_deltas_join_to_the_text(srv):
    kw = dict(model="fake", prompt="Hello there", max_tokens=20, temperature=0)
    whole = srv.client.completions.create(**kw).choices[0].text
    chunks = list(srv.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices]) > 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(srv.client.completions.create(stream=True, **kw))  # no include_usage: no usage at all
    assert all(c.usage is None for c in plain) and "".join(c.choices[0].text for c in plain) == whole


def test_raw_sse_format(srv):
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                      json={"prompt": "Hi", "max_tokens": 3, "stream": True, "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_n_and_several_prompts(srv, tok):
    prompts = ["One prompt", "Another, longer prompt"]
    r = srv.client.completions.create(model="fake", prompt=prompts, n=2, max_tokens=8, temperature=0.7, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        want = expected(srv, tok(p)["input_ids"], n=2, temperature=0.7, seed=3, max_tokens=8)
        assert [r.choices[2 * i + j].text for j in range(2)] == want
    assert want[0] != want[1]
    assert r.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)
    assert r.usage.completion_tokens == 4 * 8
    streamed = {}
    for c in srv.client.completions.create(model="fake", prompt=prompts, n=2, max_tokens=8, temperature=0.7,
                                           seed=3, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {c.index: c.text for c in r.choices}


def test_logprobs(srv):
    r = srv.client.completions.create(model="fake", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 and top[tok] == val for top, tok, val in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    streamed = [c.choices[0].logprobs for c in srv.client.completions.create(
        model="fake", prompt="Hello", max_tokens=5, temperature=0, logprobs=2, stream=True) if c.choices]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    c = srv.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert bytes(content[0].bytes).decode() == content[0].token
    assert srv.client.completions.create(model="fake", prompt="Hi", max_tokens=2).choices[0].logprobs is None


# -- prompt scoring (echo, prompt_logprobs) -------------------------------------------------------------


def _top(entry: dict, tok: int, k: int) -> dict[str, float]:
    """OpenAI's top_logprobs of one scored position: the token and the top k, by decoded text."""
    return {v.decoded_token: v.logprob for t, v in entry.items() if t == tok or v.rank <= k}


def test_echo_with_logprobs_puts_the_prompt_first(srv, tok):
    prompts = ["The capital of France is", "Hello"]
    ids = [tok(x)["input_ids"] for x in prompts]
    kw = dict(model="fake", max_tokens=3, temperature=0, logprobs=1)
    plain = srv.client.completions.create(prompt=prompts, **kw)
    for prompt, text in ((prompts, prompts), (ids, [tok.decode(x) for x in ids])):  # strings, token-id lists
        r = srv.client.completions.create(prompt=prompt, echo=True, **kw)
        assert r.usage == plain.usage
        for i, (c, pc) in enumerate(zip(r.choices, plain.choices)):
            n = len(ids[i])
            lp, want = c.logprobs, srv.engine.prompt_logprobs_of(ids[i], 1)
            assert c.text == text[i] + pc.text and c.finish_reason == pc.finish_reason
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 3
            assert lp.tokens[:n] == [tok.decode([t]) for t in ids[i]]
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert lp.token_logprobs[1:n] == [want[j][ids[i][j]].logprob for j in range(1, n)]
            assert lp.top_logprobs[1:n] == [_top(want[j], ids[i][j], 1) for j in range(1, n)]
            assert n == 1 or any(len(top) == 2 for top in lp.top_logprobs[1:n])  # a token beside a likelier one
            assert (lp.tokens[n:], lp.token_logprobs[n:], lp.top_logprobs[n:]) == \
                (pc.logprobs.tokens, pc.logprobs.token_logprobs, pc.logprobs.top_logprobs)
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(n + 3)]
            assert c.model_extra["prompt_logprobs"] is None  # not asked for
    no_lp = srv.client.completions.create(model="fake", prompt=prompts[0], max_tokens=3, temperature=0, echo=True)
    assert no_lp.choices[0].text == prompts[0] + plain.choices[0].text and no_lp.choices[0].logprobs is None


def test_lm_eval_request_shapes(srv, tok):
    """lm-eval's loglikelihood request (echo, logprobs 1, max_tokens 1) and OpenAI's scoring one (max_tokens 0)."""
    prompt = "Tell me about the dog"
    ids = tok(prompt)["input_ids"]
    n = len(ids)
    one = srv.client.completions.create(model="fake", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                        temperature=0)
    assert len(one.choices[0].logprobs.token_logprobs) == n + 1 and one.usage.completion_tokens == 1
    zero = srv.client.completions.create(model="fake", prompt=prompt, echo=True, logprobs=1, max_tokens=0,
                                         temperature=0)
    c = zero.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and zero.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:n]
    assert c.logprobs.top_logprobs == one.choices[0].logprobs.top_logprobs[:n]
    streamed = [ch.choices[0] for ch in srv.client.completions.create(
        model="fake", prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0, stream=True) if ch.choices]
    assert "".join(s.text for s in streamed) == prompt
    assert sum((s.logprobs.token_logprobs for s in streamed), []) == c.logprobs.token_logprobs


def test_prompt_logprobs_field(srv, tok):
    prompt = "Paris is nice, very nice indeed"
    ids = tok(prompt)["input_ids"]
    r = srv.client.completions.create(model="fake", prompt=prompt, max_tokens=2, temperature=0, n=1,
                                      extra_body={"prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    want = srv.engine.prompt_logprobs_of(ids, 2)
    assert len(got) == len(ids) and got[0] is None
    for j in range(1, len(ids)):
        assert got[j] == {str(t): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                          for t, v in want[j].items()}
    assert r.choices[0].text == expected(srv, ids, temperature=0, max_tokens=2)[0]
    assert r.choices[0].logprobs is None  # without echo and logprobs, no OpenAI logprobs
    # both: echo's top_logprobs keep to logprobs=1, the field to prompt_logprobs=3
    both = srv.client.completions.create(model="fake", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                         logprobs=1, extra_body={"prompt_logprobs": 3}).choices[0]
    assert both.logprobs.top_logprobs[1:len(ids)] == [_top(want[j], ids[j], 1) for j in range(1, len(ids))]
    assert max(len(d) for d in both.model_extra["prompt_logprobs"][1:]) == 4


def test_streamed_echo_joins_to_the_response(srv):
    kw = dict(model="fake", prompt=["One prompt", "Another, longer prompt"], n=2, max_tokens=6, temperature=0.7,
              seed=3, echo=True, logprobs=2)
    whole = srv.client.completions.create(**kw)
    text, lps = {}, {}
    for ch in srv.client.completions.create(stream=True, **kw):
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
            lp = lps.setdefault(c.index, {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
            for key in lp:
                lp[key] += getattr(c.logprobs, key)
    assert text == {c.index: c.text for c in whole.choices}
    assert lps == {c.index: c.logprobs.model_dump() for c in whole.choices}

def test_stop_strings(srv, tok):
    prompt = "Tell me about the dog"
    ids = tok(prompt)["input_ids"]
    full = expected(srv, ids, temperature=0, max_tokens=40)[0]
    stop = full[10:14]  # a string the completion contains, across token boundaries
    r = srv.client.completions.create(model="fake", prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in srv.client.completions.create(
        model="fake", prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    extra = srv.client.completions.create(model="fake", prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                          extra_body={"include_stop_str_in_output": True})
    assert extra.choices[0].text == full[:full.index(stop) + len(stop)]


def test_vllm_sampling_fields_reach_the_engine(srv, tok):
    ids = tok("Hello")["input_ids"]
    r = srv.client.completions.create(model="fake", prompt=ids, max_tokens=6, temperature=0,
                                      extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                                  "ignore_eos": True, "min_tokens": 2, "stop_token_ids": [7]})
    assert r.choices[0].text == expected(srv, ids, temperature=0, max_tokens=6, ignore_eos=True, min_tokens=2,
                                         stop_token_ids=[7])[0]


# -- chat ---------------------------------------------------------------------------------------------


def test_chat(srv, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Paris?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = expected(srv, ids, temperature=0, max_tokens=10)[0]
    r = srv.client.chat.completions.create(model="fake", messages=messages, max_completion_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    chunks = list(srv.client.chat.completions.create(model="fake", messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == len(ids) + 10
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is Paris?"}]}]
    r2 = srv.client.chat.completions.create(model="fake", messages=parts, max_tokens=3, temperature=0)
    assert r2.usage.prompt_tokens == len(tok(tok.apply_chat_template(
        [{"role": "user", "content": "What is Paris?"}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"])
    # no max_tokens: until the context is full (the fake engine's max_model_len is 256)
    r3 = srv.client.chat.completions.create(model="fake", messages=messages, temperature=0)
    assert r3.usage.total_tokens == 256 and r3.choices[0].finish_reason == "length"


# -- models, health, metrics --------------------------------------------------------------------------


def test_models_health_metrics(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == ["fake", "alias"] and models.data[0].model_extra["max_model_len"] == 256
    assert httpx.get(srv.url + "/health").status_code == 200
    before = metric(srv.url, "jaxpipe:generation_tokens_total")
    ttft = metric(srv.url, "jaxpipe:time_to_first_token_seconds_count")
    srv.client.completions.create(model="fake", prompt="Hello", max_tokens=7, temperature=0)
    assert metric(srv.url, "jaxpipe:generation_tokens_total") == before + 7
    assert metric(srv.url, "jaxpipe:time_to_first_token_seconds_count") == ttft + 1
    assert metric(srv.url, "jaxpipe:inter_token_latency_seconds_count") >= 6
    assert metric(srv.url, "jaxpipe:request_success_total", {"finished_reason": "length"}) >= 1
    assert metric(srv.url, "jaxpipe:num_requests_running", {"model_name": "fake"}) == 0
    assert metric(srv.url, "jaxpipe:num_requests_waiting") == 0
    assert metric(srv.url, "jaxpipe:prompt_tokens_total") > 0


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "temperature": -1}, "temperature", ">= 0"),
    ({"prompt": "x", "n": 2, "temperature": 0}, "n", "greedy"),
    ({"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 9}, "min_tokens", "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "[0, 20]"),
    ({"prompt": "x", "max_tokens": 0, "echo": False}, "max_tokens", "allowed with echo=true"),
    ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs", "[0, 20]"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
    ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs", "whole vocabulary"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream=true"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "suffix"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    ({"prompt": "x", "max_token": 5}, "max_token", "Unrecognized request argument"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [[1, 2], []]}, "prompt", "empty"),
    ({"prompt": [1, 10 ** 6]}, "prompt", "vocabulary"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({}, "prompt", "Missing required parameter"),
])
def test_400_for_bad_completion_requests(srv, body, param, words):
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error", err


def test_400_for_bad_chat_requests(srv):
    for body, param in (({"messages": []}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                         "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10 ** 6},
                         "max_completion_tokens")):
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and error_of(r)["param"] == param, r.text


def test_malformed_json_and_long_prompts(srv, tok):
    r = httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "x", ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    long = [5] * 256
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": long}, timeout=30)
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "256" in err["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5] * 250, "max_tokens": 10}, timeout=30)
    assert r.status_code == 400 and "260 tokens (250 in the prompt, 10 for the completion)" in error_of(r)["message"]
    with pytest.raises(openai.BadRequestError):  # the client raises it as OpenAI's own 400
        srv.client.completions.create(model="fake", prompt="x", temperature=-1)


def test_404_unknown_model(srv):
    with pytest.raises(openai.NotFoundError) as e:
        srv.client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "nope" in error_of(r)["message"]


def test_401_wrong_api_key(tok):
    with serving(FakeEngine(tok, step_s=0), api_key="sesame") as s:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="fake", prompt="x", max_tokens=2)
        assert httpx.get(s.url + "/v1/models").status_code == 401
        right = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model="fake", prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(s.url + "/health").status_code == 200  # probes and scrapers need no key
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_503_when_the_queue_is_full(tok):
    # One slot and one waiting place: a third request is refused at once, with Retry-After.
    with serving(FakeEngine(tok, max_num_seqs=1, step_s=0.01), max_waiting_requests=1) as s:
        streams = [httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                                json={"prompt": "x", "max_tokens": 100, "stream": True}) for _ in range(2)]
        for st in streams:
            st.__enter__()
        try:
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert error_of(r)["code"] == "server_overloaded"
            assert metric(s.url, "jaxpipe:request_rejected_total") == 1
            # more prompts in one request than slots + waiting places: never servable, so a 400 (not a 503)
            r = httpx.post(s.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2}, timeout=30)
            assert r.status_code == 400 and "--max-waiting-requests" in error_of(r)["message"], r.text
        finally:
            for st in streams:
                st.__exit__(None, None, None)
        deadline = time.monotonic() + 10  # the dropped streams free their places
        while s.server.client.num_live_sequences and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.client.completions.create(model="fake", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_an_internal_error_fails_one_request(srv):
    results = {}

    def other():
        results["other"] = srv.client.completions.create(model="fake", prompt="fine", max_tokens=30, temperature=0)

    t = threading.Thread(target=other)
    t.start()
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": POISON, "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and error_of(r)["type"] == "server_error"
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                      json={"prompt": POISON, "max_tokens": 5, "stream": True}) as st:
        lines = [line for line in st.iter_lines() if line]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    t.join(30)
    assert results["other"].usage.completion_tokens == 30  # the request beside it was not disturbed
    assert httpx.get(srv.url + "/health").status_code == 200


def test_a_failing_step_fails_its_requests_not_the_server(srv):
    srv.engine.fail_next_step = True
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and "injected step failure" in error_of(r)["message"]
    assert srv.client.completions.create(model="fake", prompt="x", max_tokens=3).usage.completion_tokens == 3


# -- disconnects --------------------------------------------------------------------------------------


def _wait_idle(s, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(s.url, "jaxpipe:num_requests_running") == 0 and not s.server.client.num_live_sequences:
            return True
        time.sleep(0.02)
    return False


def test_dropped_stream_is_aborted(tok):
    with serving(FakeEngine(tok, max_num_seqs=2, step_s=0.01)) as s:
        with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                          json={"prompt": "drop me", "max_tokens": 200, "stream": True}) as st:
            lines = st.iter_lines()
            for _ in range(3):
                next(lines)
            assert metric(s.url, "jaxpipe:num_requests_running") == 1
        assert _wait_idle(s), "the dropped request still runs"
        assert len(s.engine.aborted) == 1 and s.engine.steps < 100  # aborted long before its 200 tokens
        assert s.client.completions.create(model="fake", prompt="x", max_tokens=3).usage.completion_tokens == 3


def test_dropped_non_streaming_request_is_aborted(tok):
    with serving(FakeEngine(tok, max_num_seqs=2, step_s=0.01)) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", timeout=0.3,
                       json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 200})
        assert _wait_idle(s), "the abandoned request still runs"
        assert len(s.engine.aborted) == 1


# -- signals ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_tokenizer")
    tok.save_pretrained(d)
    return str(d)


def _start_fake_server(tok_dir, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("test_serve_fakes.py")), tok_dir,
                             str(port_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port_file.read_text()}"
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not get healthy"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_signal_stops_the_server(tok_dir, tmp_path, sig, code):
    proc, url = _start_fake_server(tok_dir, tmp_path)
    try:
        got: list[str] = []
        st = httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "long", "max_tokens": 250, "stream": True})
        resp = st.__enter__()
        lines = resp.iter_lines()
        got.append(next(lines))
        t0 = time.monotonic()
        proc.send_signal(sig)
        got += [line for line in lines if line]  # the stream ends (with an error event), not hangs
        st.__exit__(None, None, None)
        assert proc.wait(10) == code
        assert time.monotonic() - t0 < 10
        assert got[-1] == "data: [DONE]" and "shutting down" in got[-2], got[-3:]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:  # KeyboardInterrupt after the engine thread stopped and shut the engine down
        assert "engine shut down: True" in proc.stdout.read()


def test_request_output_kind_is_vllms():
    assert (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY) == (0, 1, 2)


# -- the command's flags --------------------------------------------------------------------------------


def test_serve_flags_are_vllms():
    import argparse

    from jaxpipe.serve.cli import _model, add_serve_arguments

    parser = add_serve_arguments(argparse.ArgumentParser())
    a = parser.parse_args([])
    assert (a.host, a.port, a.model_tag, a.model, a.api_key, a.served_model_name, a.max_waiting_requests) == \
        ("127.0.0.1", 8000, None, None, None, None, None)
    a = parser.parse_args(["m", "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "a", "b",
                           "--pipeline-parallel-size", "2", "--tensor-parallel-size", "2", "--layer-partition", "1,1",
                           "--dtype", "bfloat16", "--max-model-len", "64", "--max-num-seqs", "8",
                           "--gpu-memory-utilization", "0.5", "--api-key", "k", "--max-waiting-requests", "3",
                           "--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert (a.model_tag, a.host, a.port, a.served_model_name, a.pipeline_parallel_size, a.tensor_parallel_size,
            a.layer_partition, a.dtype, a.max_model_len, a.max_num_seqs, a.gpu_memory_utilization, a.api_key,
            a.max_waiting_requests, a.coordinator_address, a.num_processes, a.process_id) == \
        ("m", "0.0.0.0", 9000, ["a", "b"], 2, 2, (1, 1), "bfloat16", 64, 8, 0.5, "k", 3, "h:1", 2, 1)
    with pytest.raises(ValueError, match="twice"):
        _model(parser.parse_args(["a", "--model", "b"]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        _model(parser.parse_args(["/nonexistent/model"]))
    for bad in (["--port", "70000"], ["--gpu-memory-utilization", "1.5"], ["--max-num-seqs", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_taken_port_fails_at_once():
    taken = bind_socket("127.0.0.1", 0)
    taken.listen()
    try:
        with pytest.raises(OSError, match="another --port"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
