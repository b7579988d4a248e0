"""The Llama layer's elementwise and normalization ops, shared by the model and the fused kernels' fallbacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics, cast back before the weight (as transformers does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def swiglu(gate_up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` of ``gate_up [..., 2I] = gate | up`` (the MLP's input to its down projection)."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


__all__ = ["rms_norm", "swiglu"]
