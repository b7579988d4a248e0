"""The checkpoint reader interface and jaxpipe's canonical tensor names (see docs/DESIGN.md).

Every reader (``hf``, ``gguf``, ``native``) yields canonical tensors: matrices ``[in, out]``, ``embed`` and
``lm_head`` ``[V, H]``, per-layer tensors addressed by ``(name, layer)``. Readers validate everything cheap
when they are opened (config, names, shapes, dtypes, file sizes) and read tensor data only when asked.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Union

import numpy as np

from jaxpipe.config import LlamaConfig
from jaxpipe.errors import CheckpointError
from jaxpipe.quantize import scale_shape

# A canonical tensor key: "embed" for a global tensor, ("wq", 3) for a per-layer one.
Key = Union[str, tuple[str, int]]
# A block of a tensor: one slice (step 1) per leading axis; missing trailing axes are whole.
Index = tuple[slice, ...]

GLOBAL_NAMES = ("embed", "final_norm", "lm_head")
LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo",
               "mlp_norm", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
VOCAB_NAMES = ("embed", "lm_head")  # [V, H] tensors that may be read a slice of rows at a time
# HF and GGUF store these matrices [out, in] (nn.Linear.weight); jaxpipe keeps them [in, out].
TRANSPOSED_NAMES = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})
# The matrices a quantized checkpoint (``jaxpipe convert --quantization``, a GGUF file of Q8_0 tensors) stores
# in 8 bits, each with its scales ``<name>_scale``: float32 ``[out]`` per output channel, or float16
# ``[in / 32, out]`` per group of 32 input rows for q8_0 (jaxpipe.quantize).
QUANTIZED_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
SCALE_NAMES = tuple(f"{n}_scale" for n in QUANTIZED_NAMES)


def scale_name(name: str) -> str:
    """The canonical name of the scales of quantized matrix ``name``: ``wq`` -> ``wq_scale``."""
    return f"{name}_scale"

WHAT_IS_EXPECTED = ("expected a Hugging Face checkpoint directory (config.json + *.safetensors), "
                    "a .gguf file, or a jaxpipe directory written by `jaxpipe convert`")


def expected_tensors(config: LlamaConfig, quantization: str | None = None) -> dict[Key, tuple[int, ...]]:
    """Every canonical tensor a checkpoint for ``config`` must hold, with its canonical shape.

    Global tensors come first ("embed", "final_norm", "lm_head" unless tied), then each layer's
    tensors keyed ``(name, layer)`` in ``LAYER_NAMES`` order; biases only where the config asks for them.
    A quantized checkpoint (``quantization`` "int8" / "fp8" / "q8_0") also holds each ``QUANTIZED_NAMES``
    matrix's scales ``<name>_scale`` (``quantize.scale_shape``), right after the matrix.
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
                if quantization is not None and name in QUANTIZED_NAMES:
                    out[(scale_name(name), layer)] = scale_shape(shapes[name], quantization)
    return out


def split_key(key: Key) -> tuple[str, int | None]:
    """``"embed"`` -> ``("embed", None)``; ``("wq", 3)`` -> ``("wq", 3)`` (the arguments of ``read``)."""
    return (key, None) if isinstance(key, str) else key


def key_name(key: Key) -> str:
    """The flat name jaxpipe directories use in files and the manifest: ``embed``, ``layers.3.wq``."""
    name, layer = split_key(key)
    return name if layer is None else f"layers.{layer}.{name}"


def stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape as HF/GGUF store a canonical tensor (matrices [out, in])."""
    return shape[::-1] if name in TRANSPOSED_NAMES else shape


def one_line(e: BaseException) -> str:
    """An exception's message on one line (library errors sometimes span several)."""
    return " ".join(str(e).split()) or type(e).__name__


