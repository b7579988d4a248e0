"""Where weights and the KV cache live, and what each device's loading reads.

A tiny checkpoint of 5 layers split over 2 stages as vLLM does ([3, 2]; the second stage's stack ends in an
empty slot), alone and with 2 tensor shards per stage:
- every device's shard of every per-layer parameter holds exactly its stage's layers (in order, zeros in
  the empty slot) and its tensor shard's heads / columns, checked against the checkpoint read with
  safetensors directly; the embedding lives on the first stage and the lm_head on the last, split by rows over tensor;
- the per-device bytes of the loaded parameters are what the memory plan says;
- each device's KV cache shard has the stage's layer slots and KV heads / T;
- loading reads, for each device, only the tensors of its own stage's layers (and only its own rows of
  the embedding); with every device in one process, each tensor once, whole (``loading.plan_blocks``).
"""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxpipe import LLM, loading, partition
from jaxpipe.checkpoint import open_checkpoint
from jaxpipe import pipeline
from jaxpipe.pipeline import PipelineModel

VARIANT = dict(layers=5, heads=4, kv_heads=2, attention_bias=True, mlp_bias=True, seed=3)
COUNTS = [3, 2]          # vLLM's split of 5 layers over 2 stages
OFFSETS = [0, 3]
SLOTS = 3
H, D, HEADS, KV, INTER = 64, 16, 4, 2, 128
LAYOUTS = [(2, 1), (2, 2)]
HF = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
      "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
      "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
      "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias", "w_gate": "mlp.gate_proj.weight",
      "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "b_gate": "mlp.gate_proj.bias",
      "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias"}
# Model parameters that fuse several checkpoint tensors, each split shard by shard ([q_0 k_0 v_0 | q_1 ...]).
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up"),
         "b_gate_up": ("b_gate", "b_up")}
COLUMN_SPLIT = {"wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up", "b_gate", "b_up"}  # split over T by columns
ROW_SPLIT = {"wo", "w_down"}                                                               # by input rows


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    path, _ = tiny_checkpoint(**VARIANT)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return path, state


def canonical(state, name, layer):
    """The checkpoint tensor in jaxpipe's orientation ([in, out] matrices), straight from safetensors."""
    w = state[f"model.layers.{layer}.{HF[name]}"]
    return w.T if w.ndim == 2 else w


