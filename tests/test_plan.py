"""The partition plan: vLLM's layer split, layout validation and its messages, the mesh, and the memory plan
(its numbers, its table, and LLM refusing a model that does not fit before reading any weight)."""

import re

import jax
import numpy as np
import pytest

from jaxpipe import LLM, partition
from jaxpipe.config import LlamaConfig
from jaxpipe.presets import load_preset
from jaxpipe.errors import LayoutError, MemoryPlanError

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                   num_kv_heads=2, head_dim=16)
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


def vllm_split(layers: int, stages: int) -> list[int]:
    """vLLM's get_pp_indices rule, written out: L // S each, the remainder added one by one from the
    second-to-last stage backwards (the last stage never gets one)."""
    counts = [layers // stages] * stages
    for k in range(layers % stages):
        counts[stages - 2 - k] += 1
    return counts


# -- layer split -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,stages,want", [
    (30, 1, [30]), (30, 2, [15, 15]), (30, 3, [10, 10, 10]), (30, 4, [7, 8, 8, 7]),
    (30, 8, [3, 4, 4, 4, 4, 4, 4, 3]), (6, 4, [1, 2, 2, 1]), (6, 5, [1, 1, 1, 2, 1]), (7, 4, [2, 2, 2, 1]),
    (32, 3, [11, 11, 10]), (80, 6, [13, 13, 13, 14, 14, 13]), (5, 5, [1, 1, 1, 1, 1])])
def test_split_layers_known_values(layers, stages, want):
    assert list(partition.split_layers(layers, stages)) == want


def test_split_layers_follows_vllm_everywhere():
    for layers in range(1, 41):
        for stages in range(1, layers + 1):
            counts = list(partition.split_layers(layers, stages))
            assert counts == vllm_split(layers, stages), (layers, stages)
            assert sum(counts) == layers and min(counts) >= 1
            assert counts[-1] == layers // stages  # the last stage never gets an extra layer


def test_split_layers_errors():
    with pytest.raises(LayoutError, match="at most 6 stages"):
        partition.split_layers(6, 7)
    with pytest.raises(LayoutError, match="at least 1"):
        partition.split_layers(6, 0)


# -- layouts -----------------------------------------------------------------------------------------------


def test_make_layout_automatic_and_manual():
    # SmolLM2's lm_head (49152 x 576) reads as many bytes per tick as 8 of its layers: the automatic split
    # moves layers off the last stage until the slowest stage's bytes stop falling (vLLM's is 7, 8, 8, 7).
    assert partition.split_layers(30, 4) == (7, 8, 8, 7)
    auto = partition.make_layout(SMOLLM2, 4)
    assert auto.layer_counts == (9, 9, 10, 2) and auto.tensor_parallel == 1
    assert auto.layer_offsets == (0, 9, 18, 28) and auto.slots_per_stage == 10 and not auto.even
    cost = [n + (partition.head_layers(SMOLLM2, 1) if s == 3 else 0) for s, n in enumerate(auto.layer_counts)]
    assert max(cost) == 10 < 7 + partition.head_layers(SMOLLM2, 1)
    # Where the head is small against a layer (Llama-2-70B's is 0.31 of one), vLLM's split stays.
    assert partition.make_layout(load_preset("llama-2-70b"), 4).layer_counts == (20, 20, 20, 20)

    manual = partition.make_layout(TINY, 3, 1, [1, 2, 3])
    assert manual.layer_counts == (1, 2, 3)
    assert manual.layer_offsets == (0, 1, 3) and manual.slots_per_stage == 3
    # Stacked slots: each stage has 3; the shorter stages end in empty (None) slots.
    assert [manual.stage_of_slot(s) for s in range(9)] == [
        (0, 0), (0, None), (0, None), (1, 1), (1, 2), (1, None), (2, 3), (2, 4), (2, 5)]

    both = partition.make_layout(TINY, 2, 2, [5, 1])
    assert both.layer_counts == (5, 1) and both.num_devices == 4


def test_make_layout_partition_errors():
    with pytest.raises(LayoutError, match=r"sums to 5, but the model has 6 layers"):
        partition.make_layout(TINY, 2, 1, [2, 3])
    with pytest.raises(LayoutError, match=r"has 3 entries but pipeline_parallel_size is 2"):
        partition.make_layout(TINY, 2, 1, [2, 2, 2])
    with pytest.raises(LayoutError, match="at least one layer"):
        partition.make_layout(TINY, 2, 1, [6, 0])
    with pytest.raises(LayoutError, match="more than the model's 6 layers"):
        partition.make_layout(TINY, 7)


