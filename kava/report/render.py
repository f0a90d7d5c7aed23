"""The report as documents: sections of text, tables and plots, rendered to a self-contained
HTML page (kava/report/templates) and to Markdown with the same tables and sentences."""

import base64
import json
from collections import Counter
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader

from kava.report.load import seeded
from kava.report.plots import NA, plot_bars, plot_cosine_heatmap, plot_training_curves
from kava.report.summary import model_name


def interval_name(stat):
    """What a difference's headline interval is, in words (kava.stats.seed_level_test)."""
    if stat["interval"] == "t":
        return f"t interval over {stat['n_seeds']} seeds and the test examples"
    return "bootstrap over the test examples of one seed"


def p_text(stat):
    """The p of a difference with the floor its test has: an exact sign-flip test over n seeds
    cannot go below 2/2^n, so 0.25 at 3 seeds is as strong as three seeds can say."""
    if stat["p_floor"] is None:
        return f"bootstrap p = {stat['p_value']:.3g}"
    floor = " (the floor: the smallest p this many seeds allow)" if (
        stat["p_value"] <= stat["p_floor"]) else f" (floor {stat['p_floor']:.3g})"
    return f"sign-flip p = {stat['p_value']:.3g}{floor}"


def describe_difference(name, stat, lower_is_better, unit, treatment, control):
    """One honest sentence on `treatment − control` from its seed_level_test dict, following its
    headline interval. A CI that includes 0 is said plainly to be not significant; a CI that
    excludes it says which arm is better and by how much at least and at most, never more than
    the interval supports."""
    diff, (lo, hi) = stat["mean"], stat["ci"]
    head = (f"{name}: {treatment} − {control} = {diff:+.4g}{unit} "
            f"(95 % CI [{lo:+.4g}, {hi:+.4g}]{unit}, {interval_name(stat)}; {p_text(stat)}).")
    if lo <= 0 <= hi:
        return (f"{head} The CI includes 0, so the difference is not significant at 95 %: "
                f"this evaluation does not show that {treatment} and {control} differ on {name}.")
    better = (hi < 0) == lower_is_better
    side = "below" if hi < 0 else "above"
    return (f"{head} The CI lies entirely {side} 0: {treatment} is "
            f"{'better' if better else 'worse'} than {control} on {name} at 95 % confidence, by "
            f"{min(abs(lo), abs(hi)):.4g}{unit} to {max(abs(lo), abs(hi)):.4g}{unit}.")


def _pm(stat, fmt):
    if stat is None:
        return NA
    text = fmt.format(stat["mean"])
    return text if stat["std"] is None else f"{text} ± {fmt.format(stat['std'])}"


def _regime(facts, metrics):
    """The training regime the comparisons hold in, as the run's own files give it: an effect
    measured with a few labelled rows and many epochs says nothing about a large-data regime."""
    runs = [steps for seeds in metrics.values() for steps in seeds.values() if steps]
    if not runs:
        return None
    rows = facts.get("data", {}).get("splits.train.rows", NA)
    steps = sorted({run[-1]["step"] for run in runs})
    peak_lr = sorted({max(step["lr"] for step in run) for run in runs})
    seeds = sorted({len(seeds) for seeds in metrics.values()})
    return (f"Training regime: {rows} labelled training rows; each arm trained with "
            f"{'/'.join(map(str, seeds))} seed(s) for {'/'.join(map(str, steps))} optimiser "
            f"steps at peak LR {'/'.join(f'{lr:.3g}' for lr in peak_lr)}. Differences between "
            f"arms hold in this regime only.")


def data_source(facts):
    """The data the numbers come from, in words, from data.json's provenance."""
    data = facts.get("data") or {}
    source = data.get("source")
    if source == "synthetic":
        return "synthetic problems (kava/synthetic.py's generator), not GSM8K"
    if source in ("hub", "path"):
        where = "the hub" if source == "hub" else "a local copy"
        return (f"GSM8K ({where}: {data.get('path', NA)}; test rows sha256 "
                f"{str(data.get('splits.test.sha256', NA))[:12]})")
    return f"data of unknown source ({source or NA})"


