"""Shape presets: Hugging Face ``config.json`` files of known Llama models, shipped with the package.

The JSON files sit next to this module (``jaxpipe/presets/<name>.json``) and are package data, so they
are found the same way in a checkout, an editable install and a wheel. Their numbers are the published
``config.json`` values of each model (base models; ``smollm2-135m`` uses the Instruct variant's token ids,
matching the GGUF that the tests use). A preset gives shapes only: loading one means random weights.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from jaxpipe.config import LlamaConfig
from jaxpipe.errors import ConfigError

__all__ = ["preset_names", "is_preset", "preset_dict", "load_preset"]


def _files() -> dict[str, Any]:
    return {p.name[:-len(".json")]: p for p in resources.files(__name__).iterdir()
            if p.name.endswith(".json")}


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted (e.g. ``"llama-2-7b"``)."""
    return sorted(_files())


def is_preset(name: str) -> bool:
    return name in _files()


def preset_dict(name: str) -> dict[str, Any]:
    """The preset's ``config.json`` contents as a dict (a fresh copy each call)."""
    files = _files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(files))}")
    return json.loads(files[name].read_text())


def load_preset(name: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a shipped preset."""
    return LlamaConfig.from_hf_dict(preset_dict(name), source=f"preset {name!r}")
