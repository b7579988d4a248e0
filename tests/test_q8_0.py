"""q8_0 (issue 11, item 5): int8 weights with a float16 scale per 32 input rows, llama.cpp's Q8_0, on CPU.

- ``quantize(w, "q8_0")`` gives ggml's bits (``gguf.quants.quantize`` is the reference), from NumPy and JAX alike.
- Loading quantizes each shard from its own rows: the parameters equal ``quantize`` of the whole matrices in
  every layout; the scales are split like their matrices; a tensor split that cuts groups is refused.
- A GGUF file whose matrices are Q8_0 is loaded as its blocks (``keep_quantized``): nothing dequantized, and
  the same bits as quantizing its dequantized values.
- In float32 the q8_0 model *is* the dequantized model: the same greedy tokens and logprobs to float32
  rounding as the float model of the dequantized weights. Every layout gives one device's tokens.
- ``jaxpipe convert --quantization q8_0`` (from HF and from a Q8_0 GGUF) writes the same bits; ``jaxpipe plan``
  counts 1 byte per weight and 2 per 32 weights.
- SmolLM2-135M as a Q8_0 GGUF, teacher forced on ``tests/data/quant_text.txt`` against the float32 model:
  next-token agreement >= 97% and perplexity within 2% (the issue's int8 goals), and vLLM's quick-start prompt.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import LLM, SamplingParams, partition
from jaxpipe import quantize as qz
from jaxpipe.checkpoints import MANIFEST_FILE, open_checkpoint
from jaxpipe.convert import convert_checkpoint
from jaxpipe.errors import LayoutError
from jaxpipe.loading import load_params
from jaxpipe.model import QUANTIZED_PARAMS
from jaxpipe.pipeline import PipelineModel, flatten_paths
from jaxpipe.presets import load_preset

TINY = dict(layers=4, heads=4, kv_heads=2)   # hidden 64, q 64, intermediate 128: whole groups up to TP 2
HF_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _model(cfg, stages, tensor, dtype, quantization=None, layer_partition=None):
    layout = partition.make_layout(cfg, stages, tensor, layer_partition)
    mesh = partition.make_mesh(layout, jax.devices()[:layout.num_devices])
    return PipelineModel(cfg, layout, mesh, dtype, quantization=quantization)


def _ggml_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gguf's own Q8_0 quantization of ``w[K, N]`` (blocks along K), as (q [K, N] int8, d [K/32, N] float16)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    k, n = w.shape
    blocks = quantize(np.ascontiguousarray(w.T), GGMLQuantizationType.Q8_0).reshape(n, k // 32, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
    return q.T, d.T


# -- the quantizer ------------------------------------------------------------------------------------------


def test_quantize_gives_ggml_bits_numpy_and_jax():
    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((192, 40))).astype(np.float32)
    w[:, 0] *= 30.0          # an outlier column
    w[:64, 1] *= 1e-4        # tiny groups: subnormal float16 scales
    w[32:64, 2] = 0.0        # an all-zero group: scale 0, values 0
    q, s = qz.quantize(w, "q8_0")
    assert q.dtype == np.int8 and q.shape == w.shape and s.dtype == np.float16 and s.shape == (6, 40)
    gq, gd = _ggml_q8_0(w)
    assert np.array_equal(q, gq) and np.array_equal(_bits(s), _bits(gd))
    assert s[1, 2] == 0 and not q[32:64, 2].any()
    qj, sj = jax.jit(lambda w: qz.quantize(w, "q8_0"))(jnp.asarray(w))
    assert np.array_equal(np.asarray(qj), q) and np.array_equal(_bits(sj), _bits(s))
    # Dequantized: exact in float32 (8-bit values times float16 scales), within the documented bound.
    dq = qz.dequantize(q, s)
    assert np.array_equal(dq, q.astype(np.float32) * np.repeat(s.astype(np.float32), 32, axis=0))
    assert np.all(np.abs(w - dq) <= qz.error_bound(w, s, "q8_0"))
    # Host quantization a block of rows at a time gives the same bits as the whole matrix.
    big = (0.02 * rng.standard_normal((2, 4096, 1100))).astype(np.float32)
    qh, sh = qz.quantize_host(big, "q8_0")
    qw, sw = qz.quantize(big, "q8_0")
    assert np.array_equal(qh, qw) and np.array_equal(_bits(sh), _bits(sw))
    assert np.array_equal(_bits(qz.group_scales(big, "q8_0")), _bits(sw))
    # Sizes, and what is refused.
    assert qz.nbytes((2, 64, 8), "q8_0") == 2 * 64 * 8 + 2 * 2 * 8 * 2
    with pytest.raises(ValueError, match="groups of 32 input rows, but the weight has 40 rows"):
        qz.quantize(np.ones((40, 8), np.float32), "q8_0")
    with pytest.raises(ValueError, match="per-channel kinds"):
        qz.quantize_with_scale(w, s, "q8_0")


# -- loading -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(**TINY)[0]


@pytest.mark.parametrize("stages,tensor,partition_", [(1, 1, None), (3, 1, [1, 2, 1]), (1, 2, None), (2, 2, None)],
                         ids=["one", "pp3_uneven", "tp2", "pp2xtp2"])
def test_quantize_on_load_equals_whole_matrix(tiny, stages, tensor, partition_):
    reader = open_checkpoint(tiny)
    cfg = reader.config
    ref = flatten_paths(load_params(reader, _model(cfg, stages, tensor, jnp.float32, layer_partition=partition_)))
    model = _model(cfg, stages, tensor, jnp.bfloat16, "q8_0", partition_)
    got = flatten_paths(load_params(reader, model))
    layout = model.layout
    real = [s for s in range(layout.stages * layout.slots_per_stage) if layout.stage_of_slot(s)[1] is not None]
    for name in QUANTIZED_PARAMS:
        q, scale = qz.quantize(np.asarray(ref[f"layers.{name}"]), "q8_0")
        w, s = got[f"layers.{name}"], got[f"layers.{name}_scale"]
        assert w.dtype == jnp.int8 and s.dtype == jnp.float16 and s.shape == w.shape[:1] + (w.shape[1] // 32,) + w.shape[2:]
        # Groups go with their rows: the scales are split exactly like the matrix (o and down by rows on TP).
        assert s.sharding.spec == w.sharding.spec == partition.param_spec(f"layers.{name}")
        assert np.array_equal(np.asarray(w)[real], q[real]), name
        assert np.array_equal(_bits(s)[real], _bits(scale)[real]), name
    assert got["ends"].dtype == jnp.bfloat16


def test_group_splitting_layout_refused(tiny):
    cfg = open_checkpoint(tiny).config
    with pytest.raises(LayoutError, match=r"q8_0.*groups of 32 input rows.*tp \(4\) is 16"):
        _model(cfg, 1, 4, jnp.float32, "q8_0")


# -- float32 q8_0 is the dequantized model; layouts -----------------------------------------------------------

NEW = 8
PROMPTS = [[3 + (7 * i + 11 * j) % 250 for j in range(n)] for i, n in enumerate([5, 1, 12, 3])]


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """The HF checkpoint ``src`` with every decoder matrix replaced by its q8_0-dequantized values (float32)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, w in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in HF_MATRICES:   # [out, in]: groups along in
            tensors[name] = np.ascontiguousarray(qz.dequantize(*qz.quantize(w.T, "q8_0")).T)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _run(path, dtype, quantization=None, stages=1, tensor=1, logprobs=False):
    kw = dict(devices=jax.devices()[:1]) if stages * tensor == 1 else {}
    llm = LLM(str(path), dtype=dtype, quantization=quantization, max_model_len=32, max_num_seqs=4,
              steps_per_dispatch=NEW, pipeline_parallel_size=stages, tensor_parallel_size=tensor, progress=False, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=1 if logprobs else None)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if not logprobs:
        return tokens
    return tokens, [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]


