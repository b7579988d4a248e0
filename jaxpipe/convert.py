"""``jaxpipe convert SRC DST``: write a jaxpipe checkpoint directory (layout in ``jaxpipe.checkpoints.native``);
``jaxpipe verify DIR``: check every tensor of a checkpoint.

``--quantization int8|fp8`` stores the decoder's matrices (``QUANTIZED_NAMES``) in 8 bits with their
per-output-channel float32 scales, quantized from the source's stored values exactly as ``LLM(...,
quantization=)`` quantizes them on load (``jaxpipe.quantize``), so loading the directory gives the same bits.
``--quantization q8_0``: int8 with a float16 scale per 32 input rows; a GGUF file whose matrices are Q8_0
gives its blocks as they are.

DST is written into a temporary sibling directory and renamed into place at the end, so a failed or
interrupted conversion never leaves a half-written DST behind. Layer files are written in parallel
(``safetensors.numpy.save_file`` releases the GIL), each with its tensors' crc32 computed from the bytes
written.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from safetensors.numpy import save_file

from jaxpipe import dtypes
from jaxpipe.checkpoints import (
    GLOBALS_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, QUANTIZED_NAMES, CheckpointReader, Key,
    checksum, expected_tensors, key_name, layer_file, open_checkpoint, scale_name, split_key)
from jaxpipe.errors import CheckpointError
from jaxpipe.quantize import QUANT_KINDS, quant_dtype, quantize_host, scale_dtype

DTYPE_CHOICES = dtypes.RUN_DTYPES
# Files being converted at once hold their tensors in memory: at most this many bytes of them.
_HOST_BYTES = 8 << 30


def convert_checkpoint(src: str | os.PathLike | CheckpointReader, dst: str | os.PathLike,
                       dtype: str | None = None, force: bool = False, progress: bool = True,
                       workers: int | None = None, quantization: str | None = None) -> str:
    """Convert an HF directory, GGUF file or jaxpipe directory at ``src`` (or an already opened
    ``CheckpointReader``) into a jaxpipe directory.

    ``dtype`` is None (the default) to keep each tensor's stored dtype (float32 for a dequantized GGUF), or
    "float32", "bfloat16", "float16". ``quantization`` ("int8", "fp8", "q8_0"): the decoder matrices are
    written in 8 bits with their scales, quantized from the stored values (``dtype`` applies to the other
    tensors; a GGUF of Q8_0 matrices gives its blocks as they are for "q8_0"); a quantized source keeps its
    kind (None or the same kind; another kind is refused). An existing
    ``dst`` is refused unless ``force``, in which case it is replaced only once the new one is complete.
    ``workers`` threads write layer files (default: one per CPU, at most 16). Returns the absolute path of
    ``dst``.
    """
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)} or None (keep), got {dtype!r}")
    if quantization is not None and quantization not in QUANT_KINDS:
        raise ValueError(f"quantization must be one of {list(QUANT_KINDS)} or None, got {quantization!r}")
    target = None if dtype is None else dtypes.run_dtype(dtype)
    # Opening validates the whole source before anything is written.
    reader = src if isinstance(src, CheckpointReader) else open_checkpoint(src)
    if quantization is not None and reader.quantization is None:
        reader.keep_quantized(quantization)  # a Q8_0 GGUF's blocks are written as they are
    if reader.quantization is not None and quantization not in (None, reader.quantization):
        raise CheckpointError(f"{reader.path} holds {reader.quantization} weights already; quantizing them again "
                              f"as {quantization} would compound the errors: convert the original float "
                              "checkpoint instead")
    dst = os.path.abspath(os.fspath(dst))
    if os.path.realpath(dst) == os.path.realpath(reader.path):
        raise CheckpointError(f"{dst}: destination is the source checkpoint; choose another directory")
    if os.path.lexists(dst) and not force:
        raise CheckpointError(f"{dst} already exists; pass --force (force=True) to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        _write_jaxpipe_dir(reader, tmp, target, progress, workers,
                           quantization if reader.quantization is None else None)
        _move_into_place(tmp, dst)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_jaxpipe_dir(reader: CheckpointReader, out: str, target: np.dtype | None, progress: bool,
                       workers: int | None, quantize: str | None = None) -> None:
    """``quantize``: the kind to quantize a float source's matrices into (None: write tensors as they are,
    a quantized source's 8-bit values and scales included)."""
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(reader.config.to_hf_dict(), f, indent=2)
    kind = quantize or reader.quantization  # of the written directory

    # Group the tensors by destination file: the globals first, then one file per layer.
    groups: dict[str, list[Key]] = {}   # the source tensors each file is made from
    out_dtype: dict[Key, np.dtype] = {}
    file_bytes: collections.Counter = collections.Counter()
    shapes = expected_tensors(reader.config, kind)  # of the written tensors
    for key in reader.tensor_names():
        name, layer = split_key(key)
        filename = GLOBALS_FILE if layer is None else layer_file(layer)
        groups.setdefault(filename, []).append(key)
        written = [key]
        if kind is not None and (name in QUANTIZED_NAMES or name.endswith("_scale")):
            # 8-bit values and their scales, never cast; a new matrix's scales are written beside it.
            out_dtype[key] = quant_dtype(kind) if name in QUANTIZED_NAMES else scale_dtype(kind)
            if quantize is not None:
                out_dtype[(scale_name(name), layer)] = scale_dtype(kind)
                written.append((scale_name(name), layer))
        else:
            out_dtype[key] = target if target is not None else reader.dtype(name, layer)
        for k in written:
            file_bytes[filename] += int(np.prod(shapes[k])) * out_dtype[k].itemsize
    # Each file in flight holds its tensors (twice while the dtype changes).
    n = max(1, min(workers or min(16, os.cpu_count() or 1), _HOST_BYTES // (2 * max(file_bytes.values()))))

    def write(filename: str) -> dict[str, dict]:
        arrays: dict[Key, np.ndarray] = {}
        for key in groups[filename]:
            name, layer = split_key(key)
            if quantize is not None and name in QUANTIZED_NAMES:
                # From the stored values (a view: quantized a block of rows at a time), as loading does.
                arrays[key], arrays[(scale_name(name), layer)] = quantize_host(
                    reader.read_slice(name, layer), quantize)
            else:
                # astype through ml_dtypes handles bfloat16 both ways with round-to-nearest-even.
                arrays[key] = reader.read(name, layer).astype(out_dtype[key], copy=False)
        tensors, entries = {}, {}
        for key, arr in arrays.items():
            name, layer = split_key(key)
            dt, shape = out_dtype[key], shapes[key]
            if arr.shape != shape or arr.dtype != dt:
                raise CheckpointError(f"{reader.path}: tensor {key_name(key)} came out as {arr.dtype} "
                                      f"{list(arr.shape)}, expected {dt.name} {list(shape)}")
            tensors[key_name(key)] = arr
            entries[key_name(key)] = {"file": filename, "shape": list(shape), "dtype": dt.name,
                                      "crc32": checksum(arr)}
            if kind is not None and name in QUANTIZED_NAMES:
                entries[key_name(key)]["scale"] = key_name((scale_name(name), layer))
        save_file(tensors, os.path.join(out, filename))
        return entries

    what = target.name if target is not None else reader.dtype("embed").name
    if kind is not None:
        what = f"{kind} (other tensors {what})"
    bar = _bar(sum(file_bytes.values()), f"converting {os.path.basename(reader.path.rstrip(os.sep))} to {what}",
               progress)

    def tokenizer() -> str | None:
        try:
            reader.save_tokenizer(out)
        except CheckpointError as e:
            return str(e)
        return None

    entries: dict[str, dict] = {}
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jaxpipe-convert")
    try:
        # The tokenizer (copied, or built by transformers for GGUF) is written beside the weights.
        side = pool.submit(tokenizer)
        futures = {pool.submit(write, filename): filename for filename in groups}
        for future in as_completed(futures):
            entries.update(future.result())
            bar.update(file_bytes[futures[future]])
        missing = side.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()  # ends the bar's line: the error is printed on a line of its own
        raise
    pool.shutdown(wait=True)
    bar.close()
    if missing:
        warnings.warn(f"{reader.path} has no tokenizer, so the converted checkpoint will have none: {missing}")

    ordered = {key_name(k): entries[key_name(k)] for k in shapes}
    written = {e["dtype"] for e in ordered.values()}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "dtype": written.pop() if len(written) == 1 else "mixed", "tensors": ordered}
    if kind is not None:
        manifest["quantization"] = kind
    # The manifest goes last: a directory with a manifest is a complete one.
    with open(os.path.join(out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                dynamic_ncols=True)


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


def verify_checkpoint(path: str | os.PathLike, progress: bool = True) -> dict:
    """Open a checkpoint and read every tensor's bytes once; jaxpipe directories are checked against their
    manifest's checksums (HF and GGUF files carry none: their headers, names, shapes and sizes are checked).

    Raises ``CheckpointError`` naming every bad tensor. Returns ``{"path", "kind", "tensors", "bytes",
    "checksums", "seconds"}``.
    """
    t0 = time.perf_counter()
    reader = open_checkpoint(path)
    total = sum(reader.nbytes(*split_key(k)) for k in reader.tensor_names())
    bar = _bar(total, f"verifying {os.path.basename(os.fspath(path).rstrip(os.sep))}", progress)
    lock = threading.Lock()

    def tick(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        summary = reader.verify(progress=tick)
    except BaseException:
        bar.close()  # ends the bar's line: the error is printed on a line of its own
        raise
    bar.close()
    reader.close()
    return {"path": os.fspath(path), "kind": reader.kind, **summary, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------
# Command line (shared by tools/convert_checkpoint.py and `jaxpipe convert` / `jaxpipe verify`)


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``SRC DST [--dtype] [--force] [--quiet]`` arguments of the convert command."""
    parser.add_argument("src", metavar="SRC", help="HF safetensors directory, .gguf file or jaxpipe directory")
    parser.add_argument("dst", metavar="DST", help="jaxpipe checkpoint directory to write")
    parser.add_argument("--dtype", choices=("keep",) + DTYPE_CHOICES, default="keep",
                        help="dtype of the written weights (default: keep, each tensor's stored dtype; a GGUF "
                             "file is dequantized to float32). On a CPU, bfloat16 weights decode about 2x "
                             "slower than float32")
    parser.add_argument("--quantization", choices=QUANT_KINDS, default=None,
                        help="store the decoder's linear layers in 8 bits: int8 or fp8 (e4m3) with one float32 "
                             "scale per output channel, or q8_0 (int8, a float16 scale per 32 input rows, as "
                             "llama.cpp; a Q8_0 GGUF keeps its blocks); embeddings, norms and the lm_head keep "
                             "--dtype. Loading DST then needs no flag (default: no quantization)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the convert command from parsed arguments; returns the exit status. Errors (``JaxpipeError``)
    propagate so the caller decides how to report them."""
    dst = convert_checkpoint(args.src, args.dst, dtype=None if args.dtype == "keep" else args.dtype,
                             force=args.force, progress=not args.quiet,
                             quantization=args.quantization)
    if not args.quiet:
        print(f"wrote {dst}")
    return 0


def add_verify_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``CHECKPOINT [--quiet]`` arguments of the verify command."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="jaxpipe directory (checked against its checksums), HF directory or .gguf file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return parser


def run_verify(args: argparse.Namespace) -> int:
    """Run the verify command; returns 0 when every tensor is sound. A bad checkpoint raises
    ``CheckpointError`` (one line naming the bad tensors and what to do)."""
    s = verify_checkpoint(args.checkpoint, progress=not args.quiet)
    if not args.quiet:
        checked = "checksums match" if s["checksums"] else "no checksums in this format: every tensor read"
        print(f"{s['path']}: ok ({s['kind']}, {s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB, {checked}; "
              f"{s['seconds']:.1f} s)")
    return 0

