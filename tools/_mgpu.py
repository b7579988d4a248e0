import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("stage", "tensor"))
x = jax.device_put(jnp.arange(8.0).reshape(2, 4), NamedSharding(mesh, P("stage")))
AX = ("stage", "tensor")
tests = {
 "ag_tuple_loop": lambda a: jax.lax.fori_loop(0, 3, lambda i, c: c + jax.lax.all_gather(c, AX, axis=1, tiled=True)[:, :4], a),
 "psum_tuple_loop": lambda a: jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.psum(c, AX), a),
 "axis_index_tuple": lambda a: a + jax.lax.axis_index(AX),
 "dyn_trip": lambda a: jax.lax.fori_loop(0, jnp.asarray([2, 3])[jax.lax.axis_index("stage")], lambda i, c: c * 2, a),
 "dyn_trip_in_loop_with_ppermute": lambda a: jax.lax.fori_loop(0, 3, lambda j, c: jax.lax.ppermute(jax.lax.fori_loop(0, jnp.asarray([2, 3])[jax.lax.axis_index("stage")], lambda i, d: d * 2, c), "stage", [(0, 1)]), a),
 "ppermute_3d_in_loop": lambda a: jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.ppermute(c, "stage", [(0, 1)]) + 1, a),
}
name = sys.argv[1]
f = jax.jit(jax.shard_map(tests[name], mesh=mesh, in_specs=P("stage"), out_specs=P("stage"), check_vma=False))
print(name, "ok", f(x).sum(), flush=True)
