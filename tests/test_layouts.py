"""Every parallel layout generates exactly what one device generates (greedy, float32, CPU devices).

- SmolLM2-135M-Instruct (30 layers): pipeline_parallel_size S = 2, 3, 4, 5, 6, 8, each with
  num_microbatches 1 and S; tensor_parallel_size 3 (9 heads, 3 KV heads) and 2 x 3. Four prompts of
  different lengths, 8 new tokens: the same tokens as one device (and as transformers). (Four rows make at
  most four microbatches: for S > 4, "num_microbatches=S" runs 4 microbatches of one row, so the ring has
  empty slots; S = 2 and 4 run exactly S.)
- A tiny random Llama (6 layers, 4 heads, 2 KV heads): S = 1 .. 6 (even and uneven splits), explicit
  ``layer_partition``, tensor_parallel_size 2 and 4 (KV heads replicated), PP x TP = 2x2, 2x4, 4x2; and a
  variant with 8 heads / 8 KV heads at tensor_parallel_size 8. Six prompts, 10 new tokens: the same tokens
  as one device and as transformers.

One LLM per layout; ``generate`` must give identical token_ids.
"""

import jax
import pytest

from jaxpipe import LLM, SamplingParams

# -- SmolLM2 ---------------------------------------------------------------------------------------------

SMOL_NEW = 8


