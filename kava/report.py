"""The run report: summary.json, a self-contained report.html (PNG plots inlined as base64) and a
report.md with the same tables and sentences, from plain dicts the report stage loads from JSON.

Input shapes (every function below documents which it takes):

EVALS, the evaluation records (each EVAL is what kava.evaluate.eval_record returns):
    {"init": EVAL,
     "teachers": {"<teacher>": EVAL},
     "arms": {"<arm>": {<seed>: EVAL}}}            # seed keys: ints (or "0", "1" from JSON)
    EVAL = {"n", "accuracy", "nll", "kv_cosine": None | {"overall": float,
            "per_teacher": {teacher: float}, "per_layer": {teacher: [float per student layer]}},
            "kv_r2": None | the same shape (held-out probe R² over the per-head-mean baseline),
            "per_example": {"id": [...], "correct": [bool], "nll": [float], ...}}

METRICS, the training logs (metrics.jsonl rows):
    {"<arm>": {<seed>: [{"step", "loss", "ce", "kv/<teacher>", "cos/<teacher>", "lr",
                         "tokens_per_s", "elapsed"}, ...]}}     # kv/ and cos/ keys optional

FACTS, what the run was (every key optional; a missing one shows as "n/a"; load_facts reads
them from the run's files):
    {"env": {...env.json...},
     "dims": {"<model>": {...dims/<model>.json: architecture, num_layers, num_kv_heads, head_dim,
                          kv_dim_total, layers: [{"kind", "window"?}], mismatches: [str]}},
     "data": {"source": str, "rows_hash": str, ...},
     "kv_storage": {"<teacher>": {"bytes_per_token", "dtype", "key_space", ...}},
     "benchmarks": {"<job>": [row, ...]},          # rows as read_benchmark returns them
     "evaluation": {...}}                          # the evaluation settings
"""

import base64
import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader
from matplotlib.figure import Figure

from kava.errors import KavaError
from kava.stats import bootstrap_ci, gap_recovered, gap_recovered_from_init, two_level_bootstrap

NA = "n/a"


def read_benchmark(path):
    """Rows of a Snakemake benchmark TSV (columns `s h:m:s max_rss max_vms max_uss max_pss io_in
    io_out mean_load cpu_time`, memory in MB) as dicts: numbers as floats, anything else (`NA`, `-`)
    as None, `h:m:s` as text. One row per repeat of the job."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("s", "max_rss") if c not in (reader.fieldnames or [])]
        if missing:
            raise KavaError(f"benchmark file {path}: missing column(s) {missing}")
        rows = []
        for row in reader:
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = value if key == "h:m:s" else float(value)
                except ValueError:
                    parsed[key] = None
            rows.append(parsed)
    return rows


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise KavaError(f"{what} {path}: unreadable ({type(err).__name__})") from None


def _eval_file(path):
    record = _read_json(path, "evaluation")
    examples = record.get("per_example", {}).get("id") if isinstance(record, dict) else None
    if not examples:
        raise KavaError(f"evaluation {path}: no evaluated examples (empty predictions)")
    return record


def load_evals(paths):
    """EVALS from the evaluate stage's files: {"init": path, "teachers": {name: path},
    "arms": {arm: {seed: path}}}."""
    return {"init": _eval_file(paths["init"]),
            "teachers": {name: _eval_file(path) for name, path in paths["teachers"].items()},
            "arms": {arm: {seed: _eval_file(path) for seed, path in runs.items()}
                     for arm, runs in paths["arms"].items()}}


def load_metrics(paths):
    """METRICS from {arm: {seed: metrics.jsonl path}}."""
    metrics = {}
    for arm, runs in paths.items():
        metrics[arm] = {}
        for seed, path in runs.items():
            try:
                lines = Path(path).read_text().splitlines()
                metrics[arm][seed] = [json.loads(line) for line in lines if line.strip()]
            except (OSError, ValueError) as err:
                raise KavaError(f"training metrics {path}: unreadable ({type(err).__name__})"
                                ) from None
    return metrics


def _flatten(mapping, prefix=""):
    """{"device": {"name": x}} -> {"device.name": x}: one table row per leaf."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _kv_storage(manifests):
    """Per teacher, what its stored KV costs, summed over its manifests (splits)."""
    by_teacher = {}
    for manifest in manifests:
        by_teacher.setdefault(manifest["teacher"]["name"], []).append(manifest)
    storage = {}
    for teacher, found in by_teacher.items():
        first = found[0]
        heads, head_dim = first["kv_shape"]
        tokens = sum(m["tokens"] for m in found)
        stored = sum(m["bytes"] for m in found)
        # What the same K and V would take as raw fp32, without any file format around them.
        fp32 = 2 * len(first["layers"]) * heads * head_dim * 4
        storage[teacher] = {
            "dtype": first["dtype"], "key_space": first["key_space"],
            "layers stored": len(first["layers"]), "KV heads × head_dim": f"{heads} × {head_dim}",
            "splits": ", ".join(f"{m['split']} {m['examples']} ex" for m in found),
            "tokens": tokens, "MB": round(stored / 2**20, 2),
            "bytes/token": round(stored / tokens, 1), "raw fp32 bytes/token": fp32,
            "stored / fp32": round(stored / tokens / fp32, 3),
            "truncated": sum(m["truncated"] for m in found),
            "skipped": sum(m["skipped"] for m in found)}
    return storage


