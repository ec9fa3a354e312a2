"""The study's statistics, against values worked out by hand."""

import pytest

from maskattn_shapes.study import mcnemar_p, wilson


def test_wilson_interval_of_8_in_10():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_stays_within_0_and_1():
    assert wilson(0, 160)[0] == 0.0 and wilson(160, 160)[1] == 1.0


def test_mcnemar_counts_only_discordant_pairs():
    # 6 prompts right only with gates, none only without: two-sided exact p = 2 / 2^6
    gated = [True] * 6 + [True, False] * 5
    base = [False] * 6 + [True, False] * 5
    assert mcnemar_p(gated, base) == pytest.approx(2 / 64)
    assert mcnemar_p(base, gated) == pytest.approx(2 / 64)
    assert mcnemar_p(base, base) == 1.0
