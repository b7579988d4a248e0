"""Model configuration: a frozen dataclass built from a Hugging Face Llama ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxpipe.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

# Fields of config.json that do not change the math (bookkeeping, training-only or generation defaults).
# Anything that is neither here nor in _MATH_FIELDS is reported as unknown, so a checkpoint that needs a
# feature we do not implement is refused instead of silently run wrong.
_IGNORED_FIELDS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "pretraining_tp", "pad_token_id", "hidden_act", "attention_dropout",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "tie_encoder_decoder",
    "_model_name_or_path", "unk_token_id",  # written by transformers for models converted from GGUF
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "chunk_size_feed_forward", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "torchscript", "quantization_config", "cache_implementation",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "diversity_penalty", "num_beam_groups", "encoder_no_repeat_ngram_size",
    "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size", "use_bfloat16", "chunk_size",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "base_model_tp_plan",
    "base_model_pp_plan", "keys_to_ignore_at_inference", "attn_implementation", "_attn_implementation",
})
_MATH_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id",
    "eos_token_id",
})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is one of ``SUPPORTED_ROPE_TYPES``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Everything about a Llama checkpoint that changes the computation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_scaling.rope_type!r} is not supported; jaxpipe runs "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_param_count(self) -> int:
        """Parameters in one decoder layer (weights, norms and biases)."""
        h, i = self.hidden_size, self.intermediate_size
        n = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        if self.attention_bias:
            n += self.q_size + 2 * self.kv_size + h
        if self.mlp_bias:
            n += 2 * i + h
        return n

    def param_count(self) -> int:
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (self.vocab_size * self.hidden_size + head + self.hidden_size
                + self.num_layers * self.layer_param_count())

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
        """Build from the parsed contents of a Hugging Face ``config.json``; errors name the field."""
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        model_type = d.get("model_type", "llama")
        if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in arch):
            raise ConfigError(
                f"{source}: architecture {arch} / model_type {model_type!r} is not supported; "
                f"jaxpipe runs {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama')")
        unknown = sorted(k for k in d if k not in _MATH_FIELDS and k not in _IGNORED_FIELDS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown config field(s) {unknown}; jaxpipe cannot tell whether they change "
                "the model, so it refuses to guess. Remove them if they are bookkeeping.")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")
        for req in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if req not in d:
                raise ConfigError(f"{source}: required field {req!r} is missing")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        theta, scaling = _parse_rope(d, source)
        eos = d.get("eos_token_id", 2)
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, int):
            eos_ids = (eos,)
        elif isinstance(eos, (list, tuple)) and all(isinstance(e, int) for e in eos):
            eos_ids = tuple(eos)
        else:
            raise ConfigError(f"{source}: eos_token_id must be an int or a list of ints, got {eos!r}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id", 1), eos_token_ids=eos_ids)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlamaConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {path}: a Llama checkpoint directory needs one")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the file may be truncated") from None
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``LlamaConfig`` reads back to the same model."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type == "linear":
            rope["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rope.update(dataclasses.asdict(self.rope_scaling))
        eos: int | list[int] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                                else list(self.eos_token_ids))
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id, "eos_token_id": eos,
        }


def _parse_rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """Read RoPE settings from either spelling: ``rope_theta`` + ``rope_scaling`` or ``rope_parameters``."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be a dict, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be a dict or null, got {scaling!r}")
    merged: dict[str, Any] = dict(scaling or {})
    merged.update(params or {})
    theta = float(merged.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} (field rope_scaling/rope_parameters) is not supported; "
            f"jaxpipe runs {', '.join(SUPPORTED_ROPE_TYPES)}")
    known = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    if rope_type == "default":
        merged.pop("factor", None)
        merged = {}
    extra = sorted(set(merged) - known)
    if extra:
        raise ConfigError(f"{source}: unknown RoPE field(s) {extra} for rope type {rope_type!r}")
    if rope_type in ("linear", "llama3") and "factor" not in merged:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    kwargs = {k: (int(v) if k == "original_max_position_embeddings" else float(v)) for k, v in merged.items()}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)