def _headline_section(summary, facts):
    """The data source and the first comparison in one sentence; with the generator's data, the
    warning that nothing here is a GSM8K result comes first."""
    blocks = []
    if (facts.get("data") or {}).get("source") == "synthetic":
        blocks.append({"kind": "text", "text": (
            "These are synthetic problems, not GSM8K: data.source fell back to the generator "
            "(kava/synthetic.py), so no number in this report is a GSM8K result.")})
    comparisons = summary["comparisons"] or {}
    first = next(((arm, summary["control"], e) for arm, e in comparisons.items() if e), None)
    if first is None:
        text = f"Data: {data_source(facts)}. No arm is compared with the control."
    else:
        text = f"On {data_source(facts)}: " + describe_difference(
            "answer NLL", first[2]["nll"], True, " nats/token", first[0], first[1])
    blocks.append({"kind": "text", "text": text})
    return {"title": "Headline", "blocks": blocks}


def _chosen_steps_blocks(facts):
    """The step whose weights each arm × seed kept (validation early stopping), if any did."""
    chosen = facts.get("chosen_steps") or {}
    if not chosen:
        return []
    rows = [[arm, seed, step["best_step"], _cell(step.get("validation_nll"))]
            for arm, seeds in chosen.items() for seed, step in seeds.items()]
    return [{"kind": "heading", "text": "Step each arm × seed chose"},
            {"kind": "text", "text": "Each run kept the weights of the step with the lowest "
                                     "validation answer NLL (train rows held out of training); "
                                     "its test results above are those weights'."},
            {"kind": "table", "header": ["arm", "seed", "chosen step", "validation NLL"],
             "rows": rows}]


def _teacher_weighting_rows(weighting):
    """Per arm × seed × teacher: its mean weight over the steps (each update holds until the
    next), final weight, share of steps switched off (weight 0), mean cosine over the updates,
    and the trajectory (step: weight at each update)."""
    rows = []
    for arm, runs in weighting.items():
        for seed, run in seeded(runs).items():
            updates = run["updates"]
            starts = [u["step"] for u in updates]
            held = [end - start for start, end in zip(starts, [*starts[1:], run["steps"] + 1])]
            for teacher in updates[0]["teachers"]:
                readings = [u["teachers"][teacher] for u in updates]
                weights = [r["weight"] for r in readings]
                off = sum(n for n, w in zip(held, weights) if w == 0) / sum(held)
                rows.append([arm, seed, teacher,
                             f"{np.dot(held, weights) / sum(held):.3f}", f"{weights[-1]:.3f}",
                             f"{off:.0%}", f"{np.mean([r['cosine'] for r in readings]):+.3f}",
                             ", ".join(f"{step}: {w:.2f}" for step, w in zip(starts, weights))])
    return rows


def _teacher_weighting_blocks(facts):
    """The teacher weights of runs that set them on the validation rows, if any did."""
    weighting = facts.get("teacher_weighting") or {}
    if not weighting:
        return []
    return [{"kind": "heading", "text": "Teacher weights set on the validation rows"},
            {"kind": "text", "text": (
                "train.teacher_weighting validation: every teacher_weighting_every steps each "
                "teacher's weight was set ∝ max(0, cosine) between its loss gradient on the "
                "step's batch and the answer-CE gradient on the validation rows, divided by the "
                "largest (the best-aligned teacher counts 1, as alone). A teacher at 0 was switched off until its cosine turned positive; "
                "when no cosine was positive the run trained on CE alone.")},
            {"kind": "table", "header": ["arm", "seed", "teacher", "mean weight", "final weight",
                                         "steps switched off", "mean cosine",
                                         "step: weight"],
             "rows": _teacher_weighting_rows(weighting)}]


