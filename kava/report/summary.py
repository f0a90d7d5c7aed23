"""summary.json: every model's accuracy, NLL and held-out KV scores, and every arm against the
control arm (and each report.contrasts pair) with kava.stats's seed_level_test (headline t
interval, exact sign-flip p, per-seed differences, two-level bootstrap beside)."""

import numpy as np

from kava.errors import KavaError
from kava.report.load import seeded
from kava.stats import bootstrap_ci, gap_recovered, gap_recovered_from_init, seed_level_test


def _records(evals):
    """(label, kind, seed, EVAL) for every evaluated model, with the inputs checked: each record
    has its keys and all were scored on the same examples."""
    missing = [k for k in ("init", "teachers", "arms") if k not in evals]
    if missing:
        raise KavaError(f"evaluation inputs lack {missing}")
    rows = [("init", "init", None, evals["init"])]
    rows += [(name, "teacher", None, rec) for name, rec in evals["teachers"].items()]
    rows += [(arm, "arm", seed, rec) for arm, runs in evals["arms"].items()
             for seed, rec in seeded(runs).items()]
    reference = None
    for label, _, seed, rec in rows:
        where = label if seed is None else f"{label}/seed{seed}"
        for key in ("accuracy", "nll", "kv_cosine", "per_example"):
            if key not in rec:
                raise KavaError(f"evaluation of {where}: missing key '{key}'")
        ids = (set(rec["per_example"]["id"]), set(_covered(rec, "correct")))
        if reference is None:
            reference = (where, ids)
        elif ids != reference[1]:
            raise KavaError(f"evaluation of {where} covers {len(ids[0])} examples ({len(ids[1])} "
                            f"generated) that differ from the {len(reference[1][0])} "
                            f"({len(reference[1][1])}) of {reference[0]}: results would be about "
                            f"different data")
    return rows


def _covered(rec, key):
    """The example ids a per-example list covers: every example for nll; for correct, the first
    eval.generate_examples, the ones generated."""
    return rec["per_example"]["id"][:len(rec["per_example"][key])]


def _aligned(rec, ids, key):
    """Per-example `key` of a record, in the order of `ids`."""
    index = {i: k for k, i in enumerate(rec["per_example"]["id"])}
    values = rec["per_example"][key]
    return np.array([float(values[index[i]]) for i in ids])


def _pooled(recs, key):
    """Per-example values concatenated over seeds, with example ids as bootstrap groups."""
    ids = list(_covered(recs[0], key))
    values = np.concatenate([_aligned(r, ids, key) for r in recs])
    return values, np.tile(np.arange(len(ids)), len(recs))


def spread_over_seeds(values):
    """Mean and sample std over seeds; std is None with one seed (no spread to report)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    return {"mean": float(values.mean()), "std": std, "n_seeds": len(values)}


def _kv_scores(label, recs, key):
    """A held-out KV score (kv_cosine, kv_r2) over seeds, overall and per teacher; (None, None)
    when the model has none (init, teachers)."""
    present = [r.get(key) is not None for r in recs]
    if any(present) and not all(present):
        raise KavaError(f"evaluation of {label}: {key} is present for some seeds only")
    if not all(present):
        return None, None
    teachers = recs[0][key]["per_teacher"]
    return (spread_over_seeds([r[key]["overall"] for r in recs]),
            {t: spread_over_seeds([r[key]["per_teacher"][t] for r in recs]) for t in teachers})


def _grid(runs, seeds, ids, key):
    """Per-example `key` of an arm as `[seeds, examples]`, examples in the order of `ids`."""
    return np.stack([_aligned(runs[s], ids, key) for s in seeds])


def _compare(arm_runs, reference_runs, best_teacher, n_boot, seed):
    """One arm against a reference arm on the seeds both ran (None if they share none)."""
    common = [s for s in arm_runs if s in reference_runs]
    if not common:
        return None
    # Pair on example id: the reference's records may list the examples in another order.
    ids = list(arm_runs[common[0]]["per_example"]["id"])
    entry = {"seeds": common, "n_examples": len(ids)}
    for metric, key in (("accuracy", "correct"), ("nll", "nll")):
        covered = list(_covered(arm_runs[common[0]], key))
        diff = _grid(arm_runs, common, covered, key) - _grid(reference_runs, common, covered, key)
        entry[metric] = seed_level_test(diff, n_boot=n_boot, seed=seed)
    entry["gap_recovered"] = None
    if best_teacher is not None:
        entry["gap_recovered"] = gap_recovered(
            _grid(reference_runs, common, ids, "nll"), _grid(arm_runs, common, ids, "nll"),
            _aligned(best_teacher, ids, "nll"), n_boot=n_boot, seed=seed)
    return entry


def _models(rows, n_boot, seed):
    """summary.json's "models" (build_summary's docstring) from _records' rows."""
    grouped = {}
    for label, kind, _, rec in rows:
        grouped.setdefault((label, kind), []).append(rec)
    models = {}
    for (label, kind), recs in grouped.items():
        if label in models:
            raise KavaError(f"model label '{label}' is used twice (init, a teacher or an arm)")
        entry = {"kind": kind, "n_examples": len(recs[0]["per_example"]["id"])}
        for metric, key in (("accuracy", "correct"), ("nll", "nll")):
            values, groups = _pooled(recs, key)
            entry[metric] = {**spread_over_seeds([r[metric] for r in recs]),
                             "ci": bootstrap_ci(values, groups, n_boot=n_boot, seed=seed)["ci"]}
        entry["heldout_cos"], entry["heldout_cos_per_teacher"] = _kv_scores(label, recs,
                                                                            "kv_cosine")
        entry["heldout_r2"], entry["heldout_r2_per_teacher"] = _kv_scores(label, recs, "kv_r2")
        noises = [r["nll_noise"]["max_abs"] for r in recs if r.get("nll_noise")]
        entry["nll_noise_max"] = max(noises) if noises else None
        models[label] = entry
    return models


