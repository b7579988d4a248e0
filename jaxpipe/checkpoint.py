"""Checkpoint readers: Hugging Face safetensors directories, GGUF files and jaxpipe directories.

Every reader yields jaxpipe's canonical tensors (names and layouts in docs/DESIGN.md) as numpy arrays.
``open_checkpoint`` validates everything that is cheap (config, tensor names, shapes, dtypes, file sizes)
before any tensor data is read; afterwards readers stay lazy and read one tensor (or a few vocab rows)
per call, so no reader ever holds a whole model in memory.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from typing import Any, Union

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxpipe.config import LlamaConfig
from jaxpipe.errors import CheckpointError

# A canonical tensor key: "embed" for a global tensor, ("wq", 3) for a per-layer one.
Key = Union[str, tuple[str, int]]

GLOBAL_NAMES = ("embed", "final_norm", "lm_head")
LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo",
               "mlp_norm", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
VOCAB_NAMES = ("embed", "lm_head")  # [V, H] tensors that may be read a slice of rows at a time
# HF and GGUF store these matrices [out, in] (nn.Linear.weight); jaxpipe keeps them [in, out].
TRANSPOSED_NAMES = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})

MANIFEST_FILE = "jaxpipe_manifest.json"
MANIFEST_FORMAT = "jaxpipe"
MANIFEST_VERSION = 1
GLOBALS_FILE = "globals.safetensors"

_WHAT_IS_EXPECTED = ("expected a Hugging Face checkpoint directory (config.json + *.safetensors), "
                     "a .gguf file, or a jaxpipe directory written by `jaxpipe convert`")

_HF_GLOBAL = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias",
}
_HF_LAYER_TENSOR = re.compile(r"model\.layers\.\d+\.")

_GGUF_GLOBAL = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias", "bo": "attn_output.bias",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "b_gate": "ffn_gate.bias", "b_up": "ffn_up.bias", "b_down": "ffn_down.bias",
}

# safetensors dtype codes jaxpipe reads, and the numpy dtypes they become (bf16 via ml_dtypes).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
}
# The same dtypes by numpy name ("bfloat16", "float32", ...), as the jaxpipe manifest records them.
DTYPES_BY_NAME: dict[str, np.dtype] = {dt.name: dt for dt in SAFETENSORS_DTYPES.values()}


# ----------------------------------------------------------------------------------------------------------
# Canonical names and shapes


def expected_tensors(config: LlamaConfig) -> dict[Key, tuple[int, ...]]:
    """Every canonical tensor a checkpoint for ``config`` must hold, with its canonical shape.

    Global tensors come first ("embed", "final_norm", "lm_head" unless tied), then each layer's
    tensors keyed ``(name, layer)`` in ``LAYER_NAMES`` order; biases only where the config asks for them.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    out: dict[Key, tuple[int, ...]] = {"embed": (v, h), "final_norm": (h,)}
    if not config.tie_word_embeddings:
        out["lm_head"] = (v, h)
    shapes = {"attn_norm": (h,), "wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h),
              "mlp_norm": (h,), "w_gate": (h, i), "w_up": (h, i), "w_down": (i, h)}
    if config.attention_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,), bo=(h,))
    if config.mlp_bias:
        shapes.update(b_gate=(i,), b_up=(i,), b_down=(h,))
    for layer in range(config.num_layers):
        for name in LAYER_NAMES:
            if name in shapes:
                out[(name, layer)] = shapes[name]
    return out


def split_key(key: Key) -> tuple[str, int | None]:
    """``"embed"`` -> ``("embed", None)``; ``("wq", 3)`` -> ``("wq", 3)`` (the arguments of ``read``)."""
    return (key, None) if isinstance(key, str) else key


def key_name(key: Key) -> str:
    """The flat name jaxpipe directories use in files and the manifest: ``embed``, ``layers.3.wq``."""
    name, layer = split_key(key)
    return name if layer is None else f"layers.{layer}.{name}"


def layer_file(layer: int) -> str:
    """The jaxpipe weights file that holds one layer's tensors."""
    return f"layer-{layer:05d}.safetensors"