def smol_generate(path, prompts, **layout):
    # steps_per_dispatch 8: one dispatch covers all 8 tokens, no wasted ticks on a slow CPU.
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, progress=False, steps_per_dispatch=SMOL_NEW,
              **layout)
    params = SamplingParams(temperature=0.0, max_tokens=SMOL_NEW, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def smol_expected(smollm2_reference, smollm2_one_device):
    """(prompt ids, the first SMOL_NEW tokens of the one-device run), checked against transformers."""
    prompts = [ids for ids, _ in smollm2_reference.values()]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths"
    one_device = [list(o.outputs[0].token_ids)[:SMOL_NEW] for o in smollm2_one_device]
    assert one_device == [ref[:SMOL_NEW] for _, ref in smollm2_reference.values()]
    return prompts, one_device


@pytest.mark.parametrize("microbatches", ["1", "S"])
@pytest.mark.parametrize("stages", [2, 3, 4, 5, 6, 8])
def test_smollm2_pipeline(stages, microbatches, smollm2_hf_dir, smol_expected):
    prompts, want = smol_expected
    got = smol_generate(smollm2_hf_dir, prompts, pipeline_parallel_size=stages,
                        num_microbatches=1 if microbatches == "1" else stages)
    assert got == want


@pytest.mark.parametrize("stages,tensor", [(1, 3), (2, 3)], ids=["tp3", "pp2xtp3"])
def test_smollm2_tensor_parallel(stages, tensor, smollm2_hf_dir, smol_expected):
    prompts, want = smol_expected
    got = smol_generate(smollm2_hf_dir, prompts, pipeline_parallel_size=stages, tensor_parallel_size=tensor)
    assert got == want


# -- tiny random Llamas ------------------------------------------------------------------------------------

TINY = dict(layers=6, heads=4, kv_heads=2, seed=1)
TINY_8_HEADS = dict(layers=6, heads=8, kv_heads=8, seed=2)
TINY_NEW = 10
# Six prompts of lengths 1 .. 18 (the longest past the 16-token prompt bucket).
TINY_PROMPTS = [[3 + (7 * i + 11 * j) % 250 for j in range(n)] for i, n in enumerate([5, 1, 12, 3, 18, 8])]

TINY_LAYOUTS = {
    # pipeline only: 6 layers on S = 2 .. 6 stages, vLLM's split (uneven for 4 and 5)
    "pp2": dict(pipeline_parallel_size=2),
    "pp3": dict(pipeline_parallel_size=3),
    "pp4_uneven": dict(pipeline_parallel_size=4),                     # [1, 2, 2, 1]
    "pp5_uneven": dict(pipeline_parallel_size=5),                     # [1, 1, 1, 2, 1]
    "pp6": dict(pipeline_parallel_size=6),
    "pp3_one_microbatch": dict(pipeline_parallel_size=3, num_microbatches=1),
    # explicit partitions
    "pp2_partition_1_5": dict(pipeline_parallel_size=2, layer_partition=[1, 5]),
    "pp3_partition_4_1_1": dict(pipeline_parallel_size=3, layer_partition=[4, 1, 1]),
    # tensor parallel (4 heads, 2 KV heads: at 4 shards each KV head is replicated on two shards)
    "tp2": dict(tensor_parallel_size=2),
    "tp4_replicated_kv": dict(tensor_parallel_size=4),
    "pp2xtp2": dict(pipeline_parallel_size=2, tensor_parallel_size=2),
    "pp2xtp4": dict(pipeline_parallel_size=2, tensor_parallel_size=4),
    "pp4xtp2": dict(pipeline_parallel_size=4, tensor_parallel_size=2),
}


def tiny_generate(path, **layout):
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, progress=False, **layout)
    params = SamplingParams(temperature=0.0, max_tokens=TINY_NEW, ignore_eos=True)
    outs = llm.generate(TINY_PROMPTS, params, use_tqdm=False)
    return llm, [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def tiny_expected(tiny_checkpoint, hf_greedy):
    """Build a tiny variant, run it on one device, check that against transformers; return
    (path, one-device tokens)."""
    cache = {}

    def get(variant):
        key = tuple(sorted(variant.items()))
        if key not in cache:
            path, hf = tiny_checkpoint(**variant)
            ref = [hf_greedy(hf, p, TINY_NEW) for p in TINY_PROMPTS]
            _, one_device = tiny_generate(path, devices=jax.devices()[:1])
            assert one_device == ref
            cache[key] = (path, one_device)
        return cache[key]

    return get


@pytest.mark.parametrize("name", list(TINY_LAYOUTS))
def test_tiny_layout(name, tiny_expected):
    path, want = tiny_expected(TINY)
    llm, got = tiny_generate(path, **TINY_LAYOUTS[name])
    layout = TINY_LAYOUTS[name]
    assert llm.layout.stages == layout.get("pipeline_parallel_size", 1)
    assert llm.layout.tensor_parallel == layout.get("tensor_parallel_size", 1)
    if "layer_partition" in layout:
        assert list(llm.layout.layer_counts) == layout["layer_partition"]
    assert got == want


def test_tiny_layer_loop_unrolled_as_on_gpus(tiny_expected, monkeypatch):
    """GPUs unroll the layer loop by 4 (pipeline.default_unroll): stages of 1 and 5 layers (loops shorter than
    and not divisible by the factor) give the tokens of the plain loop on one device."""
    from jaxpipe import pipeline

    assert pipeline.default_unroll("cpu") == 1 and pipeline.default_unroll("gpu") == 4
    monkeypatch.setattr(pipeline, "default_unroll", lambda platform: 4)
    path, want = tiny_expected(TINY)
    llm, got = tiny_generate(path, pipeline_parallel_size=2, layer_partition=[1, 5])
    assert llm.model.unroll == 4
    assert got == want


def test_tiny_tensor_parallel_8(tiny_expected):
    path, want = tiny_expected(TINY_8_HEADS)
    llm, got = tiny_generate(path, tensor_parallel_size=8)
    assert llm.layout.num_devices == 8
    assert got == want


# -- the eight-device layouts of Llama-2-70B's benchmark (issue 6), on a tiny model ------------------------

TINY_8 = dict(layers=8, heads=8, kv_heads=8, seed=3)
EIGHT_DEVICE_LAYOUTS = {
    "pp8_m8": dict(pipeline_parallel_size=8, num_microbatches=8),
    "pp4xtp2": dict(pipeline_parallel_size=4, tensor_parallel_size=2),
    "pp2xtp4": dict(pipeline_parallel_size=2, tensor_parallel_size=4),
    "tp8": dict(tensor_parallel_size=8),
}


@pytest.mark.parametrize("name", list(EIGHT_DEVICE_LAYOUTS))
def test_eight_device_layouts(name, tiny_checkpoint, hf_greedy):
    path, hf = tiny_checkpoint(**TINY_8)
    prompts = TINY_PROMPTS + [[9, 8, 7], [200, 100, 50, 25]]  # 8 prompts: one row per microbatch at M = 8
    params = SamplingParams(temperature=0.0, max_tokens=TINY_NEW, ignore_eos=True)
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, progress=False, **EIGHT_DEVICE_LAYOUTS[name])
    assert llm.layout.num_devices == 8
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(hf, p, TINY_NEW) for p in prompts]
