"""Kernels with their plain-XLA fallbacks: Pallas on GPU where XLA alone is not fast enough."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def out_struct(shape: tuple[int, ...], dtype, *operands) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output's shape and dtype, varying over the mesh axes any of ``operands`` varies over.

    Inside ``shard_map(check_vma=True)`` a kernel's outputs must say which mesh axes they vary over (the union
    of its operands', as for any elementwise op). ``jax.eval_shape`` of a probe fills that in, whatever this
    JAX version calls the field; outside ``shard_map`` it is a plain ShapeDtypeStruct. The probe never runs.
    """
    def probe(*ops):
        out = jnp.zeros(shape, dtype)
        for op in ops:
            out = out + jnp.zeros_like(op, dtype, shape=())
        return out

    return jax.eval_shape(probe, *operands)
