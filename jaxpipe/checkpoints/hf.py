"""Hugging Face Llama directories: config.json plus one or several ``*.safetensors`` files (with
``model.safetensors.index.json`` when several)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from jaxpipe import dtypes
from jaxpipe.checkpoints.base import (
    TRANSPOSED_NAMES, WHAT_IS_EXPECTED, CheckpointReader, Index, Key, copy_into, copy_tokenizer_files, key_name,
    load_local_tokenizer, split_key, stored_shape)
from jaxpipe.checkpoints.safetensors_file import SafetensorsFile
from jaxpipe.config import LlamaConfig
from jaxpipe.errors import CheckpointError

_GLOBAL = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias",
}
_LAYER_TENSOR = re.compile(r"model\.layers\.\d+\.")
_HINT = "re-download or re-save the checkpoint"


def hf_name(key: Key) -> str:
    """The HF tensor name of a canonical key: ``("wq", 3)`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    name, layer = split_key(key)
    return _GLOBAL[name] if layer is None else f"model.layers.{layer}.{_LAYER[name]}"


class HFReader(CheckpointReader):
    """A Hugging Face Llama directory. Tensors are read as views of the memory-mapped files; matrices come
    back as transposed views of their stored ``[out, in]`` bytes."""

    kind = "hf"

    def __init__(self, path: str) -> None:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path}: no config.json; {WHAT_IS_EXPECTED}")
        super().__init__(path, LlamaConfig.from_json(config_path))
        self._where: dict[str, SafetensorsFile] = {}  # HF tensor name -> its file
        self._files: list[SafetensorsFile] = []
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
            st = SafetensorsFile(file, _HINT)
            self._files.append(st)
            for name in st.tensors:
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {name} also appears in {self._where[name].path}")
                self._where[name] = st
        for name, filename in weight_map.items():
            found_in = self._where[name].path if name in self._where else None
            if found_in != os.path.join(self.path, filename):
                raise CheckpointError(f"{index_path}: lists tensor {name} in {filename}, which lacks it")

    def _validate(self) -> None:
        wanted = set()
        for key, shape in self._expected.items():
            hf, stored = hf_name(key), stored_shape(split_key(key)[0], shape)
            wanted.add(hf)
            if hf not in self._where:
                files = sorted({os.path.basename(st.path) for st in self._files})
                raise CheckpointError(f"{self.path}: tensor {hf} (jaxpipe {key_name(key)}, expected shape "
                                      f"{list(stored)}) is missing from {files}")
            st = self._where[hf]
            code, found = st.tensors[hf]
            if found != stored:
                raise CheckpointError(f"{st.path}: tensor {hf} has shape {list(found)}, expected {list(stored)} "
                                      "from config.json")
            if dtypes.from_safetensors(code) is None:
                raise CheckpointError(f"{st.path}: tensor {hf} has dtype {code}; jaxpipe reads "
                                      f"{list(dtypes.WEIGHT_CODES)} only")
        for name, st in self._where.items():
            # Non-layer extras (a duplicate lm_head of a tied model) and rotary buffers are harmless; any
            # other layer tensor means the config describes a different model than the weights.
            if name not in wanted and _LAYER_TENSOR.match(name) and not name.endswith("rotary_emb.inv_freq"):
                c = self.config
                raise CheckpointError(
                    f"{st.path}: unexpected tensor {name}; config.json (num_hidden_layers={c.num_layers}, "
                    f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}) has no place for it")

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        hf = hf_name(self._key(name, layer))
        return dtypes.from_safetensors(self._where[hf].tensors[hf][0])

    def _view(self, key: Key) -> np.ndarray:
        hf = hf_name(key)
        arr = self._where[hf].view(hf)
        return arr.T if split_key(key)[0] in TRANSPOSED_NAMES else arr

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        src = self._view(key)
        if rows is not None:
            src = src[rows]
        out = np.empty(src.shape, src.dtype)
        copy_into(out, src)
        return out

    def _read_slice(self, key: Key, index: Index) -> np.ndarray:
        return self._view(key)[index]

    def load_tokenizer(self) -> Any:
        return load_local_tokenizer(self.path)

    def save_tokenizer(self, directory: str) -> None:
        copy_tokenizer_files(self.path, directory)

    def close(self) -> None:
        for st in self._files:
            st.close()
