"""kava.stats: the example bootstrap (grouping), the two-level (seeds, then examples) bootstrap's
coverage on data with a known seed effect, and gap recovered against hand computations."""

import numpy as np
import pytest
import scipy.stats

from bench.coverage import SCENARIOS, measure
from kava.errors import KavaError
from kava.stats import (bootstrap_ci, gap_recovered, gap_recovered_from_init, seed_level_test,
                        sign_flip_p, two_level_bootstrap)


def _width(result):
    return result["ci"][1] - result["ci"][0]


# ---- bootstrap_ci over examples (or groups of values) ------------------------------------------

def test_bootstrap_covers_a_known_paired_difference():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1, 400)  # per-example difficulty, cancels in the pairing
    a = shared + 0.3 + rng.normal(0, 0.5, 400)
    b = shared + rng.normal(0, 0.5, 400)
    result = bootstrap_ci(a - b, n_boot=4000)
    lo, hi = result["ci"]
    assert set(result) == {"mean", "ci", "p_value", "significant"}
    assert result["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert lo < 0.3 < hi and lo > 0
    assert result["significant"] and result["p_value"] < 0.01
    assert bootstrap_ci(a - b, n_boot=4000) == result  # deterministic given seed
    assert bootstrap_ci(a - b, n_boot=4000, seed=1)["ci"] != result["ci"]


def test_bootstrap_zero_difference_includes_zero():
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 1, 300)
    a, b = shared + rng.normal(0, 0.5, 300), shared + rng.normal(0, 0.5, 300)
    result = bootstrap_ci(a - b, n_boot=4000)
    lo, hi = result["ci"]
    assert lo < 0 < hi
    assert not result["significant"] and result["p_value"] > 0.05


def test_bootstrap_groups_resample_whole_examples():
    """Three seeds that nearly replicate each other carry about one seed's information: pooled
    with groups = example id the CI is as wide as one seed's, not sqrt(3) narrower."""
    rng = np.random.default_rng(3)
    effect = rng.normal(0.1, 1, 200)
    seeds = [effect + rng.normal(0, 0.01, 200) for _ in range(3)]
    pooled, ids = np.concatenate(seeds), np.tile(np.arange(200), 3)
    one_seed = bootstrap_ci(seeds[0], n_boot=4000)
    grouped = bootstrap_ci(pooled, groups=ids, n_boot=4000)
    ungrouped = bootstrap_ci(pooled, n_boot=4000)
    assert grouped["mean"] == pytest.approx(pooled.mean())
    assert _width(grouped) == pytest.approx(_width(one_seed), rel=0.15)
    assert _width(ungrouped) < 0.7 * _width(grouped)


def test_bootstrap_group_ids_need_not_be_integers_or_sorted():
    values = np.array([1.0, 5.0, 2.0, 6.0])
    by_int = bootstrap_ci(values, groups=[0, 1, 0, 1], n_boot=500)
    by_name = bootstrap_ci(values, groups=["row 7", "row 2", "row 7", "row 2"], n_boot=500)
    # Either way two groups, with means 1.5 and 5.5: a resample's mean is one of 1.5, 3.5, 5.5.
    assert by_name["mean"] == by_int["mean"] == pytest.approx(3.5)
    assert set(by_int["ci"]) <= {1.5, 3.5, 5.5} and set(by_name["ci"]) <= {1.5, 3.5, 5.5}


