"""Confidence intervals for the report: percentile bootstraps over examples, and over training
seeds then examples.

A trained arm's result varies with two things: which test examples were drawn, and which
training seed ran (data order, projector init). A CI that resamples examples only says nothing
about the second, so an arm-versus-control difference is bootstrapped at two levels: the seeds
(each seed pairs the two arms: same data order and init), then the examples (each test example
pairs across seeds and arms). With one seed the seed level cannot be estimated, and the result
says so.
"""

import math

import numpy as np

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
