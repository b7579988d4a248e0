"""The ring's arithmetic: which microbatch each pipeline stage runs at each tick.

One object owns it, so the device programs (traced ``jnp`` ints), the host that reads their outputs (Python
ints) and the tools agree. Every method works on both.

Decode (the ring). ``S`` stages, ``M`` microbatches of rows, ``R = max(M, S)`` ring slots (slots ``>= M`` are
empty: the bubble when ``M < S``). At tick ``t`` stage ``s`` runs slot ``(t - s) mod R``; its output moves on to
stage ``s + 1``; the last stage's output becomes logits and a sampled token, which the first stage feeds for
the same slot ``R`` ticks after it last fed it. With ``M >= S`` no stage ever waits. The tick counter keeps
running across dispatches, so cutting decode into dispatches of many ticks adds no bubble, and any
``R`` consecutive ticks give every slot exactly one token.

Prefill (GPipe). ``Mp`` microbatches through ``S`` stages take ``Mp + S - 1`` ticks: at tick ``t`` stage ``s``
runs microbatch ``t - s`` when that is in ``[0, Mp)`` and idles otherwise; the bubble is
``(S - 1) / (Mp + S - 1)`` of the stage-ticks.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RingSchedule:
    """Decode ring of ``stages`` stages over ``microbatches`` microbatches."""

    stages: int
    microbatches: int

    @property
    def slots(self) -> int:
        """R: ring slots (microbatches plus empty bubble slots when there are fewer microbatches than stages)."""
        return max(self.stages, self.microbatches)

    def slot(self, stage, tick):
        """The ring slot stage ``stage`` runs at tick ``tick`` (negative ticks give garbage: check ``started``)."""
        return (tick - stage) % self.slots

    def started(self, stage, tick):
        """Whether the ring has reached stage ``stage`` by tick ``tick`` (it starts empty at tick 0)."""
        return tick - stage >= 0

    def runs(self, stage, tick):
        """Whether stage ``stage`` holds a real microbatch at tick ``tick`` (not a bubble, not before start)."""
        return self.started(stage, tick) & (self.slot(stage, tick) < self.microbatches)

    def output_slot(self, tick):
        """The slot whose token the last stage produces at tick ``tick``."""
        return self.slot(self.stages - 1, tick)

    def outputs(self, tick):
        """Whether the last stage produces a real microbatch's token at tick ``tick``."""
        return self.runs(self.stages - 1, tick)

    def output_slots(self, tick0: int, ticks: int) -> list[int | None]:
        """Host side: for each tick of a dispatch starting at ``tick0``, the microbatch whose token the
        last stage produced there, or None for a bubble."""
        return [self.output_slot(t) if self.outputs(t) else None for t in range(tick0, tick0 + ticks)]

    def ticks_for_steps(self, steps: int) -> int:
        """Ticks that give every microbatch exactly ``steps`` tokens."""
        return steps * self.slots


@dataclasses.dataclass(frozen=True)
class PrefillSchedule:
    """GPipe over ``microbatches`` microbatches of prompt chunks through ``stages`` stages."""

    stages: int
    microbatches: int

    @property
    def ticks(self) -> int:
        return self.microbatches + self.stages - 1

    def microbatch(self, stage, tick):
        """The microbatch stage ``stage`` runs at tick ``tick`` (check ``runs``)."""
        return tick - stage

    def runs(self, stage, tick):
        mb = tick - stage
        return (mb >= 0) & (mb < self.microbatches)

    def output_microbatch(self, tick):
        """The microbatch the last stage finishes at tick ``tick`` (check ``outputs``)."""
        return tick - (self.stages - 1)

    def outputs(self, tick):
        return self.runs(self.stages - 1, tick)

    @property
    def bubble(self) -> float:
        return (self.stages - 1) / self.ticks