# Stored rows copied per band when a source is a transposed view (see copy_into).
_BAND = 128


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (casting to ``dst``'s dtype), also fast when ``src`` is a transposed view of its
    storage, as an HF matrix in jaxpipe's ``[in, out]`` orientation is.

    numpy walks ``src`` in ``dst``'s order, so a transposed source is read one stored row per element;
    copying bands of ``_BAND`` stored rows keeps those rows in the L1/L2 cache. numpy releases the GIL
    while it copies, so threads copy in parallel.
    """
    if src.ndim >= 2 and src.shape[-1] > _BAND and abs(src.strides[-1]) > abs(src.strides[-2]):
        for c in range(0, src.shape[-1], _BAND):
            np.copyto(dst[..., c:c + _BAND], src[..., c:c + _BAND], casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")


def index_bounds(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of a block ``index`` of a tensor of ``shape``; rejects steps."""
    if not isinstance(index, tuple) or len(index) > len(shape):
        raise CheckpointError(f"index must be a tuple of at most {len(shape)} slices, got {index!r}")
    out = []
    for axis, n in enumerate(shape):
        s = index[axis] if axis < len(index) else slice(None)
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise CheckpointError(f"index must hold contiguous slices (step 1), got {index!r}")
        start, stop, _ = s.indices(n)
        out.append((start, max(start, stop)))
    return tuple(out)


# The files of a Hugging Face tokenizer (and the generation defaults that go with a model), as
# ``save_pretrained`` writes them; copied as they are by ``copy_tokenizer_files``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def copy_tokenizer_files(src: str, dst: str) -> None:
    """Copy a directory's tokenizer files (``TOKENIZER_FILES``) as they are: faster than loading and saving
    them through transformers (which imports torch) and exactly the same tokenizer."""
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if not any(f in found for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{src}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    for f in found:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def load_local_tokenizer(directory: str, **kwargs: Any) -> Any:
    """A transformers tokenizer from files in ``directory`` (never the hub)."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is wanted

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: no usable tokenizer files ({type(e).__name__}: {e})") from e


class CheckpointReader:
    """Lazy access to a checkpoint's canonical tensors. Get one with ``open_checkpoint``.

    Readers are safe to use from several threads at once (the loader reads with a thread pool).
    """

    kind: str = ""
    # "int8" / "fp8" / "q8_0" when the checkpoint serves QUANTIZED_NAMES in 8 bits with their scales, else None.
    quantization: str | None = None

    def __init__(self, path: str, config: LlamaConfig, quantization: str | None = None) -> None:
        self.path = path
        self.config = config
        self.quantization = quantization
        self._expected = expected_tensors(config, quantization)

    # -- what is there ----------------------------------------------------------------------------

    def tensor_names(self) -> list[Key]:
        """Canonical keys of every tensor this checkpoint holds (``expected_tensors`` order)."""
        return list(self._expected)

    def shape(self, name: str, layer: int | None = None) -> tuple[int, ...]:
        """Canonical shape of one tensor, without reading it."""
        return self._expected[self._key(name, layer)]

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        """The numpy dtype ``read`` returns for this tensor, without reading it."""
        raise NotImplementedError

    def nbytes(self, name: str, layer: int | None = None) -> int:
        """Bytes of one tensor as ``read`` returns it."""
        return int(np.prod(self.shape(name, layer))) * self.dtype(name, layer).itemsize

    def keep_quantized(self, kind: str) -> bool:
        """Serve the decoder matrices (``QUANTIZED_NAMES``) as ``kind``'s 8-bit values and scales exactly as
        the file stores them, where it does (a GGUF file whose matrices are all Q8_0, for "q8_0"): then
        ``quantization`` becomes ``kind`` and ``read`` returns int8 values and float16 scales, nothing
        dequantized. Returns whether it did; other readers return False and loading quantizes their float
        values (which, for a Q8_0 file's dequantized values, gives the same bits, only slower)."""
        return False

    # -- reading ----------------------------------------------------------------------------------

    def read(self, name: str, layer: int | None = None, rows: slice | None = None) -> np.ndarray:
        """Read one canonical tensor into a new contiguous array. ``layer`` is required for per-layer
        tensors; ``rows=slice(a, b)`` reads only rows a:b of ``embed``/``lm_head`` (the vocabulary axis)."""
        key = self._key(name, layer)
        if rows is not None:
            if name not in VOCAB_NAMES:
                raise CheckpointError(f"rows= only applies to {VOCAB_NAMES}, not {name!r}")
            if not isinstance(rows, slice) or rows.step not in (None, 1):
                raise CheckpointError(f"rows must be a contiguous slice(start, stop), got {rows!r}")
        return self._read(key, rows)

    def read_slice(self, name: str, layer: int | None = None, index: Index = ()) -> np.ndarray:
        """The block ``tensor[index]`` of one canonical tensor, reading only its bytes.

        ``index`` holds one ``slice`` (step 1) per leading axis. The result may be a read-only view of a
        memory-mapped file (no copy is made: copy it where it is needed, e.g. with ``copy_into``), and
        for HF matrices a transposed view of the stored ``[out, in]`` bytes. Formats with checksums check
        them when ``index`` covers the whole tensor.
        """
        key = self._key(name, layer)
        bounds = index_bounds(index, self._expected[key])
        return self._read_slice(key, tuple(slice(a, b) for a, b in bounds))

    def verify(self, progress: Callable[[int], object] | None = None, workers: int | None = None) -> dict[str, Any]:
        """Read every tensor's bytes once (in parallel) and check them, against checksums where the format
        has them.

        ``progress(nbytes)`` is called as bytes are checked (from several threads). Raises
        ``CheckpointError`` naming a bad tensor; returns ``{"tensors", "bytes", "checksums"}`` (checksums:
        whether any were compared).
        """
        def one(key: Key) -> int:
            n = self.read(*split_key(key)).nbytes
            if progress:
                progress(n)
            return n

        with ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as pool:
            total = sum(pool.map(one, self.tensor_names()))
        return {"tensors": len(self._expected), "bytes": total, "checksums": False}

    def load_tokenizer(self) -> Any:
        """A transformers tokenizer built from the checkpoint's own files (never the hub)."""
        raise NotImplementedError

    def save_tokenizer(self, directory: str) -> None:
        """Write the checkpoint's tokenizer into ``directory`` as Hugging Face tokenizer files;
        ``CheckpointError`` when the checkpoint has none."""
        self.load_tokenizer().save_pretrained(directory)

    def close(self) -> None:
        """Release open files and memory maps (the reader must not be used afterwards)."""

    # -- for subclasses ---------------------------------------------------------------------------

    def _read(self, key: Key, rows: slice | None) -> np.ndarray:
        raise NotImplementedError

    def _read_slice(self, key: Key, index: Index) -> np.ndarray:
        # Formats without random access (GGUF decodes whole tensors) read the whole tensor, or the
        # vocabulary rows, and cut the block from it.
        name, layer = split_key(key)
        if name in VOCAB_NAMES:
            return self._read(key, index[0])[(slice(None),) + index[1:]]
        return self._read(key, None)[index]

    def _key(self, name: str, layer: int | None) -> Key:
        """Check a (name, layer) request against the config and turn it into a key."""
        if name in GLOBAL_NAMES:
            if layer is not None:
                raise CheckpointError(f"{name!r} is a global tensor; do not pass layer={layer}")
            if name == "lm_head" and self.config.tie_word_embeddings:
                raise CheckpointError(f"{self.path}: lm_head is tied to the embedding; read 'embed' instead")
            return name
        if name not in LAYER_NAMES and name not in SCALE_NAMES:
            raise CheckpointError(f"unknown tensor name {name!r}; canonical names are "
                                  f"{GLOBAL_NAMES + LAYER_NAMES + SCALE_NAMES}")
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.config.num_layers:
            raise CheckpointError(f"{name!r} needs layer in [0, {self.config.num_layers}), got {layer!r}")
        layer = int(layer)
        if name in SCALE_NAMES and self.quantization is None:
            raise CheckpointError(f"{self.path}: this checkpoint is not quantized: it has no {name!r}")
        if (name, layer) not in self._expected:
            raise CheckpointError(f"{self.path}: this model has no {name!r} (the config has "
                                  f"attention_bias={self.config.attention_bias}, "
                                  f"mlp_bias={self.config.mlp_bias})")
        return (name, layer)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind!r} path={self.path!r}>"


def is_whole(index: Index, shape: tuple[int, ...]) -> bool:
    """Whether a normalised block index covers the whole tensor."""
    return all((s.start, s.stop) == (0, n) for s, n in zip(index, shape)) and len(index) == len(shape)
