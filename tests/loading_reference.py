"""The loader as it was before issue 12 (whole tensors, numpy), kept as the reference the new loader must
match bit for bit: global numpy arrays per parameter path."""

import numpy as np

from jaxpipe.pipeline import flatten_paths

FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"),
         "w_gate_up": ("w_gate", "w_up"), "b_gate_up": ("b_gate", "b_up")}
KV_NAMES = ("wk", "wv", "bk", "bv")


def reference_params(read, model) -> dict[str, np.ndarray]:
    """``read(name, layer=None)`` -> canonical array (cached by the caller)."""
    cfg, layout = model.cfg, model.layout
    dtype = np.dtype(model.dtype)
    tp = layout.tensor_parallel
    kv_cols = None
    if len(model.kv_sources) != cfg.num_kv_heads:
        d = cfg.head_dim
        kv_cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in model.kv_sources])

    def part(name, layer):
        w = read(name, layer)
        return w[..., kv_cols] if kv_cols is not None and name in KV_NAMES else w

    def layer_value(name, layer):
        if name in FUSED:
            parts = [np.split(part(n, layer), tp, axis=-1) for n in FUSED[name]]
            return np.concatenate([p[s] for s in range(tp) for p in parts], axis=-1)
        return part(name, layer)

    out = {}
    for path, abstract in flatten_paths(model.abstract_params).items():
        shape = abstract.shape
        arr = np.zeros(shape, dtype)
        if path.startswith("layers."):
            name = path.split(".", 1)[1]
            for slot in range(shape[0]):
                _, layer = layout.stage_of_slot(slot)
                if layer is not None:
                    arr[slot] = layer_value(name, layer).astype(dtype)
        elif path == "ends":
            # [stages * E, vocab, H]: the first stage's first slice is the embedding, the last stage's last
            # the lm_head (the embedding when tied); the other slices are zeros.
            E = model.end_slices
            arr[0, : cfg.vocab_size] = read("embed", None).astype(dtype)
            head = "embed" if cfg.tie_word_embeddings else "lm_head"
            arr[layout.stages * E - 1, : cfg.vocab_size] = read(head, None).astype(dtype)
        else:
            arr[...] = np.asarray(read(path, None)).astype(dtype)
        out[path] = arr
    return out