def _summary_section(summary, facts, metrics):
    header = ["model", "seeds", "examples", "accuracy (%)", "accuracy 95 % CI", "NLL (nats/token)",
              "held-out KV R²", "raw KV cosine"]
    rows = []
    for label, m in summary["models"].items():
        acc = {**m["accuracy"], "mean": 100 * m["accuracy"]["mean"],
               "std": None if m["accuracy"]["std"] is None else 100 * m["accuracy"]["std"]}
        lo, hi = m["accuracy"]["ci"]
        other_units = " †" if m.get("same_tokenizer_as_init") is False else ""
        rows.append([model_name(label, summary), m["accuracy"]["n_seeds"], m["n_examples"],
                     _pm(acc, "{:.1f}"), f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                     _pm(m["nll"], "{:.4f}") + other_units, _pm(m["heldout_r2"], "{:.3f}"),
                     _pm(m["heldout_cos"], "{:.3f}")])
    notes = ("Mean over seeds ± sample standard deviation across seeds (no ± with one seed). "
             "Accuracy CI: bootstrap over test examples, pooled over seeds. NLL: mean over "
             "examples of the answer's negative log-likelihood per token, teacher-forced, in "
             "fp32. Held-out KV R²: a ridge probe from the student's KV to each teacher's KV at "
             "the mapped layer, fitted on train examples, scored on the test examples against "
             "the per-head-mean baseline (0: no more than a constant, 1: determines it); mean "
             "over the run's teachers (also those an arm did not learn from) and layers. Raw KV cosine: the student's KV against the "
             "teacher's through the trained projector, as training compares them; keys are "
             "dominated by their per-head mean, so a content-free predictor already scores high "
             "on it.")
    if any(m.get("same_tokenizer_as_init") is False for m in summary["models"].values()):
        notes += (" † This model tokenises differently from the student: its NLL is per token "
                  "of its own tokenizer and does not compare with the others'.")
    regime = _regime(facts, metrics)
    blocks = [*([{"kind": "text", "text": regime}] if regime else []),
              {"kind": "text", "text": notes}, {"kind": "table", "header": header, "rows": rows}]
    for key, title in (("heldout_r2_per_teacher", "Held-out KV R² per teacher"),
                       ("heldout_cos_per_teacher", "Raw held-out KV cosine per teacher")):
        per_teacher = {label: m[key] for label, m in summary["models"].items() if m[key]}
        if per_teacher:
            teachers = list(dict.fromkeys(t for scores in per_teacher.values() for t in scores))
            blocks.append({"kind": "heading", "text": title})
            blocks.append({"kind": "table", "header": ["model", *teachers],
                           "rows": [[label, *(_pm(scores.get(t), "{:.3f}") for t in teachers)]
                                    for label, scores in per_teacher.items()]})
    return {"title": "Summary",
            "blocks": blocks + _chosen_steps_blocks(facts) + _teacher_weighting_blocks(facts)}


