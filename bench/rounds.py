"""The order the benchmark times its modes in, and the ratios it takes from the times.

The modes of a case are timed interleaved, round after round, so a load that changes during
the run (another job starting, the clock slowing as the machine heats) reaches the modes of a
round alike. A round visits the modes forward and then backward (``base, afan, advprop,
passes, passes, advprop, afan, base``): each mode's two visits lie symmetrically about the
round's middle, so a load that changes linearly within the round scales every mode's sum of
two visits by the same factor and cancels in their ratios. Each round gives its own ratios;
a case reports their median and range over the rounds.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

STEP, PASSES = "step", "passes"  # what a visit times: a mode's training step, or the passes it needs

# A step cannot take less time than the passes it is made of: step / needed below this means
# the two were timed under different conditions, and the figure is no result.
UNRELIABLE_BELOW = 0.9
# Above this, the step spends measurably more than its passes: the row says on what.
OVERHEAD_ABOVE = 1.05


def schedule(modes: Sequence[str], with_passes: Sequence[str]) -> list[tuple[str, str]]:
    """One round's visits, ``(mode, STEP or PASSES)``: forward, then the same backward."""
    visits = [(mode, STEP) for mode in modes] + [(mode, PASSES) for mode in with_passes]
    return visits + visits[::-1]


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))


def per_round(times: Sequence[float]) -> list[float]:
    """Each round's total of a visit's two timings (``times`` in visit order)."""
    return [a + b for a, b in zip(times[::2], times[1::2])]


def ratio(times: Sequence[float], reference: Sequence[float]) -> Spread:
    """``times / reference`` round by round, summarised."""
    return Spread.of([t / r for t, r in zip(per_round(times), per_round(reference))])


@dataclass(frozen=True)
class Summary:
    """One mode of a case: its step time and its ratios over the rounds."""

    step_s: float  # median of the step's visits
    x_ref: Spread  # step / the reference mode's step
    x_versus: Optional[Spread]  # step / the compared mode's step (AdvProp's), where there is one
    needed_s: Optional[float]  # median of the passes' visits, where the mode has them
    step_over_needed: Optional[Spread]

    @property
    def reliable(self) -> bool:
        return self.step_over_needed is None or self.step_over_needed.median >= UNRELIABLE_BELOW

    @property
    def overhead(self) -> bool:
        """Whether the step measurably exceeds the passes it needs."""
        return self.step_over_needed is not None and self.step_over_needed.median > OVERHEAD_ABOVE


def summarise(times: dict[tuple[str, str], list[float]], modes: Sequence[str], reference: str,
              versus: Optional[str] = None) -> dict[str, Summary]:
    """Each mode's ``Summary`` from the timings of its visits (``times[(mode, STEP or PASSES)]``,
    in visit order, two per round)."""
    summaries = {}
    for mode in modes:
        step, passes = times[(mode, STEP)], times.get((mode, PASSES))
        summaries[mode] = Summary(
            step_s=statistics.median(step),
            x_ref=ratio(step, times[(reference, STEP)]),
            x_versus=ratio(step, times[(versus, STEP)]) if versus in modes else None,
            needed_s=statistics.median(passes) if passes else None,
            step_over_needed=ratio(step, passes) if passes else None,
        )
    return summaries
