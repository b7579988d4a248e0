"""The pipeline tick crosses stages once (issue 13): the optimized HLO of the decode program holds exactly one
collective-permute (activations and sampled tokens together, around the ring), and every other collective
stays inside a stage (over ``tensor``). CPU, a tiny random Llama, PP 2 x TP 1 and PP 2 x TP 2, with every
sampling feature on (sorting filters, penalties, logprobs), so no sampler path hides a collective."""

import re

import jax
import numpy as np
import pytest

from jaxpipe import partition
from jaxpipe.config import LlamaConfig
from jaxpipe.pipeline import DecodeSpec, EngineShape, PipelineModel
from jaxpipe.sampling import SamplerSpec, SamplingTable, SamplingTensors

OPS = ("collective-permute", "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-broadcast")


def collectives(text: str) -> list[tuple[str, str]]:
    """(op, its replica groups or source-target pairs) of every collective in optimized HLO text."""
    out = []
    for line in text.splitlines():
        m = re.search(r"= \S+ (" + "|".join(OPS) + r")(?:-start)?\(", line)
        if m:
            g = re.search(r"(replica_groups|source_target_pairs)=(\{[^ ]*\}|\[[^ ]*)", line)
            out.append((m.group(1), g.group(2) if g else ""))
    return out


@pytest.mark.parametrize("pp,tp", [(2, 1), (2, 2)])
def test_decode_tick_has_one_cross_stage_transfer(pp, tp, tiny_checkpoint):
    path, _ = tiny_checkpoint(layers=4, heads=4, kv_heads=2)
    cfg = LlamaConfig.from_json(path)
    layout = partition.make_layout(cfg, pp, tp)
    pm = PipelineModel(cfg, layout, partition.make_mesh(layout, jax.devices()[:pp * tp]), np.float32)
    shape = EngineShape(microbatches=2, rows=2, cache_len=64)
    samp = SamplingTensors(**{k: pm.replicate(v) for k, v in SamplingTable(shape.slots).arrays(8).items()})
    spec = DecodeSpec(shape=shape, steps=2, kv_len=64,
                      sampler=SamplerSpec(num_logprobs=4, all_greedy=False, need_sort=True, penalties=True))
    text = pm.decode_program(spec).lower(pm.random_params(0), pm.new_state(shape), samp,
                                         pm.replicate(np.zeros(shape.slots, bool))).compile().as_text()
    found = collectives(text)
    permutes = [g for op, g in found if op == "collective-permute"]
    assert len(permutes) == 1, found
    # the ring: every stage sends to the next, the last to the first (per tensor shard)
    pairs = {tuple(map(int, p.split(","))) for p in re.findall(r"\{(\d+,\d+)\}", permutes[0])}
    assert pairs == {(s * tp + t, ((s + 1) % pp) * tp + t) for s in range(pp) for t in range(tp)}
    stage_of = {d: d // tp for d in range(pp * tp)}
    others = [(op, g) for op, g in found if op != "collective-permute"]
    if tp == 1:
        assert others == [], others
    else:
        assert others, "tensor parallelism needs collectives inside a stage"
    for op, groups in others:
        for group in re.findall(r"\{([\d,]+)\}", groups):
            members = [int(x) for x in group.split(",")]
            assert len({stage_of[d] for d in members}) == 1, f"{op} spans stages: {groups}"