def test_tensor_parallel_not_dividing_heads_lists_sizes_that_work():
    with pytest.raises(LayoutError) as e:
        partition.make_layout(SMOLLM2, 1, 2)
    msg = str(e.value)
    assert "tensor_parallel_size=2" in msg and "9 attention" in msg and "3 KV heads" in msg
    assert re.search(r"sizes that work: \[1, 3\]", msg), msg

    with pytest.raises(LayoutError, match=r"sizes that work: \[1, 2, 4\]"):
        partition.make_layout(TINY, 1, 3)
    # 4 heads over 4 shards with 2 KV heads: each KV head is replicated on two shards.
    assert partition.make_layout(TINY, 1, 4).tensor_parallel == 4
    assert partition.kv_head_sources(TINY, 4) == [0, 0, 1, 1]
    assert partition.kv_head_sources(TINY, 2) == [0, 1]


def test_make_mesh_too_few_devices():
    layout = partition.make_layout(TINY, 2, 2)
    with pytest.raises(LayoutError, match=r"needs 4 devices \(pipeline 2 x tensor 2\) but only 3"):
        partition.make_mesh(layout, jax.devices()[:3])
    with pytest.raises(LayoutError, match="needs 16 devices"):
        partition.make_mesh(partition.make_layout(TINY, 4, 4))
    mesh = partition.make_mesh(layout, jax.devices())
    assert mesh.axis_names == ("stage", "tensor") and mesh.devices.shape == (2, 2)
    # Tensor shards of one stage are neighbouring devices; stages follow.
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:4]]


# -- memory plan ---------------------------------------------------------------------------------------------


def tiny_layer_elements(tp: int, kv_per_shard: int) -> int:
    """One decoder layer of TINY on one tensor shard, counted by hand (float32 elements)."""
    h, d = 64, 16
    q = 4 * d // tp
    kv = kv_per_shard * d
    inter = 128 // tp
    return (h * q + 2 * h * kv + q * h      # wq, wk, wv, wo
            + 3 * h * inter                 # gate, up, down
            + 2 * h)                        # two norms


@pytest.mark.parametrize("stages,tp,kv_per_shard", [(2, 1, 2), (2, 2, 1), (1, 4, 1), (4, 2, 1)])
def test_plan_numbers_match_hand_computation(stages, tp, kv_per_shard):
    layout = partition.make_layout(TINY, stages, tp)
    plan = partition.plan_memory(TINY, layout, dtype=np.float32, max_model_len=64, batch=3, device_bytes=None)
    devices = stages * tp
    slots = layout.slots_per_stage
    vocab_rows = 256 // tp                                     # the vocabulary is split over tensor only
    # One slice of `ends` per stage (the embedding on the first, the lm_head on the last), two on a single
    # stage (TINY is untied); plus the final norm.
    ends = (2 if stages == 1 else 1) * vocab_rows * 64 + 64
    assert len(plan.stages) == stages
    for s, st in enumerate(plan.stages):
        assert st.layers == layout.layer_counts[s] and st.first_layer == layout.layer_offsets[s]
        assert st.weight_bytes == 4 * (slots * tiny_layer_elements(tp, kv_per_shard) + ends)
        assert st.kv_cache_bytes == 4 * slots * 2 * 3 * kv_per_shard * 64 * 16   # K and V
    assert plan.fits and "device memory unknown" in plan.table()


def test_plan_bfloat16_halves_weights_and_cache():
    layout = partition.make_layout(TINY, 2)
    f32 = partition.plan_memory(TINY, layout, dtype=np.float32, max_model_len=64, batch=2, device_bytes=None)
    bf16 = partition.plan_memory(TINY, layout, dtype=jax.numpy.bfloat16, max_model_len=64, batch=2,
                                 device_bytes=None)
    for a, b in zip(f32.stages, bf16.stages):
        assert 2 * b.weight_bytes == a.weight_bytes and 2 * b.kv_cache_bytes == a.kv_cache_bytes


def test_plan_table_content():
    layout = partition.make_layout(SMOLLM2, 4)
    plan = partition.plan_memory(SMOLLM2, layout, dtype=np.float32, max_model_len=256, batch=4,
                                 device_bytes=10 * 1024 ** 3)
    lines = plan.table().splitlines()
    assert "stage" in lines[0] and "layers" in lines[0] and "weights GiB" in lines[0]
    spans = [line.split()[1] for line in lines[1:5]]
    assert spans == ["0-8", "9-17", "18-27", "28-29"]          # 9, 9, 10, 2 layers (the last holds the head)
    gib = 1024 ** 3
    for line, st in zip(lines[1:5], plan.stages):
        cols = line.split()
        assert float(cols[2]) == pytest.approx(st.weight_bytes / gib, abs=1e-3)
        assert float(cols[5]) == pytest.approx(st.total_bytes / gib, abs=1e-3)
    assert "batch 4, max_model_len 256" in plan.table()
    assert lines[-1].startswith("fits: peak")


