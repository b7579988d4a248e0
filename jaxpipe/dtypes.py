"""The one table of dtype names: numpy dtypes, their names ("bfloat16", ...) and safetensors codes ("BF16").

Every module that turns a dtype name into a dtype (``LLM(dtype=)``, ``--dtype`` flags, checkpoint readers,
``jaxpipe convert``, the manifest of a jaxpipe directory) goes through this table. bfloat16 is ml_dtypes'
(the same dtype as ``jax.numpy.bfloat16``), so numpy arrays of it go to JAX and back unchanged.
Quantized weights will add their codes here (int8 "I8", float8 "F8_E4M3") when they are written.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# safetensors code -> numpy dtype, for every dtype a checkpoint's weights may be stored in.
_SAFETENSORS: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BFLOAT16,
}
_CODES: dict[np.dtype, str] = {dt: code for code, dt in _SAFETENSORS.items()}
# numpy name -> numpy dtype: "float64", "float32", "float16", "bfloat16".
_BY_NAME: dict[str, np.dtype] = {dt.name: dt for dt in _SAFETENSORS.values()}

# Dtypes a model runs in (``LLM(dtype=)``, ``--dtype``, ``jaxpipe convert --dtype``).
RUN_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# The safetensors codes jaxpipe reads weights in.
WEIGHT_CODES: tuple[str, ...] = tuple(sorted(_SAFETENSORS))


def np_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype for a name ("bfloat16", "float32", ...), a numpy/JAX dtype or a scalar type.

    Raises ``ValueError`` naming the accepted names for anything else.
    """
    if isinstance(dtype, str):
        if dtype not in _BY_NAME:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_BY_NAME)}")
        return _BY_NAME[dtype]
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(f"unsupported dtype {dt}; expected one of {sorted(_BY_NAME)}")
    return dt


def run_dtype(name: str) -> np.dtype:
    """The numpy dtype of a run dtype name; ``ValueError`` unless it is one of ``RUN_DTYPES``."""
    if name not in RUN_DTYPES:
        raise ValueError(f"dtype must be one of {list(RUN_DTYPES)}, got {name!r}")
    return _BY_NAME[name]


def auto_run_dtype(stored: Any) -> str:
    """What ``dtype="auto"`` means for weights stored in ``stored``: float16 and bfloat16 run as stored,
    anything else (float32, float64, dequantized GGUF) in float32."""
    name = np.dtype(stored).name
    return name if name in ("float16", "bfloat16") else "float32"


def from_safetensors(code: str) -> np.dtype | None:
    """The numpy dtype of a safetensors dtype code ("BF16"), or None when jaxpipe does not read it."""
    return _SAFETENSORS.get(code)


def safetensors_code(dtype: Any) -> str:
    """The safetensors dtype code ("BF16", "F32", ...) of a numpy dtype."""
    return _CODES[np_dtype(dtype)]
