"""jaxpipe.loading: the parameters every layout and format loads, what is read, progress and errors. CPU.

- The same parameters, bit for bit, as the loader before issue 12 (kept in ``loading_reference.py``: whole
  tensors, numpy concatenation), for HF directories (one file; several files with an index), jaxpipe
  directories (float32 and bfloat16, loaded as bfloat16 and as float32) and the SmolLM2 GGUF (one device and
  PP 2 x TP 3 only: it dequantizes the whole model per load, ~20 s here), on one device, PP 2/3, TP 2/3/4
  (4: KV heads replicated) and PP x TP.
- A counting reader (every ``read_slice``/``read`` counted per tensor element) shows each checkpoint byte
  read exactly once per process under TP 2/3/4 and PP x TP.
- ``plan_blocks`` for one device shows what one process of a multi-process run reads: its stage's layers,
  its columns and vocabulary rows only.
- ``progress=True`` draws a bar in bytes and ends its line before an error propagates; a callable progress
  is called once per parameter.
"""

import shutil
import threading
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxpipe import loading, partition
from jaxpipe.checkpoints import open_checkpoint, split_key
from jaxpipe.convert import convert_checkpoint
from jaxpipe.errors import CheckpointError
from jaxpipe.pipeline import PipelineModel, flatten_paths

from loading_reference import reference_params

# A: 6 heads / 3 KV heads (TP 3), biases, 5 layers (uneven PP splits leave padding slots), vocab 256.
VARIANT_A = dict(vocab=256, hidden=96, intermediate=192, layers=5, heads=6, kv_heads=3, attention_bias=True,
                 mlp_bias=True, seed=5)
# B: 4 heads / 2 KV heads (TP 2; TP 4 replicates KV heads), untied lm_head, vocab 250 (padded rows).
VARIANT_B = dict(vocab=250, hidden=64, intermediate=128, layers=5, heads=4, kv_heads=2, seed=6)
LAYOUTS_A = {"1": (1, 1), "pp2": (2, 1), "pp3": (3, 1), "tp3": (1, 3), "pp2xtp3": (2, 3)}
LAYOUTS_B = {"tp2": (1, 2), "tp4": (1, 4), "pp2xtp2": (2, 2), "pp2xtp4": (2, 4)}


class CachedReads:
    """``read(name, layer)`` with every tensor read once (the reference needs each several times)."""

    def __init__(self, reader):
        self.reader, self.cache = reader, {}

    def __call__(self, name, layer=None):
        if (name, layer) not in self.cache:
            self.cache[(name, layer)] = self.reader.read(name, layer)
        return self.cache[(name, layer)]


class CountingReader:
    """Wraps a reader; counts, per element of every canonical tensor, how many reads returned it."""

    def __init__(self, reader):
        self._reader = reader
        self.counts: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getattr__(self, attr):
        return getattr(self._reader, attr)

    def _count(self, name, layer, index):
        with self._lock:
            c = self.counts.setdefault((name, layer), np.zeros(self._reader.shape(name, layer), np.int32))
            c[index] += 1

    def read_slice(self, name, layer=None, index=()):
        out = self._reader.read_slice(name, layer, index)
        self._count(name, layer, index)
        return out

    def read(self, name, layer=None, rows=None):
        out = self._reader.read(name, layer, rows)
        self._count(name, layer, (slice(None),) if rows is None else (rows,))
        return out


def build_model(reader, stages, tp, dtype=np.float32):
    layout = partition.make_layout(reader.config, stages, tp)
    return PipelineModel(reader.config, layout, partition.make_mesh(layout, jax.devices()), dtype)


def loaded(params) -> dict[str, np.ndarray]:
    return {path: np.asarray(a) for path, a in flatten_paths(params).items()}


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        assert got[path].shape == want[path].shape, path
        # Compare bytes: bit-identical, NaN payloads and signed zeros included.
        assert np.array_equal(got[path].view(np.uint8), want[path].view(np.uint8)), path