def tensor_block(state, name, layer, t, tp):
    """What tensor shard t of tp holds of one layer's parameter ``name`` (a model parameter name)."""
    if name in FUSED:
        return np.concatenate([tensor_block(state, n, layer, t, tp) for n in FUSED[name]], axis=-1)
    w = canonical(state, name, layer)
    if name in COLUMN_SPLIT:
        if name[-1] in "kv" and KV % tp:
            # fewer KV heads than shards: shard t holds the KV head its query heads read
            head = (t * (HEADS // tp)) // (HEADS // KV)
            return w[..., head * D:(head + 1) * D]
        return np.split(w, tp, axis=-1)[t]
    if name in ROW_SPLIT:
        return np.split(w, tp, axis=0)[t]
    return w  # norms, bo, b_down: whole on every tensor shard


def new_cache(model, microbatches, rows, cache_len):
    """The KV cache an engine of this shape allocates (``EngineShape``/``new_state`` of the continuous-batching
    engine; ``Geometry``/``new_cache`` before it)."""
    if hasattr(pipeline, "EngineShape"):
        return model.new_state(pipeline.EngineShape(microbatches, rows, cache_len)).cache
    return model.new_cache(pipeline.Geometry(microbatches, rows, cache_len))


def device_coords(mesh, device):
    (s, t), = np.argwhere(mesh.devices == device)
    return int(s), int(t)


@pytest.mark.parametrize("stages,tp", LAYOUTS, ids=["pp2", "pp2xtp2"])
def test_parameter_shards_hold_their_stage_layers(stages, tp, checkpoint):
    path, state = checkpoint
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, pipeline_parallel_size=stages,
              tensor_parallel_size=tp, progress=False)
    assert list(llm.layout.layer_counts) == COUNTS and llm.layout.slots_per_stage == SLOTS
    layers = llm.params["layers"]
    query = "wq" if "wq" in layers else "wqkv"
    q_cols = HEADS * D // tp + (0 if query == "wq" else 2 * max(1, KV // tp) * D)
    for name, arr in layers.items():
        shards = arr.addressable_shards
        assert len(shards) == stages * tp, name
        for shard in shards:
            s, t = device_coords(llm.mesh, shard.device)
            data = np.asarray(shard.data)
            if name == query:
                assert data.shape == (SLOTS, H, q_cols)
            assert data.shape[0] == SLOTS, name
            for j in range(SLOTS):
                if j < COUNTS[s]:
                    want = tensor_block(state, name, OFFSETS[s] + j, t, tp)
                    np.testing.assert_array_equal(data[j], want, err_msg=f"{name} stage {s} shard {t} slot {j}")
                else:
                    assert not data[j].any(), f"{name}: the empty slot of stage {s} should be zeros"

    # The embedding on the first stage, the lm_head on the last, each split by vocabulary rows over tensor.
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
    rows = -(-embed.shape[0] // tp)
    for shard in llm.params["ends"].addressable_shards:
        s, t = device_coords(llm.mesh, shard.device)
        data = np.asarray(shard.data)
        assert data.shape == (1, rows, H)
        want = (embed if s == 0 else head)[t * rows:(t + 1) * rows]
        np.testing.assert_array_equal(data[0, :len(want)], want)
        assert not data[0, len(want):].any()

    # The memory plan's weight bytes are what each device holds.
    plan = partition.plan_memory(llm.cfg, llm.layout, dtype=np.float32, max_model_len=64, batch=1,
                                 device_bytes=None)
    held = {}
    for arr in jax.tree.leaves(llm.params):
        for shard in arr.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    for device, nbytes in held.items():
        s, _ = device_coords(llm.mesh, device)
        want = plan.stages[s].weight_bytes
        assert nbytes == want, f"device {device} holds {nbytes} B of parameters; the plan says {want} B"

    # KV cache: each device has its stage's layer slots and KV heads / T.
    cache = new_cache(llm.model, microbatches=2, rows=2, cache_len=128)
    for arr in (cache.k, cache.v):
        assert arr.shape == (stages * SLOTS, 4, max(KV, tp) if KV % tp else KV, 128, D)
        for shard in arr.addressable_shards:
            s, t = device_coords(llm.mesh, shard.device)
            assert shard.data.shape == (SLOTS, 4, max(1, KV // tp), 128, D)
            assert shard.index[0] == slice(s * SLOTS, (s + 1) * SLOTS)


@pytest.mark.parametrize("stages,tp", LAYOUTS, ids=["pp2", "pp2xtp2"])
def test_loading_reads_only_each_stage_layers_once(stages, tp, checkpoint):
    """What each device's process would read (``plan_blocks`` for that device alone), and that one process
    holding all devices reads every checkpoint tensor once, wholly."""
    path, _ = checkpoint
    reader = open_checkpoint(path)
    cfg = reader.config
    layout = partition.make_layout(cfg, stages, tp)
    mesh = partition.make_mesh(layout, jax.devices())
    model = PipelineModel(cfg, layout, mesh, np.float32)

    names = sorted({n for n, layer in (k if isinstance(k, tuple) else (k, None)
                                       for k in reader.tensor_names()) if layer is not None})
    per = -(-cfg.vocab_size // tp)
    everything = set()
    for s in range(stages):
        stage_set = {(n, layer) for layer in range(OFFSETS[s], OFFSETS[s] + COUNTS[s]) for n in names}
        union = set()
        for t in range(tp):
            bounds = loading.read_bounds(loading.plan_blocks(reader, model, devices=[mesh.devices[s, t]]))
            got = {key for key in bounds if key[1] is not None}
            assert got <= stage_set, f"stage {s} shard {t} read other stages' tensors: {sorted(got - stage_set)}"
            if tp == 1:
                assert got == stage_set
            union |= got
            # Vocabulary tensors: the first stage reads its tensor shard's rows of the embedding, the last
            # its rows of the lm_head, nobody the whole table, nobody else either.
            vocab = {key: box for key, box in bounds.items() if key[0] in ("embed", "lm_head")}
            assert set(vocab) == {("embed" if s == 0 else "lm_head", None)}, vocab
            (r0, r1), _ = next(iter(vocab.values()))
            assert r0 >= t * per and r1 <= min((t + 1) * per, cfg.vocab_size), (r0, r1)
        assert union == stage_set, f"stage {s} missed {sorted(stage_set - union)}"
        everything |= union
    assert len(everything) == cfg.num_layers * len(names)

    # One process with every device: each tensor's whole extent, read once.
    whole = loading.read_bounds(loading.plan_blocks(reader, model))
    assert set(whole) == {k if isinstance(k, tuple) else (k, None) for k in reader.tensor_names()}
    for (name, layer), box in whole.items():
        assert box == tuple((0, n) for n in reader.shape(name, layer)), (name, layer, box)
