"""jaxpipe checkpoint directories (written by ``jaxpipe convert``).

Layout, chosen so that a pipeline stage reads only its own layers' files and every tensor is stored in the
orientation the model uses (matrices ``[in, out]``: a tensor-parallel shard is a plain strided copy)::

    config.json                 LlamaConfig.to_hf_dict()
    tokenizer files             tokenizer.save_pretrained
    globals.safetensors         embed, final_norm, lm_head (when untied)
    layer-00000.safetensors...  one file per decoder layer, canonical names "layers.N.wq", ...
    jaxpipe_manifest.json       {"format": "jaxpipe", "version": 1, "dtype": ..., "tensors": {name: entry}}

Each manifest entry is ``{"file", "shape", "dtype", "crc32"}``: the dtype is per tensor (``jaxpipe.dtypes``
names), so a directory may mix dtypes.

Quantized directories (``jaxpipe convert --quantization int8|fp8``): the manifest says ``"quantization":
"int8"`` (or ``"fp8"``); every ``QUANTIZED_NAMES`` matrix is stored in 8 bits (dtype ``int8`` or
``float8_e4m3fn``, ``[in, out]`` as always) and its entry's ``"scale"`` names the entry of its float32
per-output-channel scales ``layers.N.<name>_scale [out]`` (same file), with ``w ~= q * scale`` column by column
(``jaxpipe.quantize``). ``"quantization": "q8_0"``: ``int8`` values and float16 scales
``layers.N.<name>_scale [in / 32, out]``, one per 32 input rows of a column. Everything else stays in a float
dtype. jaxpipe versions before quantization refuse
such entries (they have a ``"scale"``) with an error saying so.

Integrity: opening checks the manifest against every file's safetensors header (names, dtypes, shapes) and
safetensors checks that each file's size matches its header, so a truncated, missing or mismatched file is
refused before any weight is read, with an error naming the directory to delete. The crc32 of every tensor,
recorded by ``jaxpipe convert`` from the bytes it wrote, is compared by ``verify()`` (``jaxpipe verify DIR``),
and on each whole read when ``checksums = True``. Not on every load by default, by measurement: on the
2-core development machine, loading a 2.4 GB directory took 3.5-4.6 s without and 6.5-7.8 s with the
checksums (zlib's crc32 runs at about the speed of the copies themselves; BENCHMARKS.md, 2026-12-01).
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from jaxpipe import dtypes
from jaxpipe.checkpoints.base import (
    QUANTIZED_NAMES, SCALE_NAMES, CheckpointReader, Index, Key, copy_tokenizer_files, is_whole, key_name,
    load_local_tokenizer, scale_name)
from jaxpipe.checkpoints.safetensors_file import SafetensorsFile
from jaxpipe.config import LlamaConfig
from jaxpipe.errors import CheckpointError
from jaxpipe.quantize import QUANT_KINDS, SAFETENSORS_CODES, quant_dtype, scale_dtype, storage_dtype

MANIFEST_FILE = "jaxpipe_manifest.json"
MANIFEST_FORMAT = "jaxpipe"
MANIFEST_VERSION = 1
GLOBALS_FILE = "globals.safetensors"
_ENTRY_KEYS = ("file", "shape", "dtype", "crc32")


def layer_file(layer: int) -> str:
    """The jaxpipe weights file that holds one layer's tensors."""
    return f"layer-{layer:05d}.safetensors"


def checksum(arr: np.ndarray) -> int:
    """The crc32 a manifest records for a tensor: of its bytes in C order (zlib; releases the GIL)."""
    return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def entry_dtype(name: str) -> np.dtype:
    """The numpy dtype a manifest names: a float (``jaxpipe.dtypes``) or an 8-bit storage dtype."""
    return storage_dtype(name) or dtypes.np_dtype(name)


def _safetensors_code(dt: np.dtype) -> str:
    return next((code for code, d in SAFETENSORS_CODES.items() if d == dt), None) or dtypes.safetensors_code(dt)


