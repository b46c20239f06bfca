"""How sure a comparison of two runs is: paired bootstrap intervals over clips and the
exact McNemar test, for the ablation report.

Two runs answer the same questions (and score the same tokens), so every comparison is
paired. Questions of one clip share its frames and are not independent: the bootstrap
resamples whole clips. The intervals cover the questions asked, not the training seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
CHUNK = 500  # resamples drawn at once: 500 × 1,500 clips × 3 × 8 bytes = 18 MB


@dataclass(frozen=True)
class Interval:
    """Δ = run b − run a, with its bootstrap interval at `LEVEL`, on `questions`
    questions (or tokens) of `clips` clips."""

    delta: float
    low: float
    high: float
    questions: int
    clips: int

    @property
    def spans_zero(self) -> bool:
        """Not distinguishable from noise at this level."""
        return self.low <= 0 <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    clips: Sequence[Hashable],
    weights: Sequence[float] | None = None,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Δ = Σb/Σw − Σa/Σw and its percentile interval over `resamples` draws of the clips
    with replacement. Per question: `a`, `b` are the runs' scores and `weights` 1 (the
    default), or their summed token losses and `weights` its token count."""
    if not len(a) == len(b) == len(clips) or (weights is not None and len(weights) != len(a)):
        raise ValueError("a, b, clips (and weights) must have one entry per question")
    if not len(a):
        raise ValueError("no questions to compare")
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=float)
    per_clip: dict[Hashable, np.ndarray] = defaultdict(lambda: np.zeros(3))
    for x, y, weight, clip in zip(a, b, w, clips, strict=True):
        per_clip[clip] += (x, y, weight)
    sums = np.array(list(per_clip.values()))  # (clips, [a, b, weight])
    delta = (sums[:, 1].sum() - sums[:, 0].sum()) / sums[:, 2].sum()
    rng = np.random.default_rng(seed)
    totals = np.empty((resamples, 3))
    for start in range(0, resamples, CHUNK):  # (chunk, clips, 3) at a time, not all draws
        drawn = rng.integers(0, len(sums), size=(min(CHUNK, resamples - start), len(sums)))
        totals[start : start + len(drawn)] = sums[drawn].sum(axis=1)
    deltas = (totals[:, 1] - totals[:, 0]) / totals[:, 2]
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail], method="inverted_cdf")
    return Interval(float(delta), float(low), float(high), len(a), len(sums))


def bootstrap_mean(
    values: Sequence[float], clips: Sequence[Hashable], resamples: int = 10_000, seed: int = 0
) -> Interval:
    """One run's mean score and its percentile interval over draws of the clips: the
    Interval's `delta` is the mean (its difference from zero)."""
    if len(values) != len(clips):
        raise ValueError("values and clips must have one entry per question")
    return paired_bootstrap([0.0] * len(values), values, clips, resamples=resamples, seed=seed)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: under no difference, each question one run gets
    right and the other wrong is a fair coin."""
    if len(a_correct) != len(b_correct):
        raise ValueError("both runs must answer the same questions")
    only_a = sum(x and not y for x, y in zip(a_correct, b_correct, strict=True))
    only_b = sum(y and not x for x, y in zip(a_correct, b_correct, strict=True))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def questions_for_half_width(half_width: float, discordant_share: float) -> int:
    """Questions a paired yes/no accuracy difference needs for a 95% interval of
    ±`half_width` when `discordant_share` of the pairs disagree (normal approximation,
    no true difference: the variance of a paired difference is the discordant share)."""
    return math.ceil((1.959964 / half_width) ** 2 * discordant_share)