def _stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape as HF/GGUF store it (matrices [out, in])."""
    return shape[::-1] if name in TRANSPOSED_NAMES else shape


def _hf_name(key: Key) -> str:
    name, layer = split_key(key)
    return _HF_GLOBAL[name] if layer is None else f"model.layers.{layer}.{_HF_LAYER[name]}"


def _gguf_name(key: Key) -> str:
    name, layer = split_key(key)
    return _GGUF_GLOBAL[name] if layer is None else f"blk.{layer}.{_GGUF_LAYER[name]}"


# ----------------------------------------------------------------------------------------------------------
# The reader interface


class CheckpointReader:
    """Lazy access to a checkpoint's canonical tensors. Get one with ``open_checkpoint``."""

    kind: str = ""

    def __init__(self, path: str, config: LlamaConfig) -> None:
        self.path = path
        self.config = config
        self._expected = expected_tensors(config)

    def tensor_names(self) -> list[Key]:
        """Canonical keys of every tensor this checkpoint holds (``expected_tensors`` order)."""
        return list(self._expected)

    def shape(self, name: str, layer: int | None = None) -> tuple[int, ...]:
        """Canonical shape of one tensor, without reading it."""
        return self._expected[self._key(name, layer)]

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        """The numpy dtype ``read`` returns for this tensor, without reading it."""
        raise NotImplementedError

    def read(self, name: str, layer: int | None = None, rows: slice | None = None) -> np.ndarray:
        """Read one canonical tensor. ``layer`` is required for per-layer tensors; ``rows=slice(a, b)``
        reads only rows a:b of ``embed``/``lm_head`` (the vocabulary axis)."""
        key = self._key(name, layer)
        if rows is not None:
            if name not in VOCAB_NAMES:
                raise CheckpointError(f"rows= only applies to {VOCAB_NAMES}, not {name!r}")
            if not isinstance(rows, slice) or rows.step not in (None, 1):
                raise CheckpointError(f"rows must be a contiguous slice(start, stop), got {rows!r}")
        return self._read(key, rows)

    def load_tokenizer(self) -> Any:
        """A transformers tokenizer built from the checkpoint's own files (never the hub)."""
        raise NotImplementedError

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        raise NotImplementedError

    def _key(self, name: str, layer: int | None) -> Key:
        """Check a (name, layer) request against the config and turn it into a key."""
        if name in GLOBAL_NAMES:
            if layer is not None:
                raise CheckpointError(f"{name!r} is a global tensor; do not pass layer={layer}")
            if name == "lm_head" and self.config.tie_word_embeddings:
                raise CheckpointError(f"{self.path}: lm_head is tied to the embedding; read 'embed' instead")
            return name
        if name not in LAYER_NAMES:
            raise CheckpointError(f"unknown tensor name {name!r}; canonical names are "
                                  f"{GLOBAL_NAMES + LAYER_NAMES}")
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.config.num_layers:
            raise CheckpointError(f"{name!r} needs layer in [0, {self.config.num_layers}), got {layer!r}")
        layer = int(layer)
        if (name, layer) not in self._expected:
            raise CheckpointError(f"{self.path}: this model has no {name!r} (the config has "
                                  f"attention_bias={self.config.attention_bias}, "
                                  f"mlp_bias={self.config.mlp_bias})")
        return (name, layer)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind!r} path={self.path!r}>"


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open and validate a checkpoint: an HF safetensors directory, a GGUF file or a jaxpipe directory.

    Raises ``CheckpointError`` (or ``ConfigError`` for an unsupported config.json) naming the file and
    tensor at fault; no tensor data is read before validation passes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; {_WHAT_IS_EXPECTED}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            return JaxpipeReader(path)
        return HFReader(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFCheckpointReader(path)
    raise CheckpointError(f"{path} is a file without the GGUF magic bytes; {_WHAT_IS_EXPECTED}")


def _load_local_tokenizer(directory: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is wanted

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: no usable tokenizer files ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------------------
# safetensors (HF and jaxpipe directories)


def read_safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse a safetensors header into ``{name: (dtype code, shape)}`` without reading tensor data.

    Raises ``CheckpointError`` naming the file when the header is unreadable or says that tensor data
    extends past the end of the file (a truncated download or copy).
    """
    size = os.path.getsize(path)
    hint = "the file looks truncated or corrupt; re-download or re-convert it"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short for a safetensors header; {hint}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: header claims {header_len} bytes but the file has {size}; {hint}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        entries = {name: (info["dtype"], tuple(int(d) for d in info["shape"]),
                          (int(info["data_offsets"][0]), int(info["data_offsets"][1])))
                   for name, info in header.items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e}); {hint}") from None
    data_size = size - 8 - header_len
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} extends to byte {8 + header_len + end} but the file has only "
                f"{size} bytes; {hint}")
        if dtype in SAFETENSORS_DTYPES and end - begin != int(np.prod(shape)) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes of data, which does not "
                                  f"match {dtype} {list(shape)}; {hint}")
        out[name] = (dtype, shape)
    return out


def _read_safetensor(file: str, name: str, rows: slice | None) -> np.ndarray:
    with safe_open(file, framework="numpy") as f:
        # get_slice reads only the requested rows from the memory map.
        return f.get_slice(name)[rows] if rows is not None else f.get_tensor(name)


class HFReader(CheckpointReader):
    """A Hugging Face Llama directory: config.json plus one or several *.safetensors files."""

    kind = "hf"

    def __init__(self, path: str) -> None:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path}: no config.json; {_WHAT_IS_EXPECTED}")
        super().__init__(path, LlamaConfig.from_json(config_path))
        # HF tensor name -> (file, dtype code, stored shape)
        self._where: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        self._scan_files()
        self._validate()

    def _scan_files(self) -> None:
        index_path = os.path.join(self.path, "model.safetensors.index.json")
        weight_map: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = dict(json.load(f)["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: unreadable index ({e}); the file may be truncated") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files; jaxpipe reads HF checkpoints in "
                                  "safetensors format only (not pytorch_model.bin)")
        for filename in files:
            file = os.path.join(self.path, filename)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: listed in {index_path} but missing")
            for name, (dtype, shape) in read_safetensors_header(file).items():
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {name} also appears in {self._where[name][0]}")
                self._where[name] = (file, dtype, shape)
        for name, filename in weight_map.items():
            found_in = self._where[name][0] if name in self._where else None
            if found_in != os.path.join(self.path, filename):
                raise CheckpointError(f"{index_path}: lists tensor {name} in {filename}, which lacks it")

    def _validate(self) -> None:
        wanted = set()
        for key, shape in self._expected.items():
            hf, stored = _hf_name(key), _stored_shape(split_key(key)[0], shape)
            wanted.add(hf)
            if hf not in self._where:
                files = sorted({os.path.basename(w[0]) for w in self._where.values()})
                raise CheckpointError(f"{self.path}: tensor {hf} (jaxpipe {key_name(key)}, expected shape "
                                      f"{list(stored)}) is missing from {files}")
            file, dtype, found = self._where[hf]
            if found != stored:
                raise CheckpointError(f"{file}: tensor {hf} has shape {list(found)}, expected {list(stored)} "
                                      "from config.json")
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {hf} has dtype {dtype}; jaxpipe reads "
                                      f"{sorted(SAFETENSORS_DTYPES)} only")
        for name, (file, _, _) in self._where.items():
            # Non-layer extras (a duplicate lm_head of a tied model) and rotary buffers are harmless; any
            # other layer tensor means the config describes a different model than the weights.
            if name not in wanted and _HF_LAYER_TENSOR.match(name) and not name.endswith("rotary_emb.inv_freq"):
                c = self.config
                raise CheckpointError(
                    f"{file}: unexpected tensor {name}; config.json (num_hidden_layers={c.num_layers}, "
                    f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}) has no place for it")

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        return SAFETENSORS_DTYPES[self._where[_hf_name(self._key(name, layer))][1]]

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        hf = _hf_name(key)
        arr = _read_safetensor(self._where[hf][0], hf, rows)
        if split_key(key)[0] in TRANSPOSED_NAMES:
            arr = arr.T
        return np.ascontiguousarray(arr)

    def load_tokenizer(self) -> Any:
        return _load_local_tokenizer(self.path)


# ----------------------------------------------------------------------------------------------------------
# jaxpipe directories (written by jaxpipe.convert)


class JaxpipeReader(CheckpointReader):
    """A jaxpipe directory: config.json, tokenizer files, globals.safetensors, one file per layer and a
    manifest with every tensor's file, shape, dtype and crc32 (checked on each full read)."""

    kind = "jaxpipe"

    def __init__(self, path: str) -> None:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path}: no config.json; a jaxpipe directory needs one next to {MANIFEST_FILE}")
        super().__init__(path, LlamaConfig.from_json(config_path))
        self._manifest_path = os.path.join(path, MANIFEST_FILE)
        self._entries = self._load_manifest()
        self._validate()

    def _load_manifest(self) -> dict[str, dict[str, Any]]:
        mpath = self._manifest_path
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{mpath}: not valid JSON ({e}); the file may be truncated") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{mpath}: not a jaxpipe manifest (format must be {MANIFEST_FORMAT!r})")
        if manifest.get("version") != MANIFEST_VERSION:
            raise CheckpointError(f"{mpath}: manifest version {manifest.get('version')!r} is not supported "
                                  f"(this jaxpipe reads version {MANIFEST_VERSION}); re-run jaxpipe convert")
        tensors = manifest.get("tensors")
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{mpath}: manifest has no 'tensors' table")
        return tensors

    def _validate(self) -> None:
        mpath = self._manifest_path
        codes = {dt.name: code for code, dt in SAFETENSORS_DTYPES.items()}
        wanted = {key_name(key): shape for key, shape in self._expected.items()}
        extra = sorted(set(self._entries) - set(wanted))
        if extra:
            raise CheckpointError(f"{mpath}: unexpected tensor {extra[0]} for the model in config.json")
        headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for name, shape in wanted.items():
            entry = self._entries.get(name)
            if entry is None:
                raise CheckpointError(f"{mpath}: tensor {name} (expected shape {list(shape)}) is missing")
            try:
                filename, found, dtype = entry["file"], tuple(entry["shape"]), entry["dtype"]
                int(entry["crc32"])  # compared with the data on each read
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{mpath}: entry for tensor {name} lacks file/shape/dtype/crc32") from None
            if os.path.basename(filename) != filename:
                raise CheckpointError(f"{mpath}: tensor {name} points outside the directory ({filename!r})")
            file = os.path.join(self.path, filename)
            if found != shape:
                raise CheckpointError(f"{mpath}: tensor {name} in {filename} has shape {list(found)}, "
                                      f"expected {list(shape)} from config.json")
            if dtype not in codes:
                raise CheckpointError(f"{mpath}: tensor {name} has unsupported dtype {dtype!r}")
            if filename not in headers:
                if not os.path.isfile(file):
                    raise CheckpointError(f"{file}: missing (the manifest lists tensor {name} in it)")
                headers[filename] = read_safetensors_header(file)
            if headers[filename].get(name) != (codes[dtype], shape):
                raise CheckpointError(f"{file}: tensor {name} is missing or disagrees with {mpath} "
                                      f"(file has {headers[filename].get(name)}, manifest says "
                                      f"{codes[dtype]} {list(shape)})")

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        return DTYPES_BY_NAME[self._entries[key_name(self._key(name, layer))]["dtype"]]

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        name = key_name(key)
        entry = self._entries[name]
        file = os.path.join(self.path, entry["file"])
        arr = _read_safetensor(file, name, rows)
        # A partial read cannot be checked against the whole tensor's checksum (that would mean reading
        # the whole tensor, which rows= exists to avoid); full reads always are.
        if rows is None:
            crc = zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            if crc != int(entry["crc32"]):
                raise CheckpointError(
                    f"{file}: tensor {name} fails its checksum (crc32 {crc}, manifest says {entry['crc32']}); "
                    "the file is corrupt: re-run jaxpipe convert")
        return arr

    def load_tokenizer(self) -> Any:
        return _load_local_tokenizer(self.path)