def looks_like_jaxpipe_dir(path: str) -> bool:
    """A directory holding jaxpipe weight files (with or without a manifest)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return GLOBALS_FILE in names or any(n.startswith("layer-") and n.endswith(".safetensors") for n in names)


class JaxpipeReader(CheckpointReader):
    """A jaxpipe directory. Set ``checksums = True`` to compare each tensor's crc32 with the manifest the
    first time it is read whole (``verify()`` checks them all)."""

    kind = "jaxpipe"
    checksums: bool = False

    def __init__(self, path: str) -> None:
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path}: no config.json next to {MANIFEST_FILE}; {self._fix}")
        config = LlamaConfig.from_json(config_path)
        self._manifest_path = os.path.join(path, MANIFEST_FILE)
        self._entries, quantization = self._load_manifest()
        super().__init__(path, config, quantization)
        self._files: dict[str, SafetensorsFile] = {}
        self._validate()
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    @property
    def _fix(self) -> str:
        return f"the jaxpipe directory {self.path} is damaged: delete it and convert again"

    def _load_manifest(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        mpath = self._manifest_path
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{mpath}: not valid JSON ({e}); {self._fix}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{mpath}: not a jaxpipe manifest (format must be {MANIFEST_FORMAT!r}); "
                                  f"{self._fix}")
        if manifest.get("version") != MANIFEST_VERSION:
            raise CheckpointError(f"{mpath}: manifest version {manifest.get('version')!r} is not supported "
                                  f"(this jaxpipe reads version {MANIFEST_VERSION}); delete {self.path} and "
                                  "convert again")
        tensors = manifest.get("tensors")
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{mpath}: manifest has no 'tensors' table; {self._fix}")
        quantization = manifest.get("quantization")
        if quantization is not None and quantization not in QUANT_KINDS:
            raise CheckpointError(f"{mpath}: quantization {quantization!r} is not one this jaxpipe reads "
                                  f"({', '.join(QUANT_KINDS)}); convert the original checkpoint again")
        return tensors, quantization

    def _validate(self) -> None:
        mpath = self._manifest_path
        wanted = {key_name(key): shape for key, shape in self._expected.items()}
        extra = sorted(set(self._entries) - set(wanted))
        if extra:
            raise CheckpointError(f"{mpath}: unexpected tensor {extra[0]} for the model in config.json; {self._fix}")
        for name, shape in wanted.items():
            entry = self._entries.get(name)
            if entry is None:
                raise CheckpointError(f"{mpath}: tensor {name} (expected shape {list(shape)}) is missing; "
                                      f"{self._fix}")
            try:
                filename, found, dtype = entry["file"], tuple(entry["shape"]), entry["dtype"]
                int(entry["crc32"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{mpath}: entry for tensor {name} lacks one of {list(_ENTRY_KEYS)}; "
                                      f"{self._fix}") from None
            self._check_quantized_entry(name, entry)
            if os.path.basename(filename) != filename:
                raise CheckpointError(f"{mpath}: tensor {name} points outside the directory ({filename!r})")
            if found != shape:
                raise CheckpointError(f"{mpath}: tensor {name} in {filename} has shape {list(found)}, "
                                      f"expected {list(shape)} from config.json; {self._fix}")
            try:
                code = _safetensors_code(entry_dtype(dtype))
            except (ValueError, TypeError, KeyError):
                raise CheckpointError(f"{mpath}: tensor {name} has unsupported dtype {dtype!r}") from None
            if filename not in self._files:
                file = os.path.join(self.path, filename)
                if not os.path.isfile(file):
                    raise CheckpointError(f"{file}: missing (the manifest lists tensor {name} in it); {self._fix}")
                self._files[filename] = SafetensorsFile(file, f"delete {self.path} and convert again")
            st = self._files[filename]
            if st.tensors.get(name) != (code, shape):
                raise CheckpointError(f"{st.path}: tensor {name} is missing or disagrees with {mpath} "
                                      f"(file has {st.tensors.get(name)}, manifest says {code} {list(shape)}); "
                                      f"{self._fix}")

    def _check_quantized_entry(self, name: str, entry: dict[str, Any]) -> None:
        """8-bit dtypes and ``"scale"`` links only where the manifest's quantization puts them."""
        mpath, kind = self._manifest_path, self.quantization
        parts = name.split(".")  # "embed" or "layers.N.name"
        base = parts[-1]
        dt = storage_dtype(str(entry["dtype"]))
        if kind is not None and base in QUANTIZED_NAMES:
            want = key_name((scale_name(base), int(parts[1])))
            if entry.get("scale") != want or dt != quant_dtype(kind):
                raise CheckpointError(f"{mpath}: tensor {name} of this {kind} checkpoint must be "
                                      f"{quant_dtype(kind).name} with \"scale\": {want!r}, got dtype "
                                      f"{entry['dtype']!r}, scale {entry.get('scale')!r}; {self._fix}")
        elif base in SCALE_NAMES and kind is not None and entry["dtype"] != scale_dtype(kind).name:
            raise CheckpointError(f"{mpath}: scales {name} of this {kind} checkpoint must be "
                                  f"{scale_dtype(kind).name}, got {entry['dtype']!r}; {self._fix}")
        elif "scale" in entry or dt is not None:
            what = ("the manifest names no quantization" if kind is None else
                    f"only {', '.join(QUANTIZED_NAMES)} are quantized")
            raise CheckpointError(f"{mpath}: tensor {name} is stored quantized (dtype {entry['dtype']!r}"
                                  f"{', with a scale' if 'scale' in entry else ''}), but {what}; {self._fix}")

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        return entry_dtype(self._entries[key_name(self._key(name, layer))]["dtype"])

    def _view(self, key: Key) -> np.ndarray:
        name = key_name(key)
        return self._files[self._entries[name]["file"]].view(name)

    def _check(self, key: Key, arr: np.ndarray) -> None:
        """Compare a whole tensor's bytes with its manifest crc32, once per reader."""
        name = key_name(key)
        if not self.checksums or name in self._verified:
            return
        entry = self._entries[name]
        crc = checksum(arr)
        if crc != int(entry["crc32"]):
            raise CheckpointError(
                f"{os.path.join(self.path, entry['file'])}: tensor {name} fails its checksum (crc32 {crc}, "
                f"manifest says {entry['crc32']}); {self._fix}")
        with self._lock:
            self._verified.add(name)

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        view = self._view(key)
        if rows is None:  # a partial read cannot be checked against the whole tensor's checksum
            self._check(key, view)
            return np.array(view)
        return np.array(view[rows])

    def _read_slice(self, key: Key, index: Index) -> np.ndarray:
        view = self._view(key)
        if is_whole(index, view.shape):
            self._check(key, view)
        return view[index]

    def verify(self, progress: Callable[[int], object] | None = None, workers: int | None = None) -> dict[str, Any]:
        """Check every tensor's crc32 in parallel; raises ``CheckpointError`` listing all bad tensors."""
        bad: list[str] = []

        def one(key: Key) -> int:
            name = key_name(key)
            view = self._view(key)
            entry = self._entries[name]
            if checksum(view) != int(entry["crc32"]):
                bad.append(f"{name} ({entry['file']})")
            if progress:
                progress(view.nbytes)
            return view.nbytes

        with ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as pool:
            total = sum(pool.map(one, self.tensor_names()))
        if bad:
            raise CheckpointError(f"{self.path}: {len(bad)} of {len(self._expected)} tensors fail their checksum: "
                                  f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}; {self._fix}")
        return {"tensors": len(self._expected), "bytes": total, "checksums": True}

    def load_tokenizer(self) -> Any:
        return load_local_tokenizer(self.path)

    def save_tokenizer(self, directory: str) -> None:
        copy_tokenizer_files(self.path, directory)

    def close(self) -> None:
        for st in self._files.values():
            st.close()