@pytest.fixture(scope="module")
def one_device(tiny, tmp_path_factory):
    """q8_0 on one device: float32 (with logprobs) and bfloat16 tokens."""
    return {"float32": _run(tiny, "float32", "q8_0", logprobs=True), "bfloat16": _run(tiny, "bfloat16", "q8_0")}


def test_float32_q8_0_is_the_dequantized_model(tiny, one_device, tmp_path):
    tokens, logprobs = one_device["float32"]
    want_tokens, want_logprobs = _run(_dequantized_copy(tiny, tmp_path / "dq"), "float32", logprobs=True)
    assert tokens == want_tokens
    np.testing.assert_allclose(np.array(logprobs), np.array(want_logprobs), rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return Path(convert_checkpoint(tiny, tmp_path_factory.mktemp("q8_0") / "dir", quantization="q8_0",
                                   progress=False))


CASES = [("float32", "tp2"), ("float32", "pp2xtp2"), ("bfloat16", "pp2")]


@pytest.mark.parametrize("dtype,layout", CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_layouts_give_one_device_tokens(dtype, layout, tiny, converted, one_device):
    want = one_device[dtype][0] if dtype == "float32" else one_device[dtype]
    sizes = {"pp2": (2, 1), "tp2": (1, 2), "pp2xtp2": (2, 2)}[layout]
    # The 2 x 2 layout loads the converted directory (no flag): the same tokens as quantizing on load.
    src, q = (converted, None) if layout == "pp2xtp2" else (tiny, "q8_0")
    assert _run(src, dtype, q, *sizes) == want


def test_converted_directory(tiny, converted, tmp_path):
    manifest = json.loads((converted / MANIFEST_FILE).read_text())
    assert manifest["quantization"] == "q8_0"
    entry = manifest["tensors"]["layers.1.w_down"]
    assert entry["dtype"] == "int8" and entry["scale"] == "layers.1.w_down_scale"
    scale = manifest["tensors"]["layers.1.w_down_scale"]
    assert scale["dtype"] == "float16" and scale["shape"] == [128 // 32, 64]
    reader = open_checkpoint(converted)
    assert reader.quantization == "q8_0" and reader.verify()["checksums"]
    model = _model(reader.config, 2, 2, jnp.bfloat16, "q8_0")
    on_load, stored = flatten_paths(load_params(open_checkpoint(tiny), model)), flatten_paths(load_params(reader, model))
    for path in on_load:
        assert np.array_equal(_bits(on_load[path]), _bits(stored[path])), path
    # Another kind over q8_0 weights compounds the errors; the CLI spells the kind too.
    with pytest.raises(Exception, match="compound the errors"):
        convert_checkpoint(converted, tmp_path / "again", quantization="int8", progress=False)
    from jaxpipe.cli import main

    assert main(["convert", str(tiny), str(tmp_path / "cli"), "--quantization", "q8_0", "--quiet"]) == 0
    assert np.array_equal(open_checkpoint(tmp_path / "cli").read("wo", 2), reader.read("wo", 2))


# -- a Q8_0 GGUF file ---------------------------------------------------------------------------------------


def write_q8_0_gguf(src: Path, dst: Path) -> Path:
    """``src`` (a llama GGUF) with every decoder matrix requantized to Q8_0 from its dequantized values, as
    llama.cpp's own quantizer writes it; metadata, the tokenizer and other tensors as they are."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch="llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = 7 if name == "general.file_type" else field.contents()   # 7: MOSTLY_Q8_0
        writer.add_key_value(name, value, field.types[0], field.types[-1] if field.types[0] == GGUFValueType.ARRAY
                             else None)
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            writer.add_tensor(t.name, quantize(dequantize(t.data, t.tensor_type), GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def smol_q8_0(smollm2_gguf, tmp_path_factory) -> Path:
    return write_q8_0_gguf(smollm2_gguf, tmp_path_factory.mktemp("smol_q8_0") / "SmolLM2-135M-Instruct.Q8_0.gguf")


def test_gguf_q8_0_blocks_loaded_as_they_are(smol_q8_0, smollm2_gguf, smollm2_tokenizer, tmp_path, monkeypatch):
    reader = open_checkpoint(smol_q8_0)   # opened once: parsing the GGUF's metadata takes seconds
    assert reader.quantization is None and reader.dtype("wq", 0) == np.float32   # no flag: dequantized, as before
    dequantized = {name: reader.read(name, 3) for name in ("wq", "wk", "w_down")}
    cfg = reader.config
    model = _model(cfg, 1, 1, jnp.float32, "q8_0")
    requantized = flatten_paths(load_params(reader, model))   # quantized on load from the dequantized values
    # `jaxpipe convert --quantization q8_0` switches the reader to the file's blocks and writes them.
    monkeypatch.setattr(reader, "save_tokenizer", smollm2_tokenizer.save_pretrained)   # (the session's copy)
    conv = open_checkpoint(convert_checkpoint(reader, tmp_path / "smol", quantization="q8_0", progress=False))
    assert reader.quantization == "q8_0" and reader.keep_quantized("q8_0")
    assert not open_checkpoint(smollm2_gguf).keep_quantized("q8_0")   # Q4_1 matrices: not Q8_0 blocks
    assert reader.dtype("wk", 3) == np.int8 and reader.dtype("wk_scale", 3) == np.float16
    for name, want in dequantized.items():   # q and k rows are un-permuted with their scales
        q, s = reader.read(name, 3), reader.read(f"{name}_scale", 3)
        assert s.shape == (q.shape[0] // 32, q.shape[1])
        assert np.array_equal(qz.dequantize(q, s), want)
    # Every parameter: the file's blocks are what quantizing the dequantized values makes.
    kept = flatten_paths(load_params(reader, model))
    for path in kept:
        assert np.array_equal(_bits(kept[path]), _bits(requantized[path])), path
    assert conv.quantization == "q8_0"
    assert np.array_equal(conv.read("wq", 5), reader.read("wq", 5))
    assert np.array_equal(_bits(conv.read("w_up_scale", 5)), _bits(reader.read("w_up_scale", 5)))


def test_smollm2_q8_0_accuracy_and_quick_start(smol_q8_0, smollm2_hf_model, smollm2_tokenizer, smollm2_hf_dir,
                                               record_property):
    """Teacher forced on the fixed text against the float32 model (the Q8_0 file is quantized from its
    weights): agreement >= 97% and perplexity within 2%, the goals int8 with per-channel scales misses (96.6%;
    the unquantized model in bf16 agrees on 96.8%). Measured by fake quantization (tools/quant_accuracy.py
    --kinds q8_0): 97.7%, -0.02%."""
    import torch

    from conftest import torch_threads

    # The tokenizer from the same model's saved files: building it from GGUF metadata takes seconds.
    llm = LLM(str(smol_q8_0), tokenizer=str(smollm2_hf_dir), dtype="float32", quantization="q8_0",
              max_model_len=1024, max_num_seqs=4, devices=jax.devices()[:1], progress=False)
    assert llm.reader.quantization == "q8_0"
    ids = smollm2_tokenizer((Path(__file__).parent / "data" / "quant_text.txt").read_text())["input_ids"]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    top = np.array([next(t for t, lp in out.prompt_logprobs[p].items() if lp.rank == 1) for p in range(1, len(ids))])
    lp = np.array([out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))], np.float64)
    with torch.inference_mode(), torch_threads(1):
        ref = torch.log_softmax(smollm2_hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()[:-1]
    agreement = float(np.mean(top == ref.argmax(-1)))
    change = math.exp(-lp.mean()) / math.exp(-ref[np.arange(len(ids) - 1), ids[1:]].mean()) - 1
    record_property("q8_0_agreement", agreement)
    print(json.dumps({"test": "q8_0_accuracy", "positions": len(top), "agreement": round(agreement, 4),
                      "ppl_change": round(change, 5)}))
    assert agreement >= 0.97 and abs(change) <= 0.02, (agreement, change)
    text = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)[0].outputs[0].text
    assert text.startswith(" Paris"), text


# -- plan -----------------------------------------------------------------------------------------------------


def test_plan_counts_q8_0_bytes(capsys):
    cfg = load_preset("llama-2-7b")
    h, i = cfg.hidden_size, cfg.intermediate_size
    matrices = h * 3 * h + h * h + 3 * h * i
    assert partition.layer_bytes_per_shard(cfg, 1, 2, "q8_0") == matrices + matrices // 32 * 2 + 2 * h * 2
    assert partition.layer_bytes_per_shard(cfg, 2, 2, "q8_0") == matrices // 2 + matrices // 64 * 2 + 2 * h * 2
    from jaxpipe.cli import main

    assert main(["plan", "llama-2-70b", "-pp", "2", "--quantization", "q8_0", "--dtype", "bfloat16",
                 "--device-memory-gib", "80", "--batch", "32", "--max-model-len", "4096"]) == 0
    assert "q8_0 decoder weights" in capsys.readouterr().out
