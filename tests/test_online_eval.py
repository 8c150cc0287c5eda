"""Online evaluation's pure logic: arm assignment, team-draft interleaving, click models, statistics."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats

from loadtest.click_models import ClickModel
from loadtest.online_stats import ctr_difference, grid, outcomes_win_rate, queries_needed, win_rate
from serve.experiment import Arm, ExperimentConfig, assign
from serve.interleaving import Credit, credit, seeded_coin, team_draft


def two_arms(weights: tuple[float, float] = (1.0, 1.0), salt: str = "s") -> ExperimentConfig:
    return ExperimentConfig(arms=[Arm(name="a", variant="onnx-fp32", weight=weights[0]),
                                  Arm(name="b", variant="onnx-int8-dynamic", weight=weights[1])], salt=salt)


# ---- assignment ----------------------------------------------------------------------------------


def test_the_hash_split_is_deterministic_and_balanced() -> None:
    config = two_arms()
    users = [f"user-{i}" for i in range(20_000)]
    first = [assign(u, config).name for u in users]
    assert first == [assign(u, config).name for u in users]  # a user stays in one arm
    share = Counter(first)["a"] / len(users)
    assert abs(share - 0.5) < 3 * math.sqrt(0.25 / len(users))  # within 3 standard errors
    weighted = Counter(assign(u, two_arms((3.0, 1.0))).name for u in users)["a"] / len(users)
    assert abs(weighted - 0.75) < 3 * math.sqrt(0.75 * 0.25 / len(users))


def test_a_new_salt_reshuffles_and_integer_ids_hash_as_their_text() -> None:
    users = [f"u{i}" for i in range(2000)]
    a, b = ([assign(u, two_arms(salt=s)).name for u in users] for s in ("one", "two"))
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(users)
    assert 0.4 < agree < 0.6  # independent splits agree about half the time
    assert assign(17, two_arms()) == assign("17", two_arms())


def test_experiment_config_refuses_what_cannot_run() -> None:
    with pytest.raises(ValidationError, match="distinct"):
        ExperimentConfig(arms=[Arm(name="a", variant="v"), Arm(name="a", variant="w")])
    with pytest.raises(ValidationError, match="exactly two"):
        ExperimentConfig(mode="interleave", arms=[Arm(name=n, variant="v") for n in "abc"])
    with pytest.raises(ValidationError):
        ExperimentConfig(arms=[Arm(name="a", variant="v")])  # one arm is no experiment
    with pytest.raises(ValidationError):
        Arm(name="a/b", variant="v")
    with pytest.raises(ValidationError):
        Arm(name="a", variant="v", weight=0)


# ---- team-draft interleaving ------------------------------------------------------------------------


def coins(*flips: bool):
    it = iter(flips)
    return lambda: next(it)


def test_team_draft_against_a_hand_worked_example() -> None:
    """A = (1 2 3 4 5), B = (2 3 1 5 4). Round 1: even, the coin gives a first: a picks 1, b picks
    2. Round 2: even, the coin gives b first: b picks 3, a picks its best not yet shown, 4 (1, 2 and
    3 are in). Round 3: even, a first: a picks 5; b's list is used up (2 3 1 5 4 all shown)."""
    merged, teams = team_draft([1, 2, 3, 4, 5], [2, 3, 1, 5, 4], coins(True, False, True))
    assert merged == [1, 2, 3, 4, 5]
    assert teams == ["a", "b", "b", "a", "a"]
    # clicks on positions 1 and 2 (documents 2 and 3): both b's: b wins
    assert credit(teams, [1, 2]).winner == "b"
    assert credit(teams, [0, 1]).winner == "tie" and credit(teams, []).winner == "tie"
    assert credit(teams, [0, 3, 2]) == Credit(a=2, b=1)


def test_team_draft_keeps_each_teams_order_and_balances_the_picks() -> None:
    rng = np.random.default_rng(3)
    for trial in range(200):
        docs = list(range(int(rng.integers(1, 30))))
        a, b = list(rng.permutation(docs)), list(rng.permutation(docs))
        merged, teams = team_draft(a, b, seeded_coin(trial))
        assert sorted(merged) == docs  # every document once
        for team, ranking in (("a", a), ("b", b)):
            picked = [d for d, t in zip(merged, teams, strict=True) if t == team]
            assert picked == sorted(picked, key=ranking.index)  # a team's picks keep its ranking's order
        # same documents in both lists: neither runs out first, so the picks never differ by more than one
        assert all(abs(teams[:i].count("a") - teams[:i].count("b")) <= 1 for i in range(1, len(teams) + 1))


