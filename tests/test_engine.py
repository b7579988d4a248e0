"""Continuous batching: a stream of requests with mixed lengths and parameters through one engine.

The rule (issue 9): every request gets exactly the tokens it gets alone — greedy and seeded sampling —
whatever else runs beside it, whenever it arrives, and in every layout. A tiny random Llama (vocabulary
256, word-level tokenizer) keeps a CPU step cheap; the engine is squeezed (6 slots, 64 prompt tokens per
prefill dispatch, 32-token chunks, 4 steps per dispatch) so that queueing, chunked prefill, slot reuse and
program reuse all happen many times.
"""

from __future__ import annotations

import dataclasses
import random

import jax
import pytest

from jaxpipe import LLM, SamplingParams
from jaxpipe.errors import MemoryPlanError
from jaxpipe.sampling import RequestOutputKind

MAX_LEN = 128
ENGINE = dict(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=6, max_num_batched_tokens=64,
              long_prefill_token_threshold=32, steps_per_dispatch=4, progress=False)


def random_params(rng: random.Random, i: int) -> SamplingParams:
    """One of many parameter kinds; every sampled kind carries a seed so that it can be compared."""
    max_tokens = rng.choice([1, 2, 5, 9, 17, 30])
    seed = 1000 + i
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, seed=seed),
        dict(temperature=1.0, top_k=5, seed=seed),
        dict(temperature=0.9, top_p=0.8, seed=seed),
        dict(temperature=1.0, min_p=0.2, seed=seed),
        dict(temperature=0.0, repetition_penalty=1.3),
        dict(temperature=0.7, presence_penalty=0.8, frequency_penalty=0.4, seed=seed),
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.5, logprobs=20, seed=seed),
        dict(temperature=0.0, stop_token_ids=[rng.randrange(3, 256) for _ in range(rng.randint(1, 6))],
             min_tokens=min(3, max_tokens)),
        dict(temperature=1.0, n=2, seed=seed),
        dict(temperature=0.0, ignore_eos=True),
    ]
    return SamplingParams(max_tokens=max_tokens, **rng.choice(kinds))


def make_requests(n: int, seed: int = 0, longest: int = 90) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 2, 3, 7, 15, 16, 17, 31, 33, 50, longest])
        out.append(([rng.randrange(3, 256) for _ in range(length)], random_params(rng, i)))
    return out


def token_ids(out) -> list[list[int]]:
    return [list(c.token_ids) for c in out.outputs]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, _ = tiny_checkpoint(layers=4, heads=4, kv_heads=2)
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(model=tiny, devices=jax.devices()[:1], **ENGINE)


@pytest.fixture(scope="module")
def requests_200():
    return make_requests(200)


@pytest.fixture(scope="module")
def alone(llm, requests_200):
    """Each request run alone on the one-device engine: the reference for everything below."""
    return [token_ids(llm.generate({"prompt_token_ids": ids}, p, use_tqdm=False)[0]) for ids, p in requests_200]


def staggered(llm, requests, seed: int = 1, every: int = 3) -> list[list[list[int]]]:
    """Submit ``requests`` through the engine API a few at a time, between steps, and collect the
    final outputs."""
    engine = llm.llm_engine
    rng = random.Random(seed)
    order = list(range(len(requests)))
    results: dict[int, list[list[int]]] = {}
    steps = 0
    while len(results) < len(requests):
        if order and steps % every == 0:
            for _ in range(rng.randint(1, 4)):
                if order:
                    i = order.pop(0)
                    ids, p = requests[i]
                    engine.add_request(f"stagger-{seed}-{i}", {"prompt_token_ids": ids},
                                       dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY))
        for out in engine.step():
            assert out.finished
            results[int(out.request_id.rsplit("-", 1)[1])] = token_ids(out)
        steps += 1
        assert steps < 20000, "the engine made no progress"
    return [results[i] for i in range(len(requests))]


def test_200_mixed_requests_equal_each_run_alone(llm, requests_200, alone):
    engine = llm.llm_engine
    compiled_before = engine.engine.num_compiled
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in requests_200], [p for _, p in requests_200],
                        use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [ids for ids, _ in requests_200]
    for i, (out, want) in enumerate(zip(outs, alone)):
        assert token_ids(out) == want, f"request {i} ({requests_200[i][1]}) differs from its run alone"
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length")
            assert 1 <= len(c.token_ids) <= requests_200[i][1].max_tokens
    # Programs: one per static spec, and the spec space is small. Here (max_model_len 128 = one attention
    # window bucket, stop lists of at most 7 ids = one width): decode 2 (logprobs or not) x 3 (greedy, sampled,
    # sorted) x 2 (penalties or not), prefill 2 chunk buckets (16, 32) x 3 row buckets (1, 2, 4).
    specs = engine.engine.compiled_specs
    assert {s.kv_len for s in specs} == {MAX_LEN} and {s.sampler.stop_width for s in specs} == {8}
    assert len(specs) <= 12 + 6, [str(s) for s in specs]
    assert compiled_before < len(specs)
    assert not engine.has_unfinished_requests() and engine.stats().num_running == 0


def test_staggered_arrivals_equal_each_run_alone(llm, requests_200, alone):
    got = staggered(llm, requests_200[:80])
    assert got == alone[:80]


