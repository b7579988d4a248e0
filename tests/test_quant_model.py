"""Quantized models (issue 11, phase 2): ``LLM(..., quantization="int8" | "fp8")`` end to end on CPU.

- Loading quantizes each device's shard on its own (``jaxpipe.loading``): the assembled parameters equal
  ``quantize`` of the whole float matrices, bit for bit, in every layout (pipeline stages with padding slots,
  tensor shards of column- and row-split matrices, replicated KV heads); scales are sharded like their
  columns.
- ``jaxpipe convert --quantization`` writes what quantizing on load makes (the same bits), recorded in the
  manifest; loading it needs no flag, a conflicting ``quantization=`` is refused.
- Every layout (1 device, PP 2, TP 2, PP 2 x TP 2) generates the tokens of one device, for int8 and fp8, in
  float32 and bfloat16 activations (tiny random Llama, 4 layers, 2 KV heads).
- ``jaxpipe plan`` counts 1 byte per quantized weight and 4 per scale column: Llama-2-70B int8 fits two
  80 GB devices with room for its KV cache (bf16 does not).
- SmolLM2-135M through jaxpipe itself, teacher forced on ``tests/data/quant_text.txt`` (``prompt_logprobs``):
  next-token agreement with the float32 model and the perplexity change; greedy output of vLLM's
  quick-start prompts stays sensible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import LLM, SamplingParams, partition
from jaxpipe import quantize as qz
from jaxpipe.checkpoints import MANIFEST_FILE, open_checkpoint
from jaxpipe.convert import convert_checkpoint
from jaxpipe.errors import CheckpointError, UsageError
from jaxpipe.loading import load_params
from jaxpipe.model import QUANTIZED_PARAMS
from jaxpipe.pipeline import PipelineModel, flatten_paths
from jaxpipe.presets import load_preset

KINDS = ("int8", "fp8")
TINY = dict(layers=4, heads=4, kv_heads=2)
LAYOUTS = {"one": (1, 1), "pp2": (2, 1), "tp2": (1, 2), "pp2xtp2": (2, 2)}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(**TINY)[0]


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """``jaxpipe convert --quantization`` of the tiny checkpoint, one directory per kind (float32 kept)."""
    root = tmp_path_factory.mktemp("quantized")
    return {kind: Path(convert_checkpoint(tiny, root / kind, quantization=kind, progress=False)) for kind in KINDS}


def _model(cfg, stages, tensor, dtype, quantization=None, layer_partition=None):
    layout = partition.make_layout(cfg, stages, tensor, layer_partition)
    mesh = partition.make_mesh(layout, jax.devices()[:layout.num_devices])
    return PipelineModel(cfg, layout, mesh, dtype, quantization=quantization)


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)


# -- loading: per-shard quantization is whole-matrix quantization --------------------------------------


@pytest.mark.parametrize("stages,tensor,partition_", [(1, 1, None), (3, 1, [1, 2, 1]), (1, 2, None), (2, 2, None),
                                                      (1, 4, None)],
                         ids=["one", "pp3_uneven", "tp2", "pp2xtp2", "tp4_replicated_kv"])
def test_quantize_on_load_equals_whole_matrix(tiny, stages, tensor, partition_):
    reader = open_checkpoint(tiny)
    cfg = reader.config
    ref = flatten_paths(load_params(reader, _model(cfg, stages, tensor, jnp.float32, layer_partition=partition_)))
    for kind in KINDS:
        model = _model(cfg, stages, tensor, jnp.bfloat16, kind, partition_)
        got = flatten_paths(load_params(reader, model))
        layout = model.layout
        real = [s for s in range(layout.stages * layout.slots_per_stage) if layout.stage_of_slot(s)[1] is not None]
        for name in QUANTIZED_PARAMS:
            q, scale = qz.quantize(np.asarray(ref[f"layers.{name}"]), kind)
            w, s = got[f"layers.{name}"], got[f"layers.{name}_scale"]
            assert w.dtype == qz.quant_dtype(kind) and s.dtype == jnp.float32
            assert s.sharding.spec == partition.param_spec(f"layers.{name}_scale")
            assert np.array_equal(_bits(w)[real], _bits(q)[real]), (kind, name)
            assert np.array_equal(np.asarray(s)[real], scale[real]), (kind, name)
        # Everything else is the float model's, in the run dtype.
        assert got["layers.attn_norm"].dtype == jnp.bfloat16 and got["ends"].dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(got["ends"]), np.asarray(ref["ends"]).astype(jnp.bfloat16))
    # Row-split scales are the whole columns' (one copy per tensor shard), column-split ones go with their columns.
    assert partition.param_spec("layers.wo_scale") == partition.P("stage", None)
    assert partition.param_spec("layers.wqkv_scale") == partition.P("stage", "tensor")


def test_converted_directory_loads_the_same_bits(tiny, converted):
    for kind in KINDS:
        manifest = json.loads((converted[kind] / MANIFEST_FILE).read_text())
        assert manifest["quantization"] == kind
        entry = manifest["tensors"]["layers.1.w_down"]
        assert entry["dtype"] == qz.quant_dtype(kind).name and entry["scale"] == "layers.1.w_down_scale"
        assert manifest["tensors"]["layers.1.w_down_scale"]["dtype"] == "float32"
        assert manifest["tensors"]["embed"]["dtype"] == "float32"   # embeddings, norms stay float
        reader = open_checkpoint(converted[kind])
        assert reader.quantization == kind and reader.dtype("wq", 0) == qz.quant_dtype(kind)
        assert reader.verify()["checksums"]
        for layout in [(1, 1), (2, 2)]:
            for dtype in (jnp.float32, jnp.bfloat16):
                model = _model(reader.config, *layout, dtype, kind)
                on_load = flatten_paths(load_params(open_checkpoint(tiny), model))
                stored = flatten_paths(load_params(reader, model))
                assert on_load.keys() == stored.keys()
                for path in on_load:
                    assert on_load[path].dtype == stored[path].dtype, path
                    assert np.array_equal(_bits(on_load[path]), _bits(stored[path])), (kind, layout, dtype, path)


def test_mismatches_refused_and_conversions(tiny, converted, tmp_path):
    with pytest.raises(UsageError, match="holds int8 weights.*quantization=None or 'int8'"):
        LLM(str(converted["int8"]), quantization="fp8", progress=False)
    with pytest.raises(UsageError, match="quantization='int4' is not supported"):
        LLM(str(tiny), quantization="int4", progress=False)
    reader = open_checkpoint(converted["fp8"])
    with pytest.raises(CheckpointError, match="holds fp8 weights but the model is not quantized"):
        load_params(reader, _model(reader.config, 1, 1, jnp.float32))
    with pytest.raises(CheckpointError, match="compound the errors"):
        convert_checkpoint(converted["int8"], tmp_path / "again", quantization="fp8", progress=False)
    # `jaxpipe convert --quantization`, with another dtype for the float tensors.
    from jaxpipe.cli import main

    assert main(["convert", str(tiny), str(tmp_path / "cli"), "--quantization", "fp8", "--dtype", "bfloat16",
                 "--quiet"]) == 0
    r = open_checkpoint(tmp_path / "cli")
    assert r.quantization == "fp8" and r.dtype("embed").name == "bfloat16" and r.dtype("wo_scale", 0) == np.float32
    assert np.array_equal(_bits(r.read("wo", 1)), _bits(open_checkpoint(converted["fp8"]).read("wo", 1)))
    # A quantized directory converts as it is (another dtype applies to the float tensors only).
    again = convert_checkpoint(converted["int8"], tmp_path / "bf16", dtype="bfloat16", progress=False)
    r = open_checkpoint(again)
    assert r.quantization == "int8" and r.dtype("wq", 0) == np.int8 and r.dtype("wq_scale", 0) == np.float32
    assert r.dtype("embed").name == "bfloat16"
    assert np.array_equal(r.read("w_up", 1), open_checkpoint(converted["int8"]).read("w_up", 1))
    # A manifest that stores 8-bit tensors without saying it is quantized is damaged.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(converted["int8"]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    del manifest["quantization"]
    for name in list(manifest["tensors"]):
        if name.endswith("_scale"):
            del manifest["tensors"][name]
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="stored quantized.*names no quantization"):
        open_checkpoint(bad)


# -- every layout gives the tokens of one device ----------------------------------------------------------

NEW = 8
PROMPTS = [[3 + (7 * i + 11 * j) % 250 for j in range(n)] for i, n in enumerate([5, 1, 12, 3])]


def _generate(path, dtype, quantization=None, stages=1, tensor=1):
    kw = dict(devices=jax.devices()[:1]) if stages * tensor == 1 else {}
    llm = LLM(str(path), dtype=dtype, quantization=quantization, max_model_len=32, max_num_seqs=4,
              steps_per_dispatch=NEW, pipeline_parallel_size=stages, tensor_parallel_size=tensor, progress=False, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def one_device(tiny):
    cache = {}

    def get(kind, dtype):
        if (kind, dtype) not in cache:
            cache[kind, dtype] = _generate(tiny, dtype, kind)
        return cache[kind, dtype]

    return get


# float32: every layout; bfloat16: the 2 x 2 layout (each LLM compiles its own programs: keep the count small).
CASES = [(k, "float32", n) for k in KINDS for n in ("pp2", "tp2", "pp2xtp2")] + \
        [(k, "bfloat16", "pp2xtp2") for k in KINDS]


@pytest.mark.parametrize("kind,dtype,layout", CASES, ids=[f"{k}-{d}-{n}" for k, d, n in CASES])
def test_layouts_give_one_device_tokens(kind, dtype, layout, tiny, converted, one_device):
    want = one_device(kind, dtype)
    # The 2 x 2 layout loads the converted directory (no flag): the same tokens as quantizing on load.
    src, q = (converted[kind], None) if layout == "pp2xtp2" else (tiny, kind)
    assert _generate(src, dtype, q, *LAYOUTS[layout]) == want


def test_dummy_weights_are_quantized(tiny):
    """``load_format="dummy"`` weights (``PipelineModel.random_params``): random 8-bit values and scales,
    generated in their final sharding."""
    cfg = open_checkpoint(tiny).config
    for kind in KINDS:
        model = _model(cfg, 2, 2, jnp.bfloat16, kind)
        p = flatten_paths(model.random_params(seed=1))
        assert p.keys() == flatten_paths(model.abstract_params).keys()
        w, s = p["layers.w_gate_up"], p["layers.w_gate_up_scale"]
        assert w.dtype == qz.quant_dtype(kind) and s.dtype == jnp.float32 and s.shape == w.shape[:1] + w.shape[2:]
        assert w.sharding == model.param_shardings_flat["layers.w_gate_up"]
        dq = np.asarray(w).astype(np.float32) * np.asarray(s)[:, None, :]
        assert 0.01 < float(dq.std()) < 0.04   # like the float model's normal(0, 0.02)
        assert p["ends"].dtype == jnp.bfloat16


# -- plan: quantized bytes ----------------------------------------------------------------------------------


def test_plan_counts_quantized_bytes():
    cfg = load_preset("llama-2-7b")
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    matrices = h * 3 * h + h * h + 3 * h * i           # MHA: q|k|v is 3h wide
    assert partition.layer_bytes_per_shard(cfg, 1, 2) == (matrices + 2 * h) * 2
    assert partition.layer_bytes_per_shard(cfg, 1, 2, "int8") == matrices + 4 * (3 * h + h + 2 * i + h) + 2 * h * 2
    # TP 2: column-split scales are halved with their columns, o/down scales are whole on each shard.
    assert partition.layer_bytes_per_shard(cfg, 2, 2, "fp8") == \
        matrices // 2 + 4 * (3 * h // 2 + h + i + h) + 2 * h * 2
    layout = partition.make_layout(cfg, 1, 1)
    full = partition.plan_memory(cfg, layout, dtype=jnp.bfloat16, max_model_len=4096, batch=1, device_bytes=None)
    int8 = partition.plan_memory(cfg, layout, dtype=jnp.bfloat16, max_model_len=4096, batch=1, device_bytes=None,
                                 quantization="int8")
    assert int8.stages[0].kv_cache_bytes == full.stages[0].kv_cache_bytes   # the KV cache stays bf16
    saved = full.stages[0].weight_bytes - int8.stages[0].weight_bytes
    assert saved == L * (matrices - 4 * (3 * h + h + 2 * i + h))


def test_plan_llama_2_70b_int8_fits_two_80gb_devices(capsys):
    """The issue's target: Llama-2-70B int8 over 2 x 80 GB (at 0.9 of each, as LLM's default budget) fits with
    room for the KV cache of 32 sequences x 4096 tokens (20 GiB per device; about 60 sequences at most); in
    bf16 the weights alone take 64 GiB of the 72 per device (at most 12 sequences)."""
    from jaxpipe import planning
    from jaxpipe.cli import main

    cfg = load_preset("llama-2-70b")
    layout = partition.make_layout(cfg, 2, 1)
    budget = int(80 * 1024 ** 3 * 0.9)
    kw = dict(dtype=jnp.bfloat16, max_model_len=4096, device_bytes=budget)
    int8 = partition.plan_memory(cfg, layout, batch=32, quantization="int8", **kw)
    assert int8.fits, int8.table()
    assert int8.stages[0].weight_bytes < 35e9 and int8.stages[0].kv_cache_bytes >= 20 * 1024 ** 3
    assert planning.max_batch(cfg, layout, quantization="int8", **kw) >= 48
    assert not partition.plan_memory(cfg, layout, batch=32, **kw).fits
    assert planning.max_batch(cfg, layout, **kw) < 16
    # The same through `jaxpipe plan`.
    assert main(["plan", "llama-2-70b", "-pp", "2", "--quantization", "int8", "--dtype", "bfloat16",
                 "--device-memory-gib", "80", "--batch", "32", "--max-model-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "int8 decoder weights" in out and "fits: peak" in out
    assert main(["plan", "llama-2-70b", "-pp", "2", "--dtype", "bfloat16", "--device-memory-gib", "80",
                 "--batch", "32", "--max-model-len", "4096"]) == 1


# -- SmolLM2 through jaxpipe: accuracy and the quick-start prompts -----------------------------------------


@pytest.fixture(scope="module")
def smol_text_ids(smollm2_tokenizer):
    ids = smollm2_tokenizer((Path(__file__).parent / "data" / "quant_text.txt").read_text())["input_ids"]
    assert len(ids) >= 512
    return ids


def _smol(path, quantization):
    return LLM(str(path), dtype="float32", quantization=quantization, max_model_len=1024, max_num_seqs=4,
               devices=jax.devices()[:1], progress=False)


def _teacher_forced(llm, ids):
    """Per predicted position: (the model's top-1 token, the text's next token's logprob), by prompt scoring."""
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    top, logprob = [], []
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        top.append(next(t for t, lp in entry.items() if lp.rank == 1))
        logprob.append(entry[ids[pos]].logprob)
    return np.array(top), np.array(logprob, np.float64)


def _reference_logprobs(hf_model, ids) -> np.ndarray:
    """The float32 model (transformers, the project's reference; jaxpipe float32 matches it to 1e-4): log-softmax
    at every position ``[len, V]``."""
    import torch

    from conftest import torch_threads

    with torch.inference_mode(), torch_threads(1):
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()


@pytest.fixture(scope="module")
def smol_models(smollm2_hf_dir):
    """int8 and fp8 SmolLM2 on one device (quantized on load from the float32 HF directory)."""
    return {kind: _smol(smollm2_hf_dir, kind) for kind in KINDS}


def test_smollm2_accuracy_through_jaxpipe(smol_models, smollm2_hf_model, smol_text_ids, record_property):
    """Teacher forced on the fixed text, against the float32 model. Goals of the issue: perplexity within 2%
    (int8) / 4% (fp8), agreement >= 97% (int8). Measured by fake quantization in phase 1 (BENCHMARKS.md,
    2026-12-01): int8 96.6% / +0.16%, fp8 92.5% / +0.45%, and through jaxpipe the same (96.6% / +0.16%,
    92.5% / +0.45%); the unquantized model run in bf16 agrees on 96.8%, so 97% is at this metric's noise floor
    on SmolLM2 and is not met. The floors asserted are the measured levels less a margin for float32
    summation-order noise (95% / 90%)."""
    ids = smol_text_ids
    ref = _reference_logprobs(smollm2_hf_model, ids)[:-1]
    ref_top, ref_lp = ref.argmax(-1), ref[np.arange(len(ids) - 1), ids[1:]]
    ppl_ref = math.exp(-ref_lp.mean())
    for kind, (ppl_goal, floor) in {"int8": (0.02, 0.95), "fp8": (0.04, 0.90)}.items():
        top, lp = _teacher_forced(smol_models[kind], ids)
        agreement = float(np.mean(top == ref_top))
        change = math.exp(-lp.mean()) / ppl_ref - 1
        record_property(f"{kind}_agreement", agreement)
        record_property(f"{kind}_ppl_change", change)
        print(json.dumps({"test": "quant_accuracy_jaxpipe", "kind": kind, "positions": len(top),
                          "agreement": round(agreement, 4), "ppl_ref": round(ppl_ref, 3),
                          "ppl_change": round(change, 5)}))
        assert abs(change) <= ppl_goal, (kind, change)
        assert agreement >= floor, (kind, agreement)


def test_smollm2_quick_start_prompts(smol_models, smollm2_reference, smollm2_hf_model):
    """vLLM's quick-start prompts, greedy, 8 tokens: " Paris" after "The capital of France is" (as float32);
    every prompt's first token is the float32 model's first choice or a near tie of it (quantization only
    reorders near ties): within 0.5 nat of the float32 model's best."""
    prompts = list(smollm2_reference)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for kind in KINDS:
        outs = smol_models[kind].generate(prompts, params, use_tqdm=False)
        texts = {p: o.outputs[0].text for p, o in zip(prompts, outs)}
        assert texts["The capital of France is"].startswith(" Paris"), (kind, texts)
        for p, o in zip(prompts, outs):
            prompt_ids, ref_tokens = smollm2_reference[p]
            scores = _reference_logprobs(smollm2_hf_model, prompt_ids)[-1]
            first = o.outputs[0].token_ids[0]
            gap = float(scores.max() - scores[first])
            print(json.dumps({"test": "quick_start", "kind": kind, "prompt": p, "text": texts[p],
                              "same_as_float32": list(o.outputs[0].token_ids) == ref_tokens[:8],
                              "first_token_gap_nat": round(gap, 4)}))
            assert gap <= 0.5, (kind, p, texts[p], gap)