def build_summary(evals, control, contrasts, n_boot, seed):
    """The dict written as summary.json, from EVALS (module docstring).

    Every arm is compared with the control arm on the seeds both ran: the per-example difference
    arm − control, paired by seed and example, with kava.stats.seed_level_test's headline
    interval and p, and the two-level bootstrap (seeds, then examples) beside them.
    `contrasts`: more [arm, reference arm] pairs compared the same way (e.g. kv against its
    kv_shuffled control). NLL is per token, so the reference teacher of gap recovered is the
    best (lowest NLL) among the teachers whose tokenizer equals the student's:

        {"control": str,
         "comparisons": {"<arm>": {"seeds": [...], "n_examples": int,
                         "nll", "accuracy": kava.stats.seed_level_test's dict (headline "ci"
                             and "interval", sign-flip "p_value" and "p_floor", "per_seed",
                             "bootstrap", "n_seeds", "n_examples", "seed_variance"),
                         "gap_recovered": None | {"mean", "ci"}}},  # (NLL_c − NLL_arm)/(NLL_c − NLL_teacher)
         "comparisons_skipped": None | str,        # why there is no comparison
         "contrasts": [{"arm", "reference", ...the same as a comparison...}],
         "heldout_cos", "heldout_r2": {"<arm>": float | None},   # mean over seeds
         "gap_recovered_from_init": {"<arm>": float | None},     # anchored at the untrained init
         "gap_skipped": None | str,                # why there is no reference teacher
         "best_teacher": None | {"name", "nll"},   # among teachers with init's tokenizer
         "models": {"<label>": {"kind": "init"|"arm"|"teacher", "n_examples": int,
                    "same_tokenizer_as_init": bool | None,   # None: a record lacks "tokenizer"
                    "accuracy"/"nll": {"mean", "std", "n_seeds", "ci"},
                    "heldout_cos", "heldout_r2": None | {"mean", "std", "n_seeds"},
                    "heldout_cos_per_teacher", "heldout_r2_per_teacher":
                        None | {"<teacher>": {"mean", "std", "n_seeds"}}}}}
    """
    rows = _records(evals)
    models = _models(rows, n_boot, seed)
    arms = {arm: seeded(runs) for arm, runs in evals["arms"].items()}
    init_tokenizer = evals["init"].get("tokenizer")
    for label, _, _, rec in rows:
        # Unknown (None) on either side is taken as comparable: records that predate the field.
        models[label]["same_tokenizer_as_init"] = (
            None if init_tokenizer is None or rec.get("tokenizer") is None
            else rec["tokenizer"] == init_tokenizer)
    teachers = {name: models[name]["nll"]["mean"] for name in evals["teachers"]
                if models[name]["same_tokenizer_as_init"] is not False}
    best = min(teachers, key=teachers.get) if teachers else None
    init_nll = models["init"]["nll"]["mean"]
    gap_skipped = None
    if not evals["teachers"]:
        gap_skipped = "no teacher evaluated"
    elif best is None:
        gap_skipped = ("no evaluated teacher shares the student's tokenizer, and NLL per token "
                       "does not compare across tokenizers")
    summary = {
        "control": control, "comparisons": {}, "comparisons_skipped": None,
        "heldout_cos": {arm: (models[arm]["heldout_cos"] or {}).get("mean") for arm in arms},
        "heldout_r2": {arm: (models[arm]["heldout_r2"] or {}).get("mean") for arm in arms},
        "gap_recovered_from_init": {
            arm: gap_recovered_from_init(init_nll, models[arm]["nll"]["mean"], teachers[best])
            if best else None for arm in arms},
        "gap_skipped": gap_skipped,
        "best_teacher": {"name": best, "nll": teachers[best]} if best else None,
        "models": models,
    }
    best_teacher = evals["teachers"][best] if best else None
    unknown = [name for pair in contrasts for name in pair if name not in arms]
    if unknown:
        raise KavaError(f"report.contrasts names arm '{unknown[0]}', which this run does not "
                        f"have ({', '.join(arms)})")
    summary["contrasts"] = [{"arm": arm, "reference": reference,
                             **(_compare(arms[arm], arms[reference], best_teacher, n_boot, seed)
                                or {"seeds": []})}
                            for arm, reference in contrasts]
    if control not in arms:
        summary["comparisons_skipped"] = (f"the comparisons need the control arm '{control}' "
                                          f"(report.control); this run has "
                                          f"{', '.join(arms) or 'none'}")
        return summary
    summary["comparisons"] = {arm: _compare(runs, arms[control], best_teacher, n_boot, seed)
                              for arm, runs in arms.items() if arm != control}
    return summary


def model_name(label, summary):
    """How a model of the summary is named in tables and plots."""
    return f"teacher: {label}" if summary["models"][label]["kind"] == "teacher" else label
