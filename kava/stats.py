"""Confidence intervals for the report: percentile bootstraps over examples, and over training
seeds then examples.

A trained arm's result varies with two things: which test examples were drawn, and which
training seed ran (data order, projector init). A CI that resamples examples only says nothing
about the second, so an arm-versus-control difference is bootstrapped at two levels: the seeds
(each seed pairs the two arms: same data order and init), then the examples (each test example
pairs across seeds and arms). With one seed the seed level cannot be estimated, and the result
says so.

That percentile bootstrap undercovers at 3 seeds (0.81 for nominal 95 % when seeds and examples
vary little, bench.coverage), so the report's headline for a difference is seed_level_test: a t
interval over seeds and examples and an exact sign-flip p over the seeds, the bootstrap beside.
"""

import itertools
import math

import numpy as np
import scipy.stats

from kava.errors import KavaError


def _draw_counts(rng, n, n_boot):
    """`[n_boot, n]` how often each of n items is drawn in each resample of size n."""
    picks = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)
    return counts


def _interval(boot, observed, alpha):
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    return {"mean": float(observed), "ci": [float(lo), float(hi)],
            "p_value": float(min(1.0, 2 * (tail + 1) / (len(boot) + 1))),
            "significant": bool(lo > 0 or hi < 0)}


def bootstrap_ci(values, groups=None, n_boot=10000, alpha=0.05, seed=0):
    """Mean of `values` with a percentile bootstrap CI that resamples groups (default: each value
    its own group; with values of several seeds and groups = example id, a resampled example
    brings all its seeds).

    Returns dict(mean, ci=[lo, hi], p_value, significant): p_value is the two-sided bootstrap p
    for mean = 0, 2·min(P(boot ≤ 0), P(boot ≥ 0)) with the +1 correction so it is never 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise KavaError(f"bootstrap needs a non-empty 1-D list of values, got shape {values.shape}")
    groups = np.arange(values.size) if groups is None else np.asarray(groups)
    if groups.shape != values.shape:
        raise KavaError(f"{groups.size} group ids for {values.size} values")
    _, group_index = np.unique(groups, return_inverse=True)
    sums = np.bincount(group_index, weights=values)
    counts = np.bincount(group_index).astype(np.float64)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    # Chunks keep the draw matrix small (1319 GSM8K examples x 10k resamples would be ~100 MB).
    chunk = max(1, 2_000_000 // sums.size)
    for start in range(0, n_boot, chunk):
        draws = _draw_counts(rng, sums.size, min(chunk, n_boot - start))
        boot[start:start + len(draws)] = (draws @ sums) / (draws @ counts)
    return _interval(boot, values.mean(), alpha)


def _two_level_means(grids, n_boot, seed):
    """For each `[S, E]` array of `grids`, its mean over the drawn seeds × drawn examples of
    each of n_boot two-level resamples (the same draws for every array, so they stay paired),
    in chunks that keep the draw matrices small."""
    rng = np.random.default_rng(seed)
    n_seeds, n_examples = grids[0].shape
    chunk = max(1, 2_000_000 // n_examples)
    means = [np.empty(n_boot) for _ in grids]
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        seeds, examples = _draw_counts(rng, n_seeds, size), _draw_counts(rng, n_examples, size)
        total = seeds.sum(1) * examples.sum(1)
        for grid, out in zip(grids, means):
            out[start:start + size] = ((seeds @ grid) * examples).sum(1) / total
    return means


def _check_grid(name, values):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise KavaError(f"{name} needs a [seeds, examples] array, got shape {values.shape}")
    return values


def two_level_bootstrap(values, n_boot=10000, alpha=0.05, seed=0):
    """Mean of `values` `[seeds, examples]` (e.g. arm − control NLL per seed and example) with a
    percentile CI that resamples the seeds, then the examples.

    Returns bootstrap_ci's dict plus n_seeds, n_examples and seed_variance: "estimated", or a
    sentence saying that one seed cannot estimate it (then the CI covers the examples only)."""
    values = _check_grid("two_level_bootstrap", values)
    (boot,) = _two_level_means([values], n_boot, seed)
    result = _interval(boot, values.mean(), alpha)
    result.update(n_seeds=values.shape[0], n_examples=values.shape[1],
                  seed_variance="estimated" if values.shape[0] > 1 else
                  "not estimated: one training seed, so the CI covers the test examples only")
    return result


def gap_recovered(control, arm, teacher, n_boot=10000, alpha=0.05, seed=0):
    """Fraction of the control-to-teacher NLL gap an arm closes, (control − arm) / (control −
    teacher), with a two-level bootstrap CI. control and arm: `[seeds, examples]` (seeds paired);
    teacher: `[examples]` (it does not train). 1 means teacher-level NLL, 0 the control's.

    Returns None when the teacher is not better than the control (no gap to recover)."""
    control, arm = _check_grid("gap_recovered", control), _check_grid("gap_recovered", arm)
    teacher = np.asarray(teacher, dtype=np.float64)
    if control.shape != arm.shape or teacher.shape != control.shape[1:]:
        raise KavaError(f"gap_recovered: control {control.shape}, arm {arm.shape} and teacher "
                        f"{teacher.shape} do not pair as [seeds, examples] and [examples]")
    gap = control.mean() - teacher.mean()
    if not math.isfinite(gap) or gap <= 0:
        return None
    closed, boot_gap = _two_level_means([control - arm, control - teacher[None]], n_boot, seed)
    # A resample in which the teacher is no better than the control has no gap to recover.
    boot = closed[boot_gap > 0] / boot_gap[boot_gap > 0]
    ci = ([float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2])] if boot.size
          else [math.nan, math.nan])
    return {"mean": float((control.mean() - arm.mean()) / gap), "ci": ci}


def gap_recovered_from_init(nll_init, nll_arm, nll_teacher):
    """Fraction of the init → teacher NLL gap an arm closes, (init − arm) / (init − teacher):
    anchored at the untrained student, so with a pruned init it mostly measures learning the
    answer format, which every arm does. None when the teacher is not better than init."""
    gap = nll_init - nll_teacher
    if not math.isfinite(gap) or gap <= 0:
        return None
    return (nll_init - nll_arm) / gap


def _t_interval(values, alpha):
    """Mean of `values` `[seeds, examples]` with a t interval whose standard error has a seed
    term and an example term, s²_seeds/S + s²_examples/E (s²_seeds: variance of the per-seed
    means; s²_examples: of the per-example means over seeds), and Welch–Satterthwaite degrees of
    freedom (Satterthwaite 1946), which fall to S − 1 when the seeds dominate. The seed term alone
    misses the choice of test examples; the two terms together count the example-by-seed noise
    twice, which errs wide."""
    n_seeds, n_examples = values.shape
    seed_term = values.mean(1).var(ddof=1) / n_seeds
    example_term = values.mean(0).var(ddof=1) / n_examples if n_examples > 1 else 0.0
    se2 = seed_term + example_term
    if se2 == 0:
        return [float(values.mean())] * 2, float(n_seeds - 1)
    df = se2 ** 2 / (seed_term ** 2 / (n_seeds - 1)
                     + (example_term ** 2 / (n_examples - 1) if n_examples > 1 else 0.0))
    half = scipy.stats.t.ppf(1 - alpha / 2, df) * math.sqrt(se2)
    return [float(values.mean() - half), float(values.mean() + half)], float(df)


def sign_flip_p(per_seed):
    """Exact two-sided p of a mean-zero per-seed difference: the share of all 2^n sign flips of
    the per-seed differences whose mean is at least as far from 0 as the observed one (Fisher's
    randomisation test). Its floor is 2 / 2^n: 0.25 at 3 seeds, 0.0625 at 5."""
    per_seed = np.asarray(per_seed, dtype=np.float64)
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=per_seed.size)))
    null = np.abs(flips @ per_seed)
    observed = abs(per_seed.sum())
    return float(np.mean(null >= observed * (1 - 1e-12)))


def seed_level_test(values, n_boot=10000, alpha=0.05, seed=0):
    """The headline statistics of an arm − reference difference `[seeds, examples]`.

    With two or more seeds: the mean, the t interval above ("ci", "interval": "t"), the exact
    sign-flip p over the per-seed means ("p_value", "p_floor" its smallest possible value),
    "per_seed" (each seed's mean difference) and the two-level bootstrap beside them
    ("bootstrap"), whose percentile CI undercovers at few seeds (bench.coverage measures both).
    With one seed nothing at the seed level can be estimated: the headline is the bootstrap over
    examples, "interval": "bootstrap", and seed_variance says so. "significant": the headline
    CI excludes 0."""
    values = _check_grid("seed_level_test", values)
    bootstrap = two_level_bootstrap(values, n_boot=n_boot, alpha=alpha, seed=seed)
    per_seed = [float(x) for x in values.mean(1)]
    if len(per_seed) < 2:
        return {**bootstrap, "interval": "bootstrap", "per_seed": per_seed, "p_floor": None,
                "df": None, "bootstrap": None}
    ci, df = _t_interval(values, alpha)
    return {"mean": float(values.mean()), "ci": ci, "df": df, "interval": "t",
            "p_value": sign_flip_p(per_seed), "p_floor": 2 / 2 ** len(per_seed),
            "significant": bool(ci[0] > 0 or ci[1] < 0), "per_seed": per_seed,
            "n_seeds": bootstrap["n_seeds"], "n_examples": bootstrap["n_examples"],
            "seed_variance": bootstrap["seed_variance"],
            "bootstrap": {k: bootstrap[k] for k in ("ci", "p_value", "significant")}}
