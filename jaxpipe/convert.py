"""``jaxpipe convert SRC DST``: write a jaxpipe checkpoint directory.

Layout of DST, chosen so that a pipeline stage reads only its own layers' bytes:

    config.json                 LlamaConfig.to_hf_dict()
    tokenizer files             tokenizer.save_pretrained (for GGUF: an HF tokenizer with chat template)
    globals.safetensors         embed, final_norm, lm_head (when untied)
    layer-00000.safetensors...  one file per decoder layer, canonical names "layers.N.wq", ...
    jaxpipe_manifest.json       {"format": "jaxpipe", "version": 1, "dtype": ..., "tensors": {name:
                                 {"file", "shape", "dtype", "crc32"}}}

DST is written into a temporary sibling directory and renamed into place at the end, so a failed or
interrupted conversion never leaves a half-written DST behind.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import struct
import tempfile
import warnings
import zlib
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxpipe.checkpoint import (
    GLOBALS_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SAFETENSORS_DTYPES, CheckpointReader, Key,
    key_name, layer_file, open_checkpoint, split_key)
from jaxpipe.errors import CheckpointError

DTYPE_CHOICES = ("bfloat16", "float32", "float16")
_TARGET_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
                  "float16": np.dtype(np.float16)}
_SAFETENSORS_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}

# One tensor to write: (name in the file, shape, dtype, a function that reads it).
_TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def convert_checkpoint(src: str | os.PathLike | CheckpointReader, dst: str | os.PathLike,
                       dtype: str | None = "bfloat16", force: bool = False, progress: bool = True) -> str:
    """Convert an HF directory, GGUF file or jaxpipe directory at ``src`` (or an already opened
    ``CheckpointReader``) into a jaxpipe directory.

    ``dtype`` is "bfloat16", "float32", "float16", or None to keep each tensor's stored dtype (float32
    for dequantized GGUF). An existing ``dst`` is refused unless ``force``, in which case it is replaced
    only once the new one is complete. Returns the absolute path of ``dst``.
    """
    if dtype is not None and dtype not in _TARGET_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES} or None (keep), got {dtype!r}")
    target = None if dtype is None else _TARGET_DTYPES[dtype]
    # Opening validates the whole source before anything is written.
    reader = src if isinstance(src, CheckpointReader) else open_checkpoint(src)
    dst = os.path.abspath(os.fspath(dst))
    if os.path.realpath(dst) == os.path.realpath(reader.path):
        raise CheckpointError(f"{dst}: destination is the source checkpoint; choose another directory")
    if os.path.lexists(dst) and not force:
        raise CheckpointError(f"{dst} already exists; pass --force (force=True) to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        _write_jaxpipe_dir(reader, tmp, target, progress)
        _move_into_place(tmp, dst)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_jaxpipe_dir(reader: CheckpointReader, out: str, target: np.dtype | None, progress: bool) -> None:
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(reader.config.to_hf_dict(), f, indent=2)
    try:
        tokenizer = reader.load_tokenizer()
    except CheckpointError as e:
        warnings.warn(f"{reader.path} has no tokenizer, so the converted checkpoint will have none: {e}")
    else:
        tokenizer.save_pretrained(out)

    # Group the tensors by destination file: the globals first, then one file per layer.
    groups: dict[str, list[Key]] = {}
    for key in reader.tensor_names():
        layer = split_key(key)[1]
        groups.setdefault(GLOBALS_FILE if layer is None else layer_file(layer), []).append(key)

    entries: dict[str, dict] = {}
    dtypes_written = set()
    with tqdm(total=len(reader.tensor_names()), unit="tensor", desc="convert", disable=not progress) as bar:
        for filename, keys in groups.items():
            specs: list[_TensorSpec] = []
            for key in keys:
                name, layer = split_key(key)
                dt = target if target is not None else reader.dtype(name, layer)
                specs.append((key_name(key), reader.shape(name, layer), dt, _reader_fn(reader, key, dt)))
            crcs = _write_safetensors(os.path.join(out, filename), specs, on_tensor=bar.update)
            for name, shape, dt, _ in specs:
                entries[name] = {"file": filename, "shape": list(shape), "dtype": dt.name, "crc32": crcs[name]}
                dtypes_written.add(dt.name)

    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "dtype": dtypes_written.pop() if len(dtypes_written) == 1 else "mixed", "tensors": entries}
    # The manifest goes last: a directory with a manifest is a complete one.
    with open(os.path.join(out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)


def _reader_fn(reader: CheckpointReader, key: Key, dt: np.dtype) -> Callable[[], np.ndarray]:
    name, layer = split_key(key)
    # astype through ml_dtypes handles bfloat16 both ways with round-to-nearest-even.
    return lambda: reader.read(name, layer).astype(dt, copy=False)


def _write_safetensors(path: str, specs: list[_TensorSpec],
                       on_tensor: Callable[[], object] = lambda: None) -> dict[str, int]:
    """Stream tensors into a safetensors file one at a time (the header only needs shapes and dtypes,
    so at most one tensor is in memory). Returns the crc32 of each tensor's bytes."""
    header: dict[str, dict] = {}
    offset = 0
    for name, shape, dt, _ in specs:
        nbytes = int(np.prod(shape)) * dt.itemsize
        header[name] = {"dtype": _SAFETENSORS_CODES[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format recommends 8-byte alignment of the data section
    crcs: dict[str, int] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dt, read in specs:
            arr = read()
            if arr.shape != tuple(shape) or arr.dtype != dt:
                raise CheckpointError(f"{path}: tensor {name} came out as {arr.dtype} {list(arr.shape)}, "
                                      f"expected {dt.name} {list(shape)}")
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # little-endian, as safetensors wants
            crcs[name] = zlib.crc32(data)
            f.write(data)
            on_tensor()
    return crcs


def _move_into_place(tmp: str, dst: str) -> None:
    """Rename the finished ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and deleted only
    after the rename succeeded (restored if it failed)."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    old = f"{dst}.old-{secrets.token_hex(4)}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


# ----------------------------------------------------------------------------------------------------------
# Command line (shared by tools/convert_checkpoint.py and `jaxpipe convert`)


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``SRC DST [--dtype] [--force] [--quiet]`` arguments of the convert command."""
    parser.add_argument("src", metavar="SRC", help="HF safetensors directory, .gguf file or jaxpipe directory")
    parser.add_argument("dst", metavar="DST", help="jaxpipe checkpoint directory to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES + ("keep",), default="bfloat16",
                        help="dtype of the written weights; 'keep' keeps the source's (default: bfloat16)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the convert command from parsed arguments; returns the exit status. Errors (``JaxpipeError``)
    propagate so the caller decides how to report them."""
    dst = convert_checkpoint(args.src, args.dst, dtype=None if args.dtype == "keep" else args.dtype,
                             force=args.force, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {dst}")
    return 0
