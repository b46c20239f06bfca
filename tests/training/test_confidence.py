import math

import numpy as np
import pytest

from robovqa_ft.evaluation.confidence import (
    Interval,
    bootstrap_mean,
    mcnemar_exact,
    paired_bootstrap,
    questions_for_half_width,
)


def test_mcnemar_matches_a_hand_worked_binomial():
    # 1 question only a gets right, 9 only b: p = 2 (C(10,0) + C(10,1)) / 2^10
    a = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 3
    b = [False] * 1 + [True] * 9 + [True] * 5 + [False] * 3
    assert mcnemar_exact(a, b) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    assert mcnemar_exact([True, False], [True, False]) == 1.0  # no discordant pair
    assert mcnemar_exact([True] * 3, [False] * 3) == pytest.approx(2 / 8)


def test_bootstrap_over_two_clips_gives_the_exact_percentiles():
    # Clip x: Δ +1 on each of its 2 questions; clip y: Δ 0 on its 2. Resamples of two
    # clips: {x,x} (p 1/4, Δ 1), {x,y} (1/2, Δ 0.5), {y,y} (1/4, Δ 0): the 2.5th and
    # 97.5th percentiles are 0 and 1 exactly.
    result = paired_bootstrap(a=[0, 0, 1, 1], b=[1, 1, 1, 1], clips=["x", "x", "y", "y"])
    assert result == Interval(delta=0.5, low=0.0, high=1.0, questions=4, clips=2)
    assert result.spans_zero and result.half_width == 0.5


def test_a_single_runs_mean_interval_enumerates_over_two_clips():
    # Clip x: one question scored 1; clip y: three scored 0. Mean 1/4. Resamples: {x,x}
    # (p 1/4, mean 1), {x,y} (1/2, 1/4), {y,y} (1/4, 0): percentiles 0 and 1.
    result = bootstrap_mean([1, 0, 0, 0], ["x", "y", "y", "y"])
    assert result == Interval(delta=0.25, low=0.0, high=1.0, questions=4, clips=2)
    # Every clip with the same mean: no resample can move it.
    same = bootstrap_mean([0, 1, 1, 0, 0.5, 0.5], ["p", "p", "q", "q", "r", "r"], seed=7)
    assert (same.delta, same.low, same.high, same.clips) == (0.5, 0.5, 0.5, 3)
    with pytest.raises(ValueError, match="one entry per question"):
        bootstrap_mean([1, 0], ["x"])


def test_bootstrap_resamples_whole_clips_and_weights_tokens():
    rng = np.random.default_rng(1)
    clips = np.repeat(np.arange(40), 5)
    a = rng.random(200)
    b = a + 0.3  # every question better by 0.3: no resample can say otherwise
    result = paired_bootstrap(a, b, clips)
    assert result.delta == pytest.approx(0.3)
    assert result.low == pytest.approx(0.3) and result.high == pytest.approx(0.3)
    assert not result.spans_zero and result.clips == 40

    # Summed losses with token counts: Δ is the difference of token-level means.
    losses_a, losses_b, tokens = [2.0, 6.0], [1.0, 3.0], [1, 3]
    weighted = paired_bootstrap(losses_a, losses_b, ["p", "q"], weights=tokens)
    assert weighted.delta == pytest.approx(4 / 4 - 8 / 4)
    assert weighted.low <= weighted.delta <= weighted.high


def test_bootstrap_is_seeded_and_checks_its_inputs():
    clips = [0, 0, 1, 2, 2, 3]
    a, b = [1, 0, 1, 0, 1, 1], [1, 1, 1, 1, 0, 1]
    assert paired_bootstrap(a, b, clips, seed=3) == paired_bootstrap(a, b, clips, seed=3)
    with pytest.raises(ValueError, match="one entry per question"):
        paired_bootstrap([1], [1, 0], [0, 0])


def test_the_question_count_for_five_points_at_30_percent_discordant():
    n = questions_for_half_width(0.05, 0.30)
    assert n == 461
    assert 1.959964 * math.sqrt(0.30 / n) <= 0.05 < 1.959964 * math.sqrt(0.30 / (n - 1))
