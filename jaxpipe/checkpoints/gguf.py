"""llama.cpp GGUF files (architecture 'llama'), read through gguf's memory-mapped reader and dequantized to
float32 one tensor per read; or, for a file whose decoder matrices are all Q8_0 and a model quantized as
q8_0 (``keep_quantized``), those matrices' blocks served as they are: int8 values and float16 scales."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from jaxpipe.checkpoints.base import (
    QUANTIZED_NAMES, SCALE_NAMES, TRANSPOSED_NAMES, CheckpointReader, Key, expected_tensors, key_name,
    load_local_tokenizer, one_line, split_key, stored_shape)
from jaxpipe.config import LlamaConfig
from jaxpipe.errors import CheckpointError

_GLOBAL = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
_LAYER = {
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias", "bo": "attn_output.bias",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "b_gate": "ffn_gate.bias", "b_up": "ffn_up.bias", "b_down": "ffn_down.bias",
}


def gguf_name(key: Key) -> str:
    """The GGUF tensor name of a canonical key: ``("wq", 3)`` -> ``blk.3.attn_q.weight``."""
    name, layer = split_key(key)
    return _GLOBAL[name] if layer is None else f"blk.{layer}.{_LAYER[name]}"


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of attn_q/attn_k (weights or biases):
    GGUF row ``h*D + 2*i + p`` holds HF row ``h*D + p*D/2 + i``."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(value: Any) -> float:
    # GGUF stores floats as float32; the shortest float32 repr gives 1e-05 rather than 9.999999747e-06.
    return float(str(np.float32(value)))


@functools.cache
def _reader_class() -> type:
    """gguf's ``GGUFReader`` parsing a plain ndarray view of its memory map. It reads the metadata (a
    tokenizer's ~100k strings) through a few slices per value, and ``np.memmap``'s Python-level slicing
    made opening SmolLM2's GGUF take 5.0 s (1.7 s this way, the same fields and tensors; 2-core CPU)."""
    from gguf import GGUFReader  # imported here: only GGUF users need it

    class Reader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


class GGUFCheckpointReader(CheckpointReader):
    """A llama.cpp GGUF file (architecture 'llama'), read through gguf's memory-mapped reader and
    dequantized to float32 one tensor per ``read``."""

    kind = "gguf"

    def __init__(self, path: str) -> None:
        self.path = path  # error messages below need it before the base class is initialised
        try:
            self._gguf = _reader_class()(path, "r")
        except Exception as e:  # gguf raises assorted ValueError/KeyError/struct errors on bad bytes
            raise CheckpointError(f"{path}: cannot parse as GGUF ({type(e).__name__}: {one_line(e)}); the file "
                                  "looks truncated or corrupt: re-download it") from e
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
            gname, stored = gguf_name(key), stored_shape(split_key(key)[0], shape)
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

    def keep_quantized(self, kind: str) -> bool:
        from gguf import GGMLQuantizationType

        if kind != "q8_0":
            return self.quantization == kind
        matrices = [k for k in self._expected if split_key(k)[0] in QUANTIZED_NAMES]
        if any(self._tensors[gguf_name(k)].tensor_type != GGMLQuantizationType.Q8_0 for k in matrices):
            return False
        self.quantization = kind
        self._expected = expected_tensors(self.config, kind)
        return True

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        self._key(name, layer)
        if name in SCALE_NAMES:
            return np.dtype(np.float16)
        if self.quantization is not None and name in QUANTIZED_NAMES:
            return np.dtype(np.int8)
        return np.dtype(np.float32)

    def _read_q8_0(self, key: Key) -> np.ndarray:
        """A Q8_0 matrix's values ``[in, out]`` int8, or (for ``<name>_scale``) its scales ``[in / 32, out]``
        float16, from the blocks as stored: each is 2 bytes of float16 scale, then 32 int8 values."""
        name, layer = split_key(key)
        matrix = name[:-len("_scale")] if name in SCALE_NAMES else name
        tensor = self._tensors[gguf_name((matrix, layer))]
        out_dim, in_dim = stored_shape(matrix, self.shape(matrix, layer))
        blocks = np.asarray(tensor.data).reshape(out_dim, in_dim // 32, 34)
        if matrix == name:
            arr = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(out_dim, in_dim)
        else:
            arr = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        if matrix == "wq":
            arr = _unpermute_rows(arr, self.config.num_heads)
        elif matrix == "wk":
            arr = _unpermute_rows(arr, self.config.num_kv_heads)
        return np.ascontiguousarray(arr.T)

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        from gguf.quants import dequantize

        name = split_key(key)[0]
        if self.quantization is not None and (name in QUANTIZED_NAMES or name in SCALE_NAMES):
            return self._read_q8_0(key)
        gname = gguf_name(key)
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
        stored = stored_shape(name, self._expected[key])
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
        return load_local_tokenizer(directory, gguf_file=filename)