def load_facts(env=None, dims=None, data_info=None, manifests=(), benchmarks_dir=None,
               evaluation=None):
    """FACTS (module docstring) from files: env.json, {model: dims JSON}, data/data.json, KV
    manifests, the folder of Snakemake benchmark TSVs (`<rule>/<job>.tsv`) and the evaluation
    settings (a dict). Anything not given is left out and shows as n/a."""
    facts = {}
    if env:
        facts["env"] = _flatten(_read_json(env, "environment"))
    if dims:
        facts["dims"] = {name: _read_json(path, "dims") for name, path in dims.items()}
    if data_info:
        info = _read_json(data_info, "data info")
        # The culprit of every skipped row belongs in data.json, not in a report table.
        for split in info.get("splits", {}).values():
            split.pop("skipped_rows", None)
        facts["data"] = _flatten(info)
    if manifests:
        facts["kv_storage"] = _kv_storage([_read_json(path, "KV manifest") for path in manifests])
    if benchmarks_dir:
        facts["benchmarks"] = {f"{path.parent.name}/{path.stem}": read_benchmark(path)
                               for path in sorted(Path(benchmarks_dir).glob("*/*.tsv"))}
    if evaluation:
        facts["evaluation"] = _flatten(evaluation)
    return facts


def describe_difference(name, diff, ci, lower_is_better, unit, treatment, control):
    """One honest sentence on `treatment − control`. A CI that includes 0 is said plainly to be
    not significant; a CI that excludes it says which arm is better and by how much at least and
    at most, never more than the interval supports."""
    lo, hi = ci
    head = (f"{name}: {treatment} − {control} = {diff:+.4g}{unit} "
            f"(95 % CI [{lo:+.4g}, {hi:+.4g}]{unit}).")
    if lo <= 0 <= hi:
        return (f"{head} The CI includes 0, so the difference is not significant at 95 %: "
                f"this evaluation does not show that {treatment} and {control} differ on {name}.")
    better = (hi < 0) == lower_is_better
    return (f"{head} The CI excludes 0: {treatment} is {'better' if better else 'worse'} than "
            f"{control} on {name} at 95 % confidence, by {min(abs(lo), abs(hi)):.4g}{unit} to "
            f"{max(abs(lo), abs(hi)):.4g}{unit}.")


def _seeded(runs):
    """{seed: value} with integer seeds in order; JSON turns the seed keys into strings."""
    try:
        return dict(sorted((int(seed), value) for seed, value in runs.items()))
    except ValueError:
        raise KavaError(f"seed keys must be integers, got {sorted(map(str, runs))}") from None


def _records(evals):
    """(label, kind, seed, EVAL) for every evaluated model, with the inputs checked: each record
    has its keys and all were scored on the same examples."""
    missing = [k for k in ("init", "teachers", "arms") if k not in evals]
    if missing:
        raise KavaError(f"evaluation inputs lack {missing}")
    rows = [("init", "init", None, evals["init"])]
    rows += [(name, "teacher", None, rec) for name, rec in evals["teachers"].items()]
    rows += [(arm, "arm", seed, rec) for arm, runs in evals["arms"].items()
             for seed, rec in _seeded(runs).items()]
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