def convert_quietly(src, dst, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny checkpoints' tokenizers are fine; no warning expected
        return convert_checkpoint(src, dst, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (module scope: built once)


@pytest.fixture(scope="module")
def hf_a(tiny_checkpoint):
    return tiny_checkpoint(**VARIANT_A)[0]


@pytest.fixture(scope="module")
def hf_a_index(tiny_checkpoint):
    path = tiny_checkpoint(**VARIANT_A, max_shard_size="200KB")[0]
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def hf_b(tiny_checkpoint):
    return tiny_checkpoint(**VARIANT_B)[0]


@pytest.fixture(scope="module")
def jp_a(tmp_path_factory, hf_a):
    return Path(convert_quietly(hf_a, tmp_path_factory.mktemp("jp_a") / "f32"))


@pytest.fixture(scope="module")
def jp_a_bf16(tmp_path_factory, hf_a):
    return Path(convert_quietly(hf_a, tmp_path_factory.mktemp("jp_a") / "bf16", dtype="bfloat16"))


@pytest.fixture(scope="module")
def references():
    """Per checkpoint path, its reads cached across layouts."""
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = CachedReads(open_checkpoint(path))
        return cache[path]

    return get


def check_layout(path, stages, tp, references, dtype=np.float32):
    reads = references(path)
    model = build_model(reads.reader, stages, tp, dtype)
    params = loading.load_params(open_checkpoint(path), model)
    assert_same(loaded(params), reference_params(reads, model))


# ----------------------------------------------------------------------------------------------------------
# Bit-identical parameters


@pytest.mark.parametrize("layout", list(LAYOUTS_A))
def test_hf_one_file(layout, hf_a, references):
    check_layout(hf_a, *LAYOUTS_A[layout], references)


@pytest.mark.parametrize("layout", ["1", "pp3", "pp2xtp3"])
def test_hf_several_files(layout, hf_a_index, references):
    check_layout(hf_a_index, *LAYOUTS_A[layout], references)


@pytest.mark.parametrize("layout", list(LAYOUTS_B))
def test_hf_tensor_parallel_and_replicated_kv(layout, hf_b, references):
    check_layout(hf_b, *LAYOUTS_B[layout], references)


@pytest.mark.parametrize("layout", ["1", "pp2", "tp3", "pp2xtp3"])
def test_jaxpipe_dir(layout, jp_a, references):
    check_layout(jp_a, *LAYOUTS_A[layout], references)


@pytest.mark.parametrize("run_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["1", "pp2xtp3"])
def test_jaxpipe_bf16_dir(layout, run_dtype, jp_a_bf16, references):
    # bfloat16 runs as stored (no float32 detour); float32 converts exactly, as the old loader did.
    dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[run_dtype]
    check_layout(jp_a_bf16, *LAYOUTS_A[layout], references, dtype=dtype)


@pytest.mark.parametrize("layout", ["1", "pp2xtp3"])
def test_gguf(layout, smollm2_gguf, references):
    check_layout(smollm2_gguf, *LAYOUTS_A[layout], references)


def test_no_float32_detour(jp_a_bf16, monkeypatch):
    """Stored bfloat16 run as bfloat16: every copy goes from bfloat16 file views into bfloat16 host blocks,
    and only those blocks go to the devices."""
    reader = open_checkpoint(jp_a_bf16)
    model = build_model(reader, 2, 3, ml_dtypes.bfloat16)
    copies, puts = [], []
    real_copy, real_put = loading.copy_into, jax.device_put

    def copy_into(dst, src):
        copies.append((src.dtype, dst.dtype))
        real_copy(dst, src)

    def device_put(x, device):
        puts.append(x.dtype)
        return real_put(x, device)

    monkeypatch.setattr(loading, "copy_into", copy_into)
    monkeypatch.setattr(jax, "device_put", device_put)
    params = loading.load_params(reader, model)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert copies and set(copies) == {(bf16, bf16)}
    assert puts and set(puts) == {bf16}
    assert all(a.dtype == bf16 for a in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------------------
# Each byte once


@pytest.mark.parametrize("fixture,layout", [("hf_b", "tp2"), ("hf_a", "tp3"), ("hf_b", "tp4"),
                                            ("hf_b", "pp2xtp2"), ("hf_a", "pp2xtp3"), ("jp_a", "pp2xtp3")])
def test_each_byte_read_once(fixture, layout, request):
    path = request.getfixturevalue(fixture)
    reader = CountingReader(open_checkpoint(path))
    stages, tp = {**LAYOUTS_A, **LAYOUTS_B}[layout]
    loading.load_params(reader, build_model(reader, stages, tp))
    assert set(reader.counts) == {split_key(k) for k in reader.tensor_names()}, "every tensor is read"
    for key, counts in reader.counts.items():
        assert counts.min() == 1 and counts.max() == 1, (key, counts.min(), counts.max())


def test_one_process_reads_only_its_part(hf_b):
    """plan_blocks for the devices of one (stage, tensor shard): what that process would read."""
    reader = open_checkpoint(hf_b)
    model = build_model(reader, 2, 2)
    cfg, layout, mesh = reader.config, model.layout, model.mesh
    rows = model.vocab_padded // 2
    for s in range(2):
        layers = range(layout.layer_offsets[s], layout.layer_offsets[s] + layout.layer_counts[s])
        for t in range(2):
            bounds = loading.read_bounds(loading.plan_blocks(reader, model, devices=[mesh.devices[s, t]]))
            assert {layer for _, layer in bounds if layer is not None} == set(layers)
            half = cfg.q_size // 2
            assert bounds[("wq", layers[0])] == ((0, cfg.hidden_size), (t * half, (t + 1) * half))
            assert bounds[("wo", layers[0])] == ((t * half, (t + 1) * half), (0, cfg.hidden_size))
            # The embedding on the first stage, the lm_head on the last: each split over tensor only.
            name = "embed" if s == 0 or cfg.tie_word_embeddings else "lm_head"
            assert bounds[(name, None)][0] == (t * rows, min((t + 1) * rows, cfg.vocab_size))
            if not cfg.tie_word_embeddings:
                assert ("lm_head" if s == 0 else "embed", None) not in bounds


# ----------------------------------------------------------------------------------------------------------
# Progress and errors


def test_progress_callable_once_per_parameter(hf_a):
    reader = open_checkpoint(hf_a)
    model = build_model(reader, 2, 3)
    seen = []
    loading.load_params(reader, model, progress=seen.append)
    assert sorted(seen) == sorted(flatten_paths(model.abstract_params))


def test_progress_bar_in_bytes(hf_a, capsys):
    reader = open_checkpoint(hf_a)
    loading.load_params(reader, build_model(reader, 1, 1), progress=True)
    err = capsys.readouterr().err
    assert "loading weights" in err and "B/s" in err and "100%" in err


def test_corrupt_tensor_fails_with_one_line_after_the_bar(jp_a, tmp_path, capsys):
    d = Path(shutil.copytree(jp_a, tmp_path / "jp"))
    f = d / "layer-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    reader = open_checkpoint(d)  # headers and sizes still agree: found by the checksums
    reader.checksums = True
    with pytest.raises(CheckpointError) as e:
        loading.load_params(reader, build_model(reader, 2, 3), progress=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "layer-00003.safetensors" in msg and "checksum" in msg and "delete it and convert again" in msg
    assert str(d) in msg
    err = capsys.readouterr().err
    assert "loading weights" in err and err.endswith("\n"), repr(err[-80:])  # the bar's line is ended
    # Checksums are off by default (they would double the load on a CPU): the same directory loads, and
    # jaxpipe verify DIR finds the damage.
    reader = open_checkpoint(d)
    loading.load_params(reader, build_model(reader, 1, 1))
    with pytest.raises(CheckpointError, match=r"1 of \d+ tensors fail their checksum: layers\.3\."):
        reader.verify()


def test_workers_and_small_host_budget_give_the_same(hf_a, references):
    reads = references(hf_a)
    model = build_model(reads.reader, 2, 3)
    params = loading.load_params(open_checkpoint(hf_a), model, workers=1, host_bytes=1)
    assert_same(loaded(params), reference_params(reads, model))