def test_identical_rankings_interleave_to_themselves_and_a_top_k_is_a_prefix() -> None:
    ranking = list("abcdefgh")
    merged, teams = team_draft(ranking, ranking, seeded_coin(0))
    assert merged == ranking and set(teams) <= {"a", "b"}
    top, _ = team_draft(ranking, ranking[::-1], seeded_coin(1), k=3)
    assert len(top) == 3 and top == team_draft(ranking, ranking[::-1], seeded_coin(1))[0][:3]


# ---- click models --------------------------------------------------------------------------------


def test_click_models_prefer_relevant_documents_and_the_top() -> None:
    rng = np.random.default_rng(0)
    grades = np.array([4, 0, 0, 0, 0, 0, 0, 0, 0, 4])
    for kind in ("cascade", "pbm"):
        model = ClickModel(kind, noise=0.05)
        counts = np.zeros(10)
        for _ in range(4000):
            for i in model.clicks(grades, rng):
                counts[i] += 1
        assert counts[0] > 5 * counts[1:9].mean()  # relevant beats irrelevant
        assert counts[0] > counts[9]  # the top beats the bottom at equal relevance
    for kind in ("cascade", "pbm"):  # a result page: nothing below `depth` is clicked
        assert all(p < 10 for _ in range(50) for p in ClickModel(kind, depth=10, stop=0).clicks([4] * 30, rng))


def test_pbm_clicks_match_examination_times_attractiveness() -> None:
    rng = np.random.default_rng(1)
    model = ClickModel("pbm", noise=0.1, position_bias=1.0, depth=5)
    grades = np.array([0, 1, 2, 3, 4])
    counts = np.zeros(5)
    n = 20_000
    for _ in range(n):
        for i in model.clicks(grades, rng):
            counts[i] += 1
    expected = model.examination(5) * model.attractiveness(grades)
    assert np.all(np.abs(counts / n - expected) <= 4 * np.sqrt(expected / n) + 1e-3), (counts / n, expected)


def test_click_model_parameters_are_checked() -> None:
    for bad in ({"noise": 1.0}, {"position_bias": -1}, {"stop": 2}, {"depth": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClickModel("pbm", **bad)


# ---- statistics ------------------------------------------------------------------------------------


def test_ctr_difference_matches_scipys_welch_test() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.poisson(0.8, 400), rng.poisson(0.95, 500)
    interval = ctr_difference(a, b)
    assert interval.estimate == pytest.approx(b.mean() - a.mean())
    t = stats.ttest_ind(b, a, equal_var=False)
    ci = t.confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((ci.low, ci.high))
    assert interval.significant == (t.pvalue < 0.05)


def test_win_rate_is_wilsons_interval() -> None:
    interval = win_rate(40, 60)
    assert interval.estimate == 0.6 and interval.n == 100
    ci = stats.binomtest(60, 100).proportion_ci(0.95, method="wilson")
    assert (interval.low, interval.high) == pytest.approx((ci.low, ci.high))
    assert interval.significant == bool(ci.low > 0.5)
    assert outcomes_win_rate(np.array([1, 1, -1, 0, 0])).n == 3


def test_queries_needed_finds_more_for_a_smaller_difference() -> None:
    rng = np.random.default_rng(4)
    strong = np.where(rng.random(2000) < 0.7, 1, -1)
    weak = np.where(rng.random(2000) < 0.55, 1, -1)

    def test_of(outcomes: np.ndarray):
        return lambda r, n: outcomes_win_rate(r.choice(outcomes, n)).low > 0.5

    n_strong, _ = queries_needed(test_of(strong), 2000, resamples=100)
    n_weak, _ = queries_needed(test_of(weak), 2000, resamples=100)
    assert n_strong is not None and n_weak is not None and n_strong < n_weak
    none, cap = queries_needed(lambda r, n: False, 100, resamples=10)
    assert none is None and cap == 100
    assert grid(16, 64) == [16, 19, 23, 27, 32, 38, 45, 54, 64]