# ----------------------------------------------------------------------------------------------------------
# GGUF files


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of attn_q/attn_k (weights or biases):
    GGUF row ``h*D + 2*i + p`` holds HF row ``h*D + p*D/2 + i``."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(value: Any) -> float:
    # GGUF stores floats as float32; the shortest float32 repr gives 1e-05 rather than 9.999999747e-06.
    return float(str(np.float32(value)))


class GGUFCheckpointReader(CheckpointReader):
    """A llama.cpp GGUF file (architecture 'llama'), read through gguf's memory-mapped reader and
    dequantized to float32 one tensor per ``read``."""

    kind = "gguf"

    def __init__(self, path: str) -> None:
        from gguf import GGUFReader  # imported here: only GGUF users need it

        self.path = path  # error messages below need it before the base class is initialised
        try:
            self._gguf = GGUFReader(path, "r")
        except Exception as e:  # gguf raises assorted ValueError/KeyError/struct errors on bad bytes
            raise CheckpointError(f"{path}: cannot parse as GGUF ({type(e).__name__}: {e}); the file looks "
                                  "truncated or corrupt") from e
        self._tensors = {t.name: t for t in self._gguf.tensors}
        super().__init__(path, self._build_config())
        self._validate()

    def _field(self, key: str, default: Any = ...) -> Any:
        field = self._gguf.get_field(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _build_config(self) -> LlamaConfig:
        arch = self._field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported; jaxpipe runs 'llama'")
        heads = self._field("llama.attention.head_count")
        kv_heads = self._field("llama.attention.head_count_kv", heads)
        if isinstance(heads, list) or isinstance(kv_heads, list):
            raise CheckpointError(f"{self.path}: per-layer head counts are not supported")
        hidden = int(self._field("llama.embedding_length"))
        head_dim = int(self._field("llama.attention.key_length", hidden // int(heads)))
        rope_dim = int(self._field("llama.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise CheckpointError(f"{self.path}: partial rotary (rope.dimension_count {rope_dim} != head_dim "
                                  f"{head_dim}) is not supported")
        if "rope_freqs.weight" in self._tensors:
            # Llama 3.1-style scaling baked into a tensor; the original parameters are not recoverable.
            raise CheckpointError(f"{self.path}: has rope_freqs.weight (llama3 RoPE scaling); convert the "
                                  "original HF checkpoint instead")
        theta = _f32(self._field("llama.rope.freq_base", 10000.0))
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        scaling = self._field("llama.rope.scaling.type", "none")
        if scaling == "linear":
            rope.update(rope_type="linear", factor=_f32(self._field("llama.rope.scaling.factor")))
        elif scaling != "none":
            raise CheckpointError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
        vocab = self._field("llama.vocab_size", None)
        if vocab is None:
            tokens = self._gguf.get_field("tokenizer.ggml.tokens")
            if tokens is None:
                raise CheckpointError(f"{self.path}: neither llama.vocab_size nor tokenizer.ggml.tokens "
                                      "is present")
            vocab = len(tokens.data)
        # llama.cpp stops at end-of-turn (eot) as well as eos; chat models often set both.
        eos = [self._field("tokenizer.ggml.eos_token_id", None), self._field("tokenizer.ggml.eot_token_id", None)]
        eos_ids = [int(e) for i, e in enumerate(eos) if e is not None and e not in eos[:i]]
        bos = self._field("tokenizer.ggml.bos_token_id", None)
        hf = {
            "vocab_size": int(vocab), "hidden_size": hidden,
            "intermediate_size": int(self._field("llama.feed_forward_length")),
            "num_hidden_layers": int(self._field("llama.block_count")),
            "num_attention_heads": int(heads), "num_key_value_heads": int(kv_heads), "head_dim": head_dim,
            "rms_norm_eps": _f32(self._field("llama.attention.layer_norm_rms_epsilon")),
            "rope_parameters": rope,
            "max_position_embeddings": int(self._field("llama.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            # llama.cpp's llama architecture has optional biases; their presence is the only signal.
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": "blk.0.ffn_gate.bias" in self._tensors,
            "bos_token_id": None if bos is None else int(bos),
            "eos_token_id": eos_ids or None,
        }
        return LlamaConfig.from_hf_dict(hf, source=self.path)

    def _validate(self) -> None:
        wanted = set()
        for key, shape in self._expected.items():
            gname, stored = _gguf_name(key), _stored_shape(split_key(key)[0], shape)
            wanted.add(gname)
            tensor = self._tensors.get(gname)
            if tensor is None:
                raise CheckpointError(f"{self.path}: tensor {gname} (jaxpipe {key_name(key)}, expected shape "
                                      f"{list(stored)}) is missing")
            found = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
            if found != stored:
                raise CheckpointError(f"{self.path}: tensor {gname} has shape {list(found)}, expected "
                                      f"{list(stored)} from the GGUF metadata")
        extra = sorted(n for n in self._tensors if n.startswith("blk.") and n not in wanted)
        if extra:
            raise CheckpointError(f"{self.path}: unexpected tensor {extra[0]} for a llama model with "
                                  f"{self.config.num_layers} layers")

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        self._key(name, layer)
        return np.dtype(np.float32)

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        from gguf.quants import dequantize

        name = split_key(key)[0]
        gname = _gguf_name(key)
        tensor = self._tensors[gname]
        # Quantized data is laid out one row of blocks per numpy row, so slicing rows reads only those.
        data = tensor.data if rows is None else tensor.data[rows]
        try:
            arr = dequantize(data, tensor.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {gname} uses {tensor.tensor_type.name}, which gguf "
                                  f"cannot dequantize ({e})") from e
        if np.may_share_memory(arr, tensor.data):  # float tensors come back as views of the memmap
            arr = arr.copy()
        stored = _stored_shape(name, self._expected[key])
        arr = arr.astype(np.float32, copy=False).reshape((-1,) + stored[1:])
        if name in ("wq", "bq"):
            arr = _unpermute_rows(arr, self.config.num_heads)
        elif name in ("wk", "bk"):
            arr = _unpermute_rows(arr, self.config.num_kv_heads)
        if name in TRANSPOSED_NAMES:
            arr = arr.T
        return np.ascontiguousarray(arr)

    def load_tokenizer(self) -> Any:
        directory, filename = os.path.split(os.path.abspath(self.path))
        return _load_local_tokenizer(directory, gguf_file=filename)