def _ab_row(arm, reference, entry):
    """A row of the arms-against-reference table: the headline interval and p (seed_level_test),
    the per-seed differences and the bootstrap beside them."""
    nll, acc, gap = entry["nll"], entry["accuracy"], entry["gap_recovered"]
    lo, hi = nll["ci"]
    boot = nll["bootstrap"]
    return [arm, reference, len(entry["seeds"]), entry["n_examples"], f"{nll['mean']:+.4f}",
            f"[{lo:+.4f}, {hi:+.4f}]", p_text(nll),
            ", ".join(f"{d:+.4f}" for d in nll["per_seed"]),
            NA if boot is None else f"[{boot['ci'][0]:+.4f}, {boot['ci'][1]:+.4f}]",
            f"{100 * acc['mean']:+.1f} [{100 * acc['ci'][0]:+.1f}, {100 * acc['ci'][1]:+.1f}]",
            NA if gap is None else
            f"{100 * gap['mean']:.1f} % [{100 * gap['ci'][0]:.1f}, {100 * gap['ci'][1]:.1f}]",
            nll["seed_variance"]]


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
            rows.append([arm, reference, *[NA] * 9, f"shares no seed with {reference}"])
            continue
        rows.append(_ab_row(arm, reference, entry))
        sentences.append(describe_difference("answer NLL", entry["nll"], True, " nats/token",
                                             arm, reference))
    noises = [m["nll_noise_max"] for m in summary["models"].values() if m.get("nll_noise_max")]
    noise = (f" Answer NLL is evaluated in fp32; the same NLL computed one example at a time "
             f"instead of in batches differs by at most {max(noises):.2g} nats/token on any checked "
             f"example, the evaluation's own numerical noise." if noises else "")
    if not rows:
        rows.append([NA, control, *[NA] * 9, "no arm besides the control"])
    reference = (f"the best teacher sharing the student's tokenizer, here {best['name']} "
                 f"(NLL {best['nll']:.4f})" if best else f"{NA}: {summary['gap_skipped']}")
    blocks = [
        {"kind": "text", "text": (
            f"Each arm against the control arm {control} (and each pair of report.contrasts "
            f"against its reference): per test example, arm − reference, paired by training "
            f"seed (same data order and initialisation) and example. The headline 95 % CI is a "
            f"t interval whose standard error adds the spread of the per-seed mean differences "
            f"to that of the per-example ones, with Welch–Satterthwaite degrees of freedom, so "
            f"it accounts for training-seed variance as well as the choice of examples; its "
            f"measured coverage is at least 90 % at 3 and at 5 seeds (bench.coverage). p: exact "
            f"sign-flip test over the per-seed mean differences; with n seeds it cannot go "
            f"below 2/2^n (0.25 at 3 seeds, 0.0625 at 5). The two-level percentile bootstrap "
            f"(seeds, then examples) is shown beside; it undercovers at few seeds. With one "
            f"seed, the headline is the bootstrap over examples. "
            f"Gap recovered = (NLL reference − NLL arm) / (NLL reference − NLL teacher), the "
            f"teacher being {reference}; 100 % would be teacher-level NLL.{noise}")},
        {"kind": "table", "header": ["arm", "against", "seeds", "examples", "NLL difference",
                                     "95 % CI", "p", "per-seed NLL differences",
                                     "bootstrap 95 % CI", "accuracy difference (pp) [95 % CI]",
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
        for seed, steps in seeded(runs).items():
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
        for steps in seeded(runs).values():
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
    uncovered = facts.get("tokens_without_target") or {}
    if uncovered:
        blocks.append({"kind": "heading", "text": "Student tokens without a KV target"})
        blocks.append({"kind": "text", "text": (
            "Fraction of the student's train tokens that no teacher token covers (a teacher "
            "tokenizer that normalises text, e.g. NFC, can leave some): they get no KV target "
            "and are masked. Mean over seeds, and the largest seed.")})
        blocks.append({"kind": "table", "header": ["arm", "teacher", "mean", "max"],
                       "rows": [[arm, teacher, f"{np.mean(v):.2%}", f"{np.max(v):.2%}"]
                                for arm, teachers in uncovered.items()
                                for teacher, v in teachers.items()]})
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


def _harness_section(facts):
    """lm-evaluation-harness's exact match (eval.lm_eval) per model and task, beside kava's."""
    header = ["model", "task", "examples", "strict-match (%)", "flexible-extract (%)"]
    rows = [[name, task, scores["n_examples"],
             *(f"{100 * scores[f'exact_match,{f}']:.1f} ± "
               f"{100 * scores[f'exact_match_stderr,{f}']:.1f}"
               for f in ("strict-match", "flexible-extract"))]
            for name, tasks in facts["harness"].items() for task, scores in tasks.items()]
    notes = ("The harness's own gsm8k task on the same test rows: 5-shot (examples from the "
             "train split), its stop strings, exact match after its two answer filters "
             "(strict-match: the number after '#### '; flexible-extract: the last number in the "
             "generation), ± its standard error. kava's accuracy above is zero-shot, on kava's "
             "prompt, with the answer after '#### '; the two differ by prompt and few-shot and "
             "do not compare number for number.")
    return {"title": "lm-evaluation-harness",
            "blocks": [{"kind": "text", "text": notes},
                       {"kind": "table", "header": header, "rows": rows}]}


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


def render_report(summary, evals, metrics, facts, title):
    """(report.html, report.md, plots) from build_summary's dict, EVALS, METRICS and FACTS
    (shapes in the module docstring). The HTML is self-contained: plots are inlined PNGs; the
    same plots come back as {name: PNG bytes} for tools that show figures one by one (e.g.
    Snakemake's own report)."""
    if (facts.get("data") or {}).get("source") == "synthetic":
        title = f"{title}: synthetic problems, not GSM8K"
    sections = [_headline_section(summary, facts), _summary_section(summary, facts, metrics),
                _ab_section(summary),
                _plots_section(summary, evals, metrics), _facts_section(facts, metrics)]
    if facts.get("harness"):
        sections.insert(2, _harness_section(facts))
    templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                            autoescape=True)
    templates.filters["base64"] = lambda data: base64.b64encode(data).decode("ascii")
    html = templates.get_template("report.html.j2").render(title=title, sections=sections)
    plots = {block["name"]: block["png"] for section in sections
             for block in section["blocks"] if block["kind"] == "plot"}
    return html, _markdown(title, sections), plots
