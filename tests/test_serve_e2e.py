"""`jaxpipe serve` end to end on the real continuous-batching engine (CPU, a tiny random Llama with SmolLM2's
tokenizer and chat template): the server runs as a subprocess (`python -m jaxpipe.serve`) on a free
loopback port, driven by the official `openai` client, and every text is checked against offline
`LLM.generate` / `LLM.chat` on the same checkpoint.

Covered: completions, chat, streaming (deltas joined = the non-streamed text), n=2, logprobs, stop strings,
prompt scoring as lm-eval asks for it (echo + logprobs against offline prompt_logprobs and transformers),
32 concurrent streaming clients of different lengths (each gets exactly what offline generation gives
that request alone), a client dropping its stream (no running request left in /metrics; new requests
served), the errors (400 / 401 / 404 / 503), SIGINT (exit within 10 s), and two CPU processes (PP over
both, process 0 serving HTTP). Every subprocess is started and ended here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("jaxpipe.scheduler", exc_type=ImportError,
                    reason="the continuous-batching engine (jaxpipe/scheduler.py, issue 9) is not there yet (or "
                           "does not import); these tests run the server on it")
httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e '.[test]')")
openai = pytest.importorskip("openai", reason="openai is a test dependency (pip install -e '.[test]')")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jaxpipe import LLM, SamplingParams  # noqa: E402
from conftest import FAST_COMPILE

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
KEY = "e2e-key"
MAX_MODEL_LEN = 128  # one attention-window bucket: fewer programs to compile
MAX_NUM_SEQS = 8
MAX_WAITING = 24  # 32 clients fill the slots and the queue exactly
START_TIMEOUT_S = 300


_CACHE: dict[str, str] = {}  # the module's persistent compilation cache, shared with the servers


def _env(devices: int | None = None) -> dict:
    """The server's environment: CPU, and by default this process's XLA flags (8 virtual devices) and
    compilation cache, so that the server loads the programs offline generation compiled, and back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXPIPE_") and "proxy" not in k.lower()}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", **_CACHE)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    if "JAXPIPE_CACHE" in os.environ:
        env["JAXPIPE_CACHE"] = os.environ["JAXPIPE_CACHE"]
    return env


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module's offline LLM and its servers (same programs)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    if old["jax_compilation_cache_dir"]:  # the user's own cache: leave it alone
        yield
        return
    d = str(tmp_path_factory.mktemp("serve_jax_cache"))
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()
    _CACHE.update(JAX_COMPILATION_CACHE_DIR=d, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    yield
    _CACHE.clear()
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


class ServerProcess:
    """``python -m jaxpipe.serve ARGS`` with its output collected on a thread; ``url`` once ready."""

    def __init__(self, args: list[str], devices: int | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxpipe.serve", *args], cwd=ROOT, env=_env(devices),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"ready at (http://[^/\s]+)/v1", line)
            if m:
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        if not self.ready.wait(timeout) or self.url is None:
            self.kill()
            pytest.fail("the server did not get ready:\n" + "".join(self.lines[-40:]))
        assert httpx.get(self.url + "/health", timeout=5).status_code == 200
        return self.url

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer) -> str:
    """A tiny random Llama in HF format with SmolLM2's vocabulary, tokenizer and chat template (peaked
    logits, so greedy texts differ between prompts)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        initializer_range=0.3)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve_tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tiny):
    s = ServerProcess([tiny, "--port", "0", "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING),
                       "--api-key", KEY, "--disable-uvicorn-access-log"])
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def offline(tiny):
    return LLM(model=tiny, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def alone(llm, prompt, **kw):
    """Offline generation of one request on its own."""
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def metric(url, name):
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def test_completion_and_stream_match_offline(client, offline):
    prompt = "The capital of France is"
    want = alone(offline, prompt, temperature=0, max_tokens=20)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == want.outputs[0].text
    assert r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    ids = want.prompt_token_ids  # token ids as the prompt give the same
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0).choices[0].text == \
        want.outputs[0].text


def test_chat_matches_offline(client, offline):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.outputs[0].text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert streamed == want.outputs[0].text


def test_n2_logprobs_and_stop(client, offline):
    prompt = "Once upon a time"
    want = alone(offline, prompt, n=2, temperature=0.8, seed=5, max_tokens=12)
    r = client.completions.create(model="tiny", prompt=prompt, n=2, temperature=0.8, seed=5, max_tokens=12)
    assert [c.text for c in r.choices] == [o.text for o in want.outputs]

    want = alone(offline, prompt, temperature=0, max_tokens=8, logprobs=2)
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=8, logprobs=2)
    lp = r.choices[0].logprobs
    ref = want.outputs[0]
    assert lp.token_logprobs == pytest.approx([d[t].logprob for t, d in zip(ref.token_ids, ref.logprobs)], abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs)

    full = alone(offline, prompt, temperature=0, max_tokens=40, ignore_eos=True).outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = alone(offline, prompt, temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]).outputs[0]
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=40, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    assert want.text == full[:full.index(stop)]


# Prompts scored as lm-eval's loglikelihood requests send them: context + continuation, one batch.
SCORED = ["The capital of France is Paris.", "Question: what is two plus two?\nAnswer: four",
          "Hi", "A much longer context, " * 8 + "and then its continuation at the end."]


def test_lm_eval_scoring_matches_offline_and_transformers(client, offline, tiny):
    """lm-eval's request shape (echo, logprobs=1, max_tokens=1, temperature 0, a list of prompts as strings and as
    token ids): every prompt token's logprob is offline prompt_logprobs=1's (1e-6, the same top token) and
    transformers' (1e-4, its argmax); vLLM's prompt_logprobs field gives the same values by token id."""
    import torch
    import transformers

    tok = offline.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in SCORED]
    want = offline.generate([{"prompt_token_ids": x} for x in ids],
                            SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1), use_tqdm=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [torch.log_softmax(hf(torch.tensor([x])).logits[0].float(), -1).numpy() for x in ids]
    kw = dict(model="tiny", echo=True, logprobs=1, max_tokens=1, temperature=0)
    for form, texts in ((SCORED, SCORED), (ids, [tok.decode(x) for x in ids])):
        r = client.completions.create(prompt=form, **kw)
        assert [c.index for c in r.choices] == list(range(len(ids)))
        for c, w, x, row, text in zip(r.choices, want, ids, ref, texts):
            lp, n, gen = c.logprobs, len(x), w.outputs[0]
            assert c.text == text + gen.text
            assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens) == n + 1
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            for j in range(1, n):
                e = w.prompt_logprobs[j]
                top1 = next(t for t, v in e.items() if v.rank == 1)
                assert abs(lp.token_logprobs[j] - e[x[j]].logprob) <= 1e-6, (j, lp.token_logprobs[j], e[x[j]])
                assert abs(lp.token_logprobs[j] - row[j - 1, x[j]]) <= 1e-4, (j, lp.token_logprobs[j], row[j - 1, x[j]])
                assert top1 == int(row[j - 1].argmax())
                assert set(lp.top_logprobs[j]) == {tok.decode([x[j]]), tok.decode([top1])}
                assert abs(max(lp.top_logprobs[j].values()) - e[top1].logprob) <= 1e-6
            # the one generated token closes the list (lm-eval drops it: token_logprobs[ctxlen:-1])
            assert abs(lp.token_logprobs[n] - gen.logprobs[0][gen.token_ids[0]].logprob) <= 1e-6
        zero = client.completions.create(prompt=form, **{**kw, "max_tokens": 0})  # OpenAI's scoring request
        assert [c.text for c in zero.choices] == texts and zero.usage.completion_tokens == 0
        assert [c.logprobs.token_logprobs for c in zero.choices] == [c.logprobs.token_logprobs[:-1] for c in r.choices]
    scored = client.completions.create(prompt=ids, extra_body={"prompt_logprobs": 1}, **kw)
    for c, w in zip(scored.choices, want):
        got = c.model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == len(w.prompt_logprobs)
        for g, e in zip(got[1:], w.prompt_logprobs[1:]):
            assert set(g) == {str(t) for t in e}
            assert all(abs(g[str(t)]["logprob"] - v.logprob) <= 1e-6 and g[str(t)]["rank"] == v.rank
                       for t, v in e.items())
    for body, param in (({"max_tokens": 0, "logprobs": 1}, "max_tokens"),  # 0 only with echo
                        ({"stream": True, "extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt=ids[0], **body)
        assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"

def test_32_concurrent_streams_each_get_their_offline_text(server, offline):
    prompts = [f"Request {i}: a story about {w}" for i, w in
               enumerate(["cats", "dogs", "pipes", "rivers", "stars", "trains", "JAX", "bread"] * 4)]
    lengths = [4 + (7 * i) % 41 for i in range(len(prompts))]
    want = [alone(offline, p, temperature=0, max_tokens=n, ignore_eos=True).outputs[0].text
            for p, n in zip(prompts, lengths)]

    async def one(ac, p, n):
        text = ""
        async for c in await ac.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
            text += c.choices[0].text if c.choices else ""
        return text

    async def run():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths)))
        finally:
            await ac.close()

    got = asyncio.run(run())
    assert sum(g == w for g, w in zip(got, want)) == len(want), [i for i, (g, w) in enumerate(zip(got, want)) if g != w]


def test_dropped_stream_frees_its_slot(server, client):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60, json={"prompt": "Tell me everything", "max_tokens": 100, "stream": True,
                                        "ignore_eos": True}) as st:
        lines = st.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 10
    while metric(server.url, "jaxpipe:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the dropped request still runs"
        time.sleep(0.05)
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 3


def test_errors(server, client):
    def post(body, key=KEY, path="/v1/completions", **kw):
        return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)

    r = post({"prompt": "x", "top_p": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = httpx.post(server.url + "/v1/completions", content=b"{nope", timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post({"prompt": "word " * MAX_MODEL_LEN})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="llama-9000", prompt="x")
    assert post({"prompt": "x"}, key="wrong").status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    r = post({"messages": [{"role": "user", "content": "x"}], "echo": True}, path="/v1/chat/completions")
    assert r.status_code == 400

    # 503: more streams at once than the slots and the waiting queue hold. The first 32 to arrive are
    # always taken; the rest arrive long before any of those can finish (each needs ~30 dispatches), so
    # they are refused with Retry-After. Every stream is held open until all have answered, then dropped.
    async def burst():
        answered, all_in = [], asyncio.Event()

        async def one(ac, i):
            async with ac.stream("POST", "/v1/completions", json={
                    "prompt": f"burst {i}", "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
                answered.append((r.status_code, r.headers.get("retry-after")))
                if len(answered) == 48:
                    all_in.set()
                await all_in.wait()

        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=300) as ac:
            await asyncio.gather(*(one(ac, i) for i in range(48)))
        return answered

    answered = asyncio.run(burst())
    codes = [c for c, _ in answered]
    assert all(int(ra) >= 1 for c, ra in answered if c == 503)
    assert set(codes) <= {200, 503} and codes.count(200) >= MAX_NUM_SEQS + MAX_WAITING and 503 in codes, codes
    deadline = time.monotonic() + 20
    while metric(server.url, "jaxpipe:num_requests_running") != 0 or metric(server.url, "jaxpipe:num_requests_waiting"):
        assert time.monotonic() < deadline, "the dropped streams still run"
        time.sleep(0.05)
    assert post({"prompt": "served again", "max_tokens": 2}).status_code == 200


def test_sigint_exits_within_10s(server):
    """Last of the module's tests on `server`: it stops it."""
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60, json={"prompt": "x", "max_tokens": 100, "stream": True, "ignore_eos": True}) as st:
        lines = st.iter_lines()
        next(lines)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        rest = [line for line in lines if line]
    assert server.proc.wait(10) == 130
    assert time.monotonic() - t0 < 10
    assert rest[-1] == "data: [DONE]"


def test_two_processes(tiny, offline, tmp_path):
    """PP 2 over two CPU processes of one device each: process 0 serves, process 1 follows its schedule."""
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [tiny, "--port", "0", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4",
              "--pipeline-parallel-size", "2", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    p0 = ServerProcess(common + ["--process-id", "0"], devices=1)
    p1 = ServerProcess(common + ["--process-id", "1"], devices=1)
    try:
        url = p0.wait_ready()
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        for prompt, n in (("The capital of France is", 12), ("Hello, my name is", 20)):
            want = alone(offline, prompt, temperature=0, max_tokens=n).outputs[0].text
            assert c.completions.create(model=tiny, prompt=prompt, max_tokens=n, temperature=0).choices[0].text == want
            streamed = "".join(ch.choices[0].text for ch in c.completions.create(
                model=tiny, prompt=prompt, max_tokens=n, temperature=0, stream=True) if ch.choices)
            assert streamed == want
        p0.proc.send_signal(signal.SIGINT)
        assert p0.proc.wait(15) == 130
        assert p1.proc.wait(30) == 0, p1.output()[-2000:]
    finally:
        p0.kill()
        p1.kill()