LAYOUTS = {
    "pp2": dict(pipeline_parallel_size=2),
    "pp2_m4": dict(pipeline_parallel_size=2, num_microbatches=4),
    "pp4": dict(pipeline_parallel_size=4),
    "tp2": dict(tensor_parallel_size=2),
    "pp2xtp2": dict(pipeline_parallel_size=2, tensor_parallel_size=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_stream_equals_one_device_alone(layout, tiny, requests_200, alone):
    llm = LLM(model=tiny, **ENGINE, **LAYOUTS[layout])
    n = 36
    assert staggered(llm, requests_200[:n], seed=7, every=2) == alone[:n]


def test_reuse_across_parameter_kinds(llm):
    """One LLM, one request kind after another (a plain greedy call then penalties, min_tokens with stop ids
    of other lengths, logprobs...): every call works and equals the same request alone."""
    prompt = {"prompt_token_ids": [5, 9, 23, 7, 100]}
    kinds = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0, max_tokens=6,
                                                                         repetition_penalty=1.5),
             SamplingParams(temperature=0, max_tokens=6, presence_penalty=1.0),
             SamplingParams(temperature=0, max_tokens=6, min_tokens=3, stop_token_ids=[7, 8, 9, 10, 11, 12, 13]),
             SamplingParams(temperature=0, max_tokens=6, min_tokens=2, stop_token_ids=[7]),
             SamplingParams(temperature=0, max_tokens=6, logprobs=5), SamplingParams(temperature=0, max_tokens=6)]
    single = [token_ids(llm.generate(prompt, p, use_tqdm=False)[0]) for p in kinds]
    together = [token_ids(o) for o in llm.generate([prompt] * len(kinds), kinds, use_tqdm=False)]
    assert together == single
    assert single[0] == single[-1]


def test_abort_frees_the_slot(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    for i in range(3):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": [10 + i, 20, 30]}, params)
    seen: dict[str, int] = {}
    for _ in range(6):
        for out in engine.step():
            seen[out.request_id] = seen.get(out.request_id, 0) + sum(len(c.token_ids) for c in out.outputs)
    assert set(seen) == {"abort-0", "abort-1", "abort-2"}
    engine.abort_request("abort-1")
    after: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            after[out.request_id] = after.get(out.request_id, 0) + sum(len(c.token_ids) for c in out.outputs)
            if out.request_id == "abort-0":
                engine.abort_request("abort-0")
    assert "abort-1" not in after
    assert seen["abort-2"] + after["abort-2"] == 60
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
    # the freed slots serve new requests exactly
    p = SamplingParams(temperature=0, max_tokens=8)
    assert token_ids(llm.generate({"prompt_token_ids": [1, 2, 3]}, p, use_tqdm=False)[0]) == \
        token_ids(llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 7, p, use_tqdm=False)[6])


def test_delta_and_cumulative_outputs_join_to_the_final_one(llm):
    engine = llm.llm_engine
    base = SamplingParams(temperature=0.7, seed=3, max_tokens=25, logprobs=2)
    prompt = {"prompt_token_ids": [40, 41, 42]}
    want = llm.generate(prompt, base, use_tqdm=False)[0].outputs[0]
    for kind in (RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE):
        engine.add_request(f"kind-{kind}", prompt, dataclasses.replace(base, output_kind=kind))
        text, ids, lps, last = "", [], [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                c = out.outputs[0]
                if kind == RequestOutputKind.DELTA:
                    text, ids, lps = text + c.text, ids + list(c.token_ids), lps + list(c.logprobs)
                else:
                    assert c.text.startswith(text) and list(c.token_ids[:len(ids)]) == ids
                    text, ids, lps = c.text, list(c.token_ids), list(c.logprobs)
                last = out
        assert last.finished and last.outputs[0].finish_reason == want.finish_reason
        assert (text, ids) == (want.text, list(want.token_ids))
        assert [{k: v.logprob for k, v in e.items()} for e in lps] == \
            [{k: v.logprob for k, v in e.items()} for e in want.logprobs]


def test_long_prompt_is_prefilled_in_chunks_exactly(tiny_checkpoint, hf_greedy):
    path, hf = tiny_checkpoint(layers=4, heads=4, kv_heads=2)
    prompt = [3 + (17 * i) % 250 for i in range(100)]
    chunked = LLM(model=str(path), devices=jax.devices()[:1], **ENGINE)   # 32-token chunks
    assert chunked.llm_engine.chunk == 32
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = token_ids(chunked.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0])[0]
    assert got == hf_greedy(hf, prompt, 12)


def test_max_tokens_none_runs_to_max_model_len(llm):
    out = llm.generate({"prompt_token_ids": [7] * 100}, SamplingParams(temperature=0, max_tokens=None,
                                                                        ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_LEN - 100 and out.outputs[0].finish_reason == "length"


def test_slots_that_do_not_fit_are_refused_with_what_fits(tiny):
    with pytest.raises(MemoryPlanError, match=r"max_num_seqs=\d+ or max_model_len=\d+"):
        LLM(model=tiny, dtype="float32", max_model_len=4096, max_num_seqs=64, gpu_memory_utilization=0.002,
            devices=jax.devices()[:1], progress=False)