def _spread(values):
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
    return (_spread([r[key]["overall"] for r in recs]),
            {t: _spread([r[key]["per_teacher"][t] for r in recs]) for t in teachers})


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
        entry[metric] = two_level_bootstrap(diff, n_boot=n_boot, seed=seed)
    entry["gap_recovered"] = None
    if best_teacher is not None:
        entry["gap_recovered"] = gap_recovered(
            _grid(reference_runs, common, ids, "nll"), _grid(arm_runs, common, ids, "nll"),
            _aligned(best_teacher, ids, "nll"), n_boot=n_boot, seed=seed)
    return entry


def build_summary(evals, control="ce", contrasts=(), n_boot=10000, seed=0):
    """The dict written as summary.json, from EVALS (module docstring).

    Every arm is compared with the control arm on the seeds both ran: the per-example difference
    arm − control, paired by seed and example, with a two-level bootstrap CI (kava.stats:
    seeds, then examples). `contrasts`: more [arm, reference arm] pairs compared the same way
    (e.g. kv against its kv_shuffled control). NLL is per token, so the reference teacher of gap recovered is the
    best (lowest NLL) among the teachers whose tokenizer equals the student's:

        {"control": str,
         "comparisons": {"<arm>": {"seeds": [...], "n_examples": int,
                         "nll", "accuracy": {"mean", "ci", "p_value", "significant", "n_seeds",
                                             "n_examples", "seed_variance"},
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
            entry[metric] = {**_spread([r[metric] for r in recs]),
                             "ci": bootstrap_ci(values, groups, n_boot=n_boot, seed=seed)["ci"]}
        entry["heldout_cos"], entry["heldout_cos_per_teacher"] = _kv_scores(label, recs,
                                                                            "kv_cosine")
        entry["heldout_r2"], entry["heldout_r2_per_teacher"] = _kv_scores(label, recs, "kv_r2")
        noises = [r["nll_noise"]["max_abs"] for r in recs if r.get("nll_noise")]
        entry["nll_noise_max"] = max(noises) if noises else None
        models[label] = entry

    arms = {arm: _seeded(runs) for arm, runs in evals["arms"].items()}
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


# ---- plots: matplotlib Figure objects directly, so no global pyplot backend state is touched.

def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curve_panels(metrics):
    """{panel title: [(arm, seed, series name, steps, values)]} for CE, KV loss and cosine."""
    panels = {"CE loss": [], "KV loss": [], "KV cosine (train)": []}
    for arm, runs in metrics.items():
        for seed, steps in _seeded(runs).items():
            keys = sorted({k for step in steps for k in step})
            series = [("CE loss", "ce", "ce")]
            for panel, prefix in (("KV loss", "kv/"), ("KV cosine (train)", "cos/")):
                # `cos/<teacher>` only: training also logs `cos/<teacher>/<layer>`, which would
                # bury the per-teacher curves under one line per layer.
                series += [(panel, k, k.removeprefix(prefix)) for k in keys
                           if k.startswith(prefix) and "/" not in k.removeprefix(prefix)]
            for panel, key, name in series:
                points = [(s["step"], s[key]) for s in steps if s.get(key) is not None]
                if points:
                    panels[panel].append((arm, seed, name, *zip(*points)))
    return panels


def plot_training_curves(metrics):
    """PNG (base64) of CE / KV loss / train cosine against step, one line per arm × seed
    (× teacher), colour by arm; an empty panel says "n/a" (the ce arm logs no KV loss)."""
    panels = _curve_panels(metrics)
    colours = {arm: f"C{k}" for k, arm in enumerate(metrics)}
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(13, 3.6))
    for ax, (title, lines) in zip(fig.subplots(1, 3), panels.items()):
        ax.set_title(title)
        ax.set_xlabel("step")
        if not lines:
            ax.text(0.5, 0.5, f"{NA}: no arm logged this", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        names = sorted({name for *_, name, _, _ in lines})
        for arm, seed, name, steps, values in lines:
            label = f"{arm}/seed{seed}" + (f" {name}" if len(names) > 1 else "")
            ax.plot(steps, values, color=colours[arm], linewidth=1, alpha=0.8, label=label,
                    linestyle=styles[names.index(name) % len(styles)])
        ax.legend(fontsize=7)
    return _png(fig)


def plot_cosine_heatmap(evals):
    """PNG (base64) of held-out KV cosine, student layer × teacher, one panel per arm (mean over
    seeds); None when no arm has per-layer cosines."""
    maps = {}
    for arm, runs in evals["arms"].items():
        recs = [rec for rec in runs.values() if rec["kv_cosine"] is not None]
        if recs:
            teachers = list(recs[0]["kv_cosine"]["per_layer"])  # the config's teacher order
            maps[arm] = (teachers, np.mean([[r["kv_cosine"]["per_layer"][t] for t in teachers]
                                            for r in recs], axis=0).T)
    if not maps:
        return None
    fig = Figure(figsize=(3.2 + 2.4 * len(maps), 4))
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    for ax, (arm, (teachers, grid)) in zip(axes, maps.items()):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(0.0, grid.min()), vmax=1.0)
        ax.set_title(f"{arm}: held-out cosine")
        ax.set_xticks(range(len(teachers)), teachers, rotation=30, ha="right")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_ylabel("student layer")
        for (layer, col), value in np.ndenumerate(grid):
            ax.text(col, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")  # readable on viridis' light end
        fig.colorbar(image, ax=ax)
    return _png(fig)


def plot_bars(summary):
    """PNG (base64) of accuracy and NLL per model, error bars = bootstrap 95 % CI over examples."""
    labels = list(summary["models"])
    names = [_model_name(label, summary) for label in labels]
    fig = Figure(figsize=(11, 3.6))
    for ax, metric, scale, ylabel in zip(fig.subplots(1, 2), ("accuracy", "nll"), (100, 1),
                                         ("accuracy (%)", "answer NLL (nats/token)")):
        means = np.array([summary["models"][m][metric]["mean"] for m in labels]) * scale
        cis = np.array([summary["models"][m][metric]["ci"] for m in labels]) * scale
        ax.bar(names, means, yerr=[means - cis[:, 0], cis[:, 1] - means], capsize=4,
               color=[f"C{k}" for k in range(len(labels))])
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
    return _png(fig)


# ---- the document: sections of text, tables and plots, rendered to HTML and to Markdown.

def _pm(stat, fmt):
    if stat is None:
        return NA
    text = fmt.format(stat["mean"])
    return text if stat["std"] is None else f"{text} ± {fmt.format(stat['std'])}"


def _model_name(label, summary):
    return f"teacher: {label}" if summary["models"][label]["kind"] == "teacher" else label


def _summary_section(summary):
    header = ["model", "seeds", "examples", "accuracy (%)", "accuracy 95 % CI", "NLL (nats/token)",
              "held-out KV R²", "raw KV cosine"]
    rows = []
    for label, m in summary["models"].items():
        acc = {**m["accuracy"], "mean": 100 * m["accuracy"]["mean"],
               "std": None if m["accuracy"]["std"] is None else 100 * m["accuracy"]["std"]}
        lo, hi = m["accuracy"]["ci"]
        other_units = " †" if m.get("same_tokenizer_as_init") is False else ""
        rows.append([_model_name(label, summary), m["accuracy"]["n_seeds"], m["n_examples"],
                     _pm(acc, "{:.1f}"), f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                     _pm(m["nll"], "{:.4f}") + other_units, _pm(m["heldout_r2"], "{:.3f}"),
                     _pm(m["heldout_cos"], "{:.3f}")])
    notes = ("Mean over seeds ± sample standard deviation across seeds (no ± with one seed). "
             "Accuracy CI: bootstrap over test examples, pooled over seeds. NLL: mean over "
             "examples of the answer's negative log-likelihood per token, teacher-forced, in "
             "fp32. Held-out KV R²: a ridge probe from the student's KV to each teacher's KV at "
             "the mapped layer, fitted on train examples, scored on the test examples against "
             "the per-head-mean baseline (0: no more than a constant, 1: determines it); mean "
             "over the arm's teachers and layers. Raw KV cosine: the student's KV against the "
             "teacher's through the trained projector, as training compares them; keys are "
             "dominated by their per-head mean, so a content-free predictor already scores high "
             "on it.")
    if any(m.get("same_tokenizer_as_init") is False for m in summary["models"].values()):
        notes += (" † This model tokenises differently from the student: its NLL is per token "
                  "of its own tokenizer and does not compare with the others'.")
    blocks = [{"kind": "text", "text": notes},
              {"kind": "table", "header": header, "rows": rows}]
    for key, title in (("heldout_r2_per_teacher", "Held-out KV R² per teacher"),
                       ("heldout_cos_per_teacher", "Raw held-out KV cosine per teacher")):
        per_teacher = {label: m[key] for label, m in summary["models"].items() if m[key]}
        if per_teacher:
            teachers = list(dict.fromkeys(t for scores in per_teacher.values() for t in scores))
            blocks.append({"kind": "heading", "text": title})
            blocks.append({"kind": "table", "header": ["model", *teachers],
                           "rows": [[label, *(_pm(scores.get(t), "{:.3f}") for t in teachers)]
                                    for label, scores in per_teacher.items()]})
    return {"title": "Summary", "blocks": blocks}


def _ab_section(summary):
    control = summary["control"]
    if summary["comparisons_skipped"]:
        return {"title": "Arms against the control",
                "blocks": [{"kind": "text", "text": f"{NA}: {summary['comparisons_skipped']}."}]}
    best = summary["best_teacher"]
    rows, sentences = [], []
    pairs = [(arm, control, entry) for arm, entry in summary["comparisons"].items()]
    pairs += [(c["arm"], c["reference"], c if c["seeds"] else None) for c in summary["contrasts"]]
    for arm, reference, entry in pairs:
        if entry is None:
            rows.append([arm, reference, *[NA] * 7, f"shares no seed with {reference}"])
            continue
        nll, acc, gap = entry["nll"], entry["accuracy"], entry["gap_recovered"]
        lo, hi = nll["ci"]
        rows.append([arm, reference, len(entry["seeds"]), entry["n_examples"],
                     f"{nll['mean']:+.4f}",
                     f"[{lo:+.4f}, {hi:+.4f}]", f"{nll['p_value']:.3g}",
                     f"{100 * acc['mean']:+.1f} [{100 * acc['ci'][0]:+.1f}, "
                     f"{100 * acc['ci'][1]:+.1f}]",
                     NA if gap is None else f"{100 * gap['mean']:.1f} % [{100 * gap['ci'][0]:.1f}, "
                                            f"{100 * gap['ci'][1]:.1f}]",
                     nll["seed_variance"]])
        sentences.append(describe_difference("answer NLL", nll["mean"], nll["ci"], True,
                                             " nats/token", arm, reference))
    noises = [m["nll_noise_max"] for m in summary["models"].values() if m.get("nll_noise_max")]
    noise = (f" Answer NLL is evaluated in fp32; the same NLL computed one example at a time "
             f"instead of in batches differs by at most {max(noises):.2g} nats/token on any "
             f"example, the evaluation's own numerical noise." if noises else "")
    if not rows:
        rows.append([NA, control, *[NA] * 7, "no arm besides the control"])
    reference = (f"the best teacher sharing the student's tokenizer, here {best['name']} "
                 f"(NLL {best['nll']:.4f})" if best else f"{NA}: {summary['gap_skipped']}")
    blocks = [
        {"kind": "text", "text": (
            f"Each arm against the control arm {control} (and each pair of report.contrasts "
            f"against its reference): per test example, arm − reference, paired by training "
            f"seed (same data order and initialisation) and example. 95 % CIs "
            f"from a two-level percentile bootstrap that resamples the seeds, then the examples, "
            f"so they account for training-seed variance as well as the choice of examples. "
            f"Gap recovered = (NLL reference − NLL arm) / (NLL reference − NLL teacher), the "
            f"teacher being {reference}; 100 % would be teacher-level NLL.{noise}")},
        {"kind": "table", "header": ["arm", "against", "seeds", "examples", "NLL difference",
                                     "95 % CI", "p", "accuracy difference (pp) [95 % CI]",
                                     "gap recovered [95 % CI]", "seed variance"],
         "rows": rows},
        *({"kind": "text", "text": s} for s in sentences),
    ]
    init_nll = summary["models"]["init"]["nll"]["mean"]
    rows = [[arm, f"{summary['models'][arm]['nll']['mean']:.4f}",
             NA if gap is None else f"{100 * gap:.1f} %"]
            for arm, gap in summary["gap_recovered_from_init"].items()]
    blocks += [
        {"kind": "text", "text": (
            f"Gap recovered from init = (NLL init − NLL arm) / (NLL init − NLL teacher), init NLL "
            f"{init_nll:.4f}. It is anchored at the untrained student, so it mostly measures "
            f"learning the answer format, which every arm does; the comparison with {control} "
            f"above is the one that isolates the method.")},
        {"kind": "table", "header": ["arm", "NLL", "gap recovered from init"], "rows": rows},
    ]
    return {"title": "Arms against the control", "blocks": blocks}


def _plots_section(summary, evals, metrics):
    blocks = [{"kind": "plot", "name": "accuracy_nll", "png": plot_bars(summary),
               "title": "Accuracy and NLL per model (bootstrap 95 % CI)"}]
    if metrics:
        blocks.append({"kind": "plot", "name": "training_curves", "title": "Training curves",
                       "png": plot_training_curves(metrics)})
    else:
        blocks.append({"kind": "text",
                       "text": f"Training curves: {NA} (no training metrics given)."})
    heatmap = plot_cosine_heatmap(evals)
    if heatmap:
        blocks.append({"kind": "plot", "name": "heldout_kv_cosine", "png": heatmap,
                       "title": "Held-out KV cosine per student layer and teacher"})
    else:
        blocks.append({"kind": "text", "text": f"Held-out KV cosine heatmap: {NA} (no arm has "
                                               f"per-layer held-out cosines)."})
    return {"title": "Plots", "blocks": blocks}


def _cell(value):
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _key_values(title, mapping):
    if not mapping:
        return [{"kind": "text", "text": f"{title}: {NA}."}]
    return [{"kind": "heading", "text": title},
            {"kind": "table", "header": ["key", "value"],
             "rows": [[k, _cell(v)] for k, v in mapping.items()]}]


def _layer_kinds(dims):
    """`15× sliding (window 512), 3× full` from the per-layer records of a dims file."""
    kinds = Counter(layer["kind"] + (f" (window {layer['window']})" if layer.get("window") else "")
                    for layer in dims.get("layers", []))
    return ", ".join(f"{n}× {kind}" for kind, n in kinds.items()) or NA


def _training_rows(metrics):
    rows = []
    for arm, runs in metrics.items():
        for seed, steps in _seeded(runs).items():
            last = steps[-1] if steps else {}
            speeds = [s["tokens_per_s"] for s in steps if s.get("tokens_per_s") is not None]
            speed = _cell(float(np.median(speeds))) if speeds else NA
            rows.append([arm, seed, len(steps), _cell(last.get("loss")), _cell(last.get("ce")),
                         speed, _cell(last.get("elapsed"))])
    return rows


def _alignment_rows(metrics):
    """Per arm, each loss term's mean gradient alignment (align/<term>) over seeds and logged
    steps; no rows when no run logged the diagnostic."""
    rows = []
    for arm, runs in metrics.items():
        values = {}
        for steps in _seeded(runs).values():
            for step in steps:
                for key, value in step.items():
                    if key.startswith("align/"):
                        values.setdefault(key.removeprefix("align/"), []).append(value)
        rows += [[arm, term, f"{np.mean(v):+.3f}", f"{np.min(v):+.3f} … {np.max(v):+.3f}",
                  len(v)] for term, v in values.items()]
    return rows


def _facts_section(facts, metrics):
    blocks = _key_values("Environment", facts.get("env"))
    blocks += _key_values("Data", facts.get("data"))
    blocks += _key_values("Evaluation settings", facts.get("evaluation"))
    dims = facts.get("dims") or {}
    if dims:
        blocks.append({"kind": "heading", "text": "Model dimensions (measured from the KV cache)"})
        header = ["model", "architecture", "layers", "KV heads", "head_dim", "KV dim total",
                  "layer kinds", "notes"]
        rows = [[name, *(_cell(d.get(k)) for k in ("architecture", "num_layers", "num_kv_heads",
                                                   "head_dim", "kv_dim_total")),
                 _layer_kinds(d), "; ".join(d.get("mismatches", [])) or "—"]
                for name, d in dims.items()]
        blocks.append({"kind": "table", "header": header, "rows": rows})
    else:
        blocks.append({"kind": "text", "text": f"Model dimensions: {NA}."})
    storage = facts.get("kv_storage") or {}
    if storage:
        keys = list(dict.fromkeys(k for s in storage.values() for k in s))
        blocks.append({"kind": "heading", "text": "KV storage"})
        blocks.append({"kind": "table", "header": ["teacher", *keys],
                       "rows": [[t, *(_cell(s.get(k)) for k in keys)] for t, s in storage.items()]})
    else:
        blocks.append({"kind": "text", "text": f"KV storage: {NA}."})
    if metrics:
        blocks.append({"kind": "heading", "text": "Training runs"})
        blocks.append({"kind": "table", "header": ["arm", "seed", "steps", "final loss", "final CE",
                                                   "median tokens/s", "elapsed (s)"],
                       "rows": _training_rows(metrics)})
        alignment = _alignment_rows(metrics)
        if alignment:
            blocks.append({"kind": "heading", "text": "Gradient alignment (train.diagnose_every)"})
            blocks.append({"kind": "text", "text": (
                "Cosine between each loss term's gradient on the student and the answer-CE "
                "gradient on train rows held out of training. Above 0: the term pushes the "
                "student where the held-out answers want it to go; near 0 or below: it does not "
                "help at that point.")})
            blocks.append({"kind": "table", "header": ["arm", "term", "mean cosine", "range",
                                                       "measurements"], "rows": alignment})
    benchmarks = facts.get("benchmarks") or {}
    if benchmarks:
        rows = []
        for job, reps in benchmarks.items():
            wall = [r["s"] for r in reps if r.get("s") is not None]
            rss = [r["max_rss"] for r in reps if r.get("max_rss") is not None]
            cpu = [r["cpu_time"] for r in reps if r.get("cpu_time") is not None]
            rows.append([job, f"{np.mean(wall):.1f}" if wall else NA,
                         f"{max(rss):.0f}" if rss else NA, f"{np.mean(cpu):.1f}" if cpu else NA])
        blocks.append({"kind": "heading",
                       "text": "Per-rule wall time and peak memory (Snakemake benchmarks)"})
        blocks.append({"kind": "table", "rows": rows,
                       "header": ["job", "wall time (s)", "peak RSS (MB)", "CPU time (s)"]})
    else:
        blocks.append({"kind": "text", "text": f"Per-rule wall time and peak memory: {NA}."})
    return {"title": "Run facts", "blocks": blocks}


def _markdown(title, sections):
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section['title']}", ""]
        for block in section["blocks"]:
            if block["kind"] == "table":
                lines.append("| " + " | ".join(map(str, block["header"])) + " |")
                lines.append("|" + " --- |" * len(block["header"]))
                lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
                          for row in block["rows"]]
            elif block["kind"] == "plot":
                lines.append(f"*Plot: {block['title']} (embedded in report.html).*")
            elif block["kind"] == "heading":
                lines.append(f"### {block['text']}")
            else:
                lines.append(block["text"])
            lines.append("")
    return "\n".join(lines)


def render_report(summary, evals, metrics, facts, title="kava report"):
    """(report.html, report.md, plots) from build_summary's dict, EVALS, METRICS and FACTS
    (shapes in the module docstring). The HTML is self-contained: plots are inlined PNGs; the
    same plots come back as {name: PNG bytes} for tools that show figures one by one (e.g.
    Snakemake's own report)."""
    sections = [_summary_section(summary), _ab_section(summary),
                _plots_section(summary, evals, metrics), _facts_section(facts, metrics)]
    templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                            autoescape=True)
    html = templates.get_template("report.html.j2").render(title=title, sections=sections)
    plots = {block["name"]: base64.b64decode(block["png"]) for section in sections
             for block in section["blocks"] if block["kind"] == "plot"}
    return html, _markdown(title, sections), plots