def test_bootstrap_rejects_bad_input():
    with pytest.raises(KavaError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(KavaError, match="non-empty 1-D"):
        bootstrap_ci([[1.0, 2.0]])
    with pytest.raises(KavaError, match="2 group ids for 3 values"):
        bootstrap_ci([1, 2, 3], groups=[0, 1])


# ---- two-level bootstrap: seeds, then examples -------------------------------------------------

TRUE_MEAN = 0.2


def _seeded_data(rng, n_seeds=8, n_examples=40, seed_sd=0.3, example_sd=0.3, noise_sd=0.5):
    """`[seeds, examples]` arm − control differences: the true mean, plus a per-seed offset
    (training-seed variance), a per-example effect shared by the seeds, and noise."""
    return (TRUE_MEAN + rng.normal(0, seed_sd, (n_seeds, 1))
            + rng.normal(0, example_sd, (1, n_examples))
            + rng.normal(0, noise_sd, (n_seeds, n_examples)))


def test_two_level_bootstrap_covers_the_true_mean_when_seeds_vary():
    """Over 100 simulated studies, the two-level 95 % CI covers the true mean about 95 % of the
    time; an examples-only CI on the same data ignores the seed offsets and misses it often."""
    rng = np.random.default_rng(12345)
    two_level = examples_only = 0
    widths = []
    n_datasets = 100
    for study in range(n_datasets):
        values = _seeded_data(rng)
        result = two_level_bootstrap(values, n_boot=1000, seed=study)
        lo, hi = result["ci"]
        two_level += lo <= TRUE_MEAN <= hi
        groups = np.tile(np.arange(values.shape[1]), values.shape[0])
        naive = bootstrap_ci(values.ravel(), groups=groups, n_boot=1000, seed=study)
        examples_only += naive["ci"][0] <= TRUE_MEAN <= naive["ci"][1]
        widths.append((_width(result), _width(naive)))
    assert two_level / n_datasets >= 0.9
    assert examples_only / n_datasets <= 0.75
    assert np.mean([w for w, _ in widths]) > 1.3 * np.mean([n for _, n in widths])


def test_two_level_bootstrap_result():
    rng = np.random.default_rng(4)
    values = _seeded_data(rng, n_seeds=3, n_examples=50, seed_sd=0.01, noise_sd=0.1)
    result = two_level_bootstrap(values, n_boot=2000)
    assert set(result) == {"mean", "ci", "p_value", "significant", "n_seeds", "n_examples",
                           "seed_variance"}
    assert result["mean"] == pytest.approx(values.mean())
    assert result["n_seeds"] == 3 and result["n_examples"] == 50
    assert result["seed_variance"] == "estimated"
    lo, hi = result["ci"]
    assert lo < values.mean() < hi and lo > 0
    assert result["significant"] and result["p_value"] < 0.01
    assert two_level_bootstrap(values, n_boot=2000) == result  # deterministic given seed
    assert two_level_bootstrap(values, n_boot=2000, seed=1)["ci"] != result["ci"]
    null = two_level_bootstrap(values - values.mean(), n_boot=2000)
    assert null["ci"][0] < 0 < null["ci"][1] and not null["significant"]
    assert null["p_value"] > 0.5


def test_two_level_bootstrap_with_one_seed_says_seed_variance_is_not_estimated():
    rng = np.random.default_rng(5)
    values = rng.normal(0.1, 1, (1, 300))
    result = two_level_bootstrap(values, n_boot=4000)
    assert result["n_seeds"] == 1
    assert result["seed_variance"].startswith("not estimated")
    assert "one training seed" in result["seed_variance"]
    assert "test examples only" in result["seed_variance"]
    # With one seed there is nothing to resample at the seed level: the CI is the examples' one.
    assert _width(result) == pytest.approx(_width(bootstrap_ci(values[0], n_boot=4000)), rel=0.1)


def test_two_level_bootstrap_seed_offsets_widen_the_ci():
    """Same examples, same noise: seed offsets that the examples cannot show widen the CI."""
    rng = np.random.default_rng(6)
    base = rng.normal(0, 0.5, (6, 60))
    offsets = np.array([[-0.6], [0.6], [-0.3], [0.3], [0.0], [0.5]])
    steady = two_level_bootstrap(base, n_boot=2000)
    varying = two_level_bootstrap(base + offsets, n_boot=2000)
    assert _width(varying) > 2 * _width(steady)


def test_two_level_bootstrap_rejects_a_flat_list():
    with pytest.raises(KavaError, match=r"needs a \[seeds, examples\] array, got shape \(3,\)"):
        two_level_bootstrap([1.0, 2.0, 3.0])
    with pytest.raises(KavaError, match=r"got shape \(0, 0\)"):
        two_level_bootstrap(np.zeros((0, 0)))


# ---- gap recovered -----------------------------------------------------------------------------

def test_gap_recovered_against_a_hand_computation():
    control = np.array([[2.0, 3.0, 2.5, 2.5], [2.2, 2.8, 2.7, 2.3]])
    arm = np.array([[1.6, 2.6, 2.4, 1.8], [1.8, 2.4, 2.2, 2.2]])
    teacher = np.array([1.0, 2.0, 1.5, 1.5])
    result = gap_recovered(control, arm, teacher, n_boot=2000)
    # control 2.5, arm 2.125, teacher 1.5: (2.5 − 2.125) / (2.5 − 1.5)
    assert result["mean"] == pytest.approx(0.375)
    lo, hi = result["ci"]
    assert lo <= 0.375 <= hi and lo < hi


def test_gap_recovered_ci_is_exact_when_every_example_recovers_the_same_share():
    rng = np.random.default_rng(7)
    teacher = rng.normal(1.0, 0.3, 30)
    control = teacher + rng.uniform(0.5, 1.5, (3, 30))
    arm = control - 0.4 * (control - teacher)  # each example closes 40 % of its own gap
    result = gap_recovered(control, arm, teacher, n_boot=500)
    assert result["mean"] == pytest.approx(0.4)
    assert result["ci"] == pytest.approx([0.4, 0.4])


def test_gap_recovered_is_none_when_the_teacher_is_no_better_than_the_control():
    control = np.full((2, 3), 2.0)
    arm = np.full((2, 3), 1.5)
    assert gap_recovered(control, arm, np.full(3, 2.0)) is None
    assert gap_recovered(control, arm, np.full(3, 3.0)) is None
    assert gap_recovered(control, arm, np.array([1.0, 2.0, np.nan])) is None


def test_gap_recovered_refuses_unpaired_shapes():
    with pytest.raises(KavaError, match="do not pair"):
        gap_recovered(np.ones((2, 3)), np.ones((3, 3)), np.zeros(3))
    with pytest.raises(KavaError, match="do not pair"):
        gap_recovered(np.ones((2, 3)), np.ones((2, 3)), np.zeros(4))
    with pytest.raises(KavaError, match=r"\[seeds, examples\]"):
        gap_recovered(np.ones(3), np.ones(3), np.zeros(3))


def test_gap_recovered_from_init():
    assert gap_recovered_from_init(2.0, 1.5, 1.0) == pytest.approx(0.5)
    assert gap_recovered_from_init(2.0, 2.5, 1.0) == pytest.approx(-0.5)
    assert gap_recovered_from_init(2.0, 1.5, 2.0) is None  # teacher no better than init
    assert gap_recovered_from_init(2.0, 1.5, 3.0) is None


# ---- the headline: t interval, exact sign-flip p, coverage -------------------------------------

def test_sign_flip_p_enumerates_every_flip():
    # 3 seeds of one sign: only all-same and all-flipped reach |mean|: 2 of 8.
    assert sign_flip_p([-0.1, -0.2, -0.15]) == pytest.approx(0.25)
    # Flipping 0.3 alone gives |sum| 0.1 (= observed) or 0.5; 0.1/0.2 flips give 0.3-0.5.
    assert sign_flip_p([0.3, -0.1, -0.1]) == pytest.approx(1.0)
    assert sign_flip_p([-1.0] * 5) == pytest.approx(2 / 32)


def test_seed_level_test_against_a_hand_computation():
    values = np.array([[1.0, 3.0], [2.0, 4.0], [6.0, 8.0]])  # seed means 2, 3, 7; example 3, 5
    result = seed_level_test(values, n_boot=500)
    seed_term, example_term = np.var([2, 3, 7], ddof=1) / 3, np.var([3, 5], ddof=1) / 2
    df = (seed_term + example_term) ** 2 / (seed_term ** 2 / 2 + example_term ** 2 / 1)
    half = scipy.stats.t.ppf(0.975, df) * np.sqrt(seed_term + example_term)
    assert result["interval"] == "t" and result["df"] == pytest.approx(df)
    assert result["ci"] == pytest.approx([4 - half, 4 + half])
    assert result["per_seed"] == [2.0, 3.0, 7.0]
    assert result["p_value"] == pytest.approx(0.25) and result["p_floor"] == 0.25
    assert set(result["bootstrap"]) == {"ci", "p_value", "significant"}
    one = seed_level_test(values[:1], n_boot=500)
    assert one["interval"] == "bootstrap" and one["bootstrap"] is None
    assert one["seed_variance"].startswith("not estimated")


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_headline_interval_covers_at_least_90_percent(n_seeds):
    """The headline t interval covers the known effect in >= 90 % of 200 simulated studies in
    every scenario of bench.coverage; the bootstrap's coverage is printed beside it (it falls to
    about 0.8 at 3 seeds when seeds and examples vary little: issue 16)."""
    for name, seed_sd, example_sd, noise_sd in SCENARIOS:
        cover = measure(n_seeds, seed_sd, example_sd, noise_sd, studies=200, n_boot=300)
        print(f"{name}, {n_seeds} seeds: t {cover['t']:.3f}, bootstrap {cover['bootstrap']:.3f}")
        assert cover["t"] >= 0.90, (name, cover)
