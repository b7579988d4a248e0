"""The device side of the continuous-batching engine: the state on the devices, the compiled programs, and
dispatching them without waiting.

``Engine`` owns the ``EngineState`` (KV caches, per-slot tables, the ring's in-flight activations), compiles
each program once per static spec (``PrefillSpec`` / ``DecodeSpec``: the only compile keys), and runs
prefill and decode dispatches asynchronously: a dispatch returns device arrays at once, and the host reads
them later with ``fetch`` while the devices run what was queued after. Which slot holds which request, and
what the tokens mean, is the scheduler's business (``jaxpipe.scheduler``).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from jaxpipe.pipeline import (DecodeSpec, EngineShape, PipelineModel, PrefillBatch, PrefillSpec, host_array)
from jaxpipe.sampling import SamplingTable, SamplingTensors


class Engine:
    """Runs prefill and decode dispatches over one ``EngineShape`` of slots on a laid-out model."""

    def __init__(self, model: PipelineModel, params: dict, shape: EngineShape) -> None:
        self.model, self.params, self.shape = model, params, shape
        self.state = model.new_state(shape)
        self.ring = model.ring(shape)
        self._programs: dict[DecodeSpec | PrefillSpec, Callable] = {}
        self.compile_s = 0.0          # time spent compiling, apart from running
        self._samp: tuple[int, int, SamplingTensors] | None = None   # (table version, width, tensors)
        self._tick = 0   # host copy of the ring's tick counter (the devices keep their own)

    @property
    def num_compiled(self) -> int:
        """Programs compiled so far (each distinct spec compiles once)."""
        return len(self._programs)

    @property
    def compiled_specs(self) -> list:
        return list(self._programs)

    def _compiled(self, spec, args: tuple) -> Callable:
        program = self._programs.get(spec)
        if program is None:
            build = self.model.decode_program if isinstance(spec, DecodeSpec) else self.model.prefill_program
            t0 = time.perf_counter()
            program = build(spec).lower(*args).compile()   # ahead of time: compile time is its own
            self.compile_s += time.perf_counter() - t0
            self._programs[spec] = program
        return program

    def sampling_tensors(self, table: SamplingTable, version: int, stop_width: int) -> SamplingTensors:
        """``table`` on the devices, uploaded again only when it changed (``version``) or its width did."""
        if self._samp is None or self._samp[:2] != (version, stop_width):
            arrays = table.arrays(stop_width)
            self._samp = (version, stop_width,
                          SamplingTensors(**{k: self.model.replicate(v) for k, v in arrays.items()}))
        return self._samp[2]

    def prefill(self, spec: PrefillSpec, samp: SamplingTensors, batch: PrefillBatch) -> tuple:
        """Queue a prefill dispatch; returns its outputs as device arrays (``pipeline.SAMPLE_OUTPUTS``, the
        logits buffer, then ``pipeline.SCORE_OUTPUTS``)."""
        rep = self.model.replicate
        next_tokens = batch.next_tokens if spec.score else np.zeros((spec.batch, 0), np.int32)
        args = (self.params, self.state, samp, rep(batch.tokens), rep(batch.slots), rep(batch.start),
                rep(batch.length), rep(batch.final), rep(batch.end), rep(next_tokens))
        self.state, outs = self._compiled(spec, args)(*args)
        return outs

    def decode(self, spec: DecodeSpec, samp: SamplingTensors, release: np.ndarray) -> tuple[int, tuple]:
        """Queue a decode dispatch; returns (its first tick, its outputs as device arrays)."""
        tick0 = self._tick
        args = (self.params, self.state, samp, self.model.replicate(release))
        self.state, outs = self._compiled(spec, args)(*args)
        self._tick = tick0 + self.ring.ticks_for_steps(spec.steps)
        return tick0, outs

    @property
    def readable_stage(self) -> int | None:
        """The stage whose copy of the outputs this process reads: the first stage's (where the sampled tokens
        arrive) if it holds one of its devices, else the last stage's (which sent them, the same values), or
        None when it holds neither (a middle process of a run over 3+ processes: the scheduler relays)."""
        S = self.model.layout.stages
        mine = {s for s in range(S) for d in self.model.mesh.devices[s] if d.process_index == jax.process_index()}
        return 0 if 0 in mine else S - 1 if S - 1 in mine else None

    def fetch(self, outs: tuple, from_last: tuple[int, ...] = ()) -> list[np.ndarray]:
        """A dispatch's outputs as NumPy arrays (blocks until the dispatch has run), from ``readable_stage``;
        the outputs at positions ``from_last`` (recorded logits: tests) from the last stage."""
        last, stage = self.model.layout.stages - 1, self.readable_stage
        return [host_array(o, last if i in from_last or stage == last else 0) for i, o in enumerate(outs)]

    def block(self) -> None:
        jax.block_until_ready(self.state.tick)

