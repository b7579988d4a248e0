"""SmolLM2-135M-Instruct token for token against transformers (greedy, float32).

vLLM's four example prompts run in ONE batch, 32 greedy tokens each with ignore_eos; transformers generates
each prompt alone from its own reading of the GGUF file. jaxpipe must give the same tokens when it loads the
GGUF file itself and when it loads an HF safetensors directory made from it.
"""

import jax

from jaxpipe import LLM, SamplingParams

NEW_TOKENS = 32


def check_against_reference(outs, reference):
    assert [o.prompt for o in outs] == list(reference)
    for out, (prompt, (prompt_ids, want)) in zip(outs, reference.items()):
        assert list(out.prompt_token_ids) == prompt_ids, prompt
        got = list(out.outputs[0].token_ids)
        assert got == want, f"{prompt!r}: jaxpipe {got} != transformers {want}"
        assert out.outputs[0].finish_reason == "length"
    france = outs[list(reference).index("The capital of France is")]
    assert france.outputs[0].text.startswith(" Paris."), france.outputs[0].text


def test_gguf_file_matches_transformers(smollm2_gguf, smollm2_reference):
    llm = LLM(model=str(smollm2_gguf), dtype="float32", max_model_len=64, devices=jax.devices()[:1],
              progress=False)
    assert llm.reader.kind == "gguf"
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    check_against_reference(llm.generate(list(smollm2_reference), params, use_tqdm=False), smollm2_reference)


def test_hf_directory_from_gguf_matches_transformers(smollm2_one_device, smollm2_reference):
    # smollm2_one_device: LLM(model=<HF directory saved from the GGUF model>) on one device, same batch.
    check_against_reference(smollm2_one_device, smollm2_reference)