def test_plan_too_large_does_not_fit():
    layout = partition.make_layout(SMOLLM2, 2)
    plan = partition.plan_memory(SMOLLM2, layout, dtype=np.float32, max_model_len=256, batch=1,
                                 device_bytes=100 * 1024 ** 2)
    assert not plan.fits and plan.peak_bytes > 100 * 1024 ** 2
    assert "DOES NOT FIT" in plan.table()
    with pytest.raises(MemoryPlanError, match="DOES NOT FIT") as e:
        partition.check_fits(plan)
    assert "0-18" in str(e.value) and "19-29" in str(e.value)      # the table is in the message (19, 11)
    more = partition.plan_memory(SMOLLM2, partition.make_layout(SMOLLM2, 8), dtype=np.float32,
                                 max_model_len=256, batch=1, device_bytes=100 * 1024 ** 2)
    assert more.peak_bytes < plan.peak_bytes                     # more stages: less per device


def test_llm_refuses_a_model_too_large_before_loading(tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint(layers=6, heads=4, kv_heads=2, seed=1)  # test_layouts' TINY
    import jaxpipe.llm

    monkeypatch.setattr(partition, "device_memory_bytes", lambda device: 64 * 1024)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read although the plan does not fit")
    monkeypatch.setattr(jaxpipe.llm, "load_params", no_loading)
    with pytest.raises(MemoryPlanError, match="DOES NOT FIT"):
        LLM(model=str(path), dtype="float32", max_model_len=64, pipeline_parallel_size=2, progress=False)


def test_devices_that_do_not_match_the_layout_are_refused_before_loading(tiny_checkpoint, monkeypatch):
    """An explicit device list must have exactly pipeline x tensor devices."""
    from jaxpipe import llm as llm_module

    path, _ = tiny_checkpoint(layers=4, heads=4, kv_heads=2)
    monkeypatch.setattr(llm_module, "load_params", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(LayoutError, match=r"3 devices were given .* 2 x 1 = 2"):
        LLM(model=str(path), pipeline_parallel_size=2, devices=jax.devices()[:3], progress=False)


# -- device kinds for planning -------------------------------------------------------------------------------


def test_plan_device_takes_bandwidth_and_memory_from_the_named_kind(monkeypatch):
    from jaxpipe import planning

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    cpu = jax.devices()[0]
    gib = 1024 ** 3
    h100 = planning.plan_device("h100", cpu)  # JAX's allocator: 0.75 of the card, LLM's budget: 0.9 of that
    assert (h100.bandwidth_gbps, h100.memory_bytes) == (3350.0, int(int(80 * gib * 0.75) * 0.9))
    assert "datasheet" in h100.bandwidth_source and "x 0.75" in h100.memory_source and not h100.notes
    # Memory given alone: the named kind still gives the bandwidth (the issue: a "CPU guess" of 100 GB/s).
    mixed = planning.plan_device("h200", cpu, memory_gib=80)
    assert (mixed.bandwidth_gbps, mixed.memory_bytes) == (3689.0, int(80 * gib * 0.9))
    assert mixed.memory_source == "--device-memory-gib, x 0.9 gpu_memory_utilization"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")
    assert planning.plan_device("a100-40gb", cpu, gpu_memory_utilization=1).memory_bytes == int(40 * gib * 0.95)
    assert planning.plan_device("a100", cpu, bandwidth_gbps=1000).bandwidth_gbps == 1000
    # No kind named on a CPU: this machine's numbers, labelled, with a note on planning for GPUs.
    local = planning.plan_device(None, cpu, memory_gib=80)
    assert local.bandwidth_gbps == planning.CPU_BANDWIDTH_GBPS and "guess" in local.bandwidth_source
    assert any("--device h100" in n for n in local.notes)
    assert planning.plan_device(None, cpu).memory_bytes == int(partition.device_memory_bytes(cpu) * 0.9)


@pytest.mark.parametrize("device_kind,want", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA H100 PCIe", None), ("NVIDIA L4", None)])
def test_kind_of_a_jax_device(device_kind, want):
    from types import SimpleNamespace

    from jaxpipe import planning

    kind = planning.kind_of_device(SimpleNamespace(platform="gpu", device_kind=device_kind))
    assert (kind.name if kind else None) == want
