"""kava.report: summary.json content (every arm against the control, two-level CIs, gap
recovered), honest wording, and the rendered HTML/Markdown from synthetic evaluation records,
training metrics and run facts (1, 2 or 3 seeds; 1 to 3 arms)."""

import base64
import functools
import html as html_lib
import json
import re

import numpy as np
import pytest

from kava import report
from kava.config import schema_defaults
from kava.errors import KavaError
from kava.evaluate import eval_record
from kava.report import load_evals, load_facts, load_metrics
from kava.report.load import read_benchmark
from kava.report.plots import _curve_panels
from kava.report.render import describe_difference, p_text

# The report section's settings as a run gets them (the schema's defaults), and a title.
build_summary = functools.partial(report.build_summary, **schema_defaults("report"))
render_report = functools.partial(report.render_report, title="kava report")
N = 120
TEACHERS = ["llama", "gemma"]
BENCHMARK_TSV = ("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\t"
                 "cpu_time\n"
                 "12.5\t0:00:12\t812.3\t1500.1\t700.0\t710.2\t1.0\t2.0\t95.0\t11.9\n"
                 "13.5\t0:00:13\t900.7\t1500.1\t700.0\t710.2\tNA\t2.0\t95.0\t12.1\n")


def _kv_scores(rng, low, high):
    per_layer = {t: list(np.linspace(low, high, 3) + rng.normal(0, 0.01, 3)) for t in TEACHERS}
    return {"overall": float(np.mean(list(per_layer.values()))), "per_layer": per_layer,
            "per_teacher": {t: float(np.mean(v)) for t, v in per_layer.items()}}


def _record(rng, accuracy, nll, difficulty, kv=False):
    """A real eval_record with about `accuracy` correct and per-example NLL nll + difficulty;
    with kv, a held-out raw cosine and probe R² as a trained arm's evaluation has them."""
    correct = rng.random(N) < accuracy
    scores = {"cosine": _kv_scores(rng, 0.3, 0.8), "r2": _kv_scores(rng, 0.1, 0.4)} if kv else None
    return eval_record(list(range(N)), [f"#### {int(c)}" for c in correct], ["1"] * N,
                       list(nll + difficulty + rng.normal(0, 0.05, N)), kv=scores)


def _evals(seeds, arms=("kv", "ce"), kv_gain=0.3, teacher_nll=1.0, gains=None, kv_arms=None):
    """EVALS: init, two teachers, and every arm on `seeds`; an arm's NLL is 1.6 − its gain (kv:
    kv_gain, others 0 unless `gains` says), and the arms in kv_arms (default: all but ce) carry
    held-out KV scores."""
    gains = {"kv": kv_gain, **(gains or {})}
    kv_arms = [a for a in arms if a != "ce"] if kv_arms is None else kv_arms
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.5, N)  # shared by all models: what makes pairing pay off
    return {
        "init": _record(rng, 0.2, 2.0, difficulty),
        "teachers": {t: _record(rng, 0.5, teacher_nll + k * 0.1, difficulty)
                     for k, t in enumerate(TEACHERS)},
        "arms": {arm: {seed: _record(rng, 0.3, 1.6 - gains.get(arm, 0.0), difficulty,
                                     kv=arm in kv_arms) for seed in seeds} for arm in arms},
    }


def _per_example(runs, key):
    """`[seeds, examples]` of a per-example value (every record lists examples 0..N-1)."""
    return np.array([runs[s]["per_example"][key] for s in sorted(runs)], dtype=np.float64)


def _ab_rows(md):
    """The rows of the Markdown table of arms against the control, as lists of cells."""
    lines = md.split("## Arms against the control")[1].splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("| arm | against |"))
    assert lines[start].startswith("| arm | against | seeds | examples | NLL difference |")
    table = []
    for line in lines[start + 2:]:  # after the header and its --- line, up to the blank line
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return table


def _expected_row(arm, reference, entry):
    nll, acc, gap = entry["nll"], entry["accuracy"], entry["gap_recovered"]
    boot = nll["bootstrap"]
    return [arm, reference, str(len(entry["seeds"])), str(entry["n_examples"]),
            f"{nll['mean']:+.4f}", f"[{nll['ci'][0]:+.4f}, {nll['ci'][1]:+.4f}]", p_text(nll),
            ", ".join(f"{d:+.4f}" for d in nll["per_seed"]),
            "n/a" if boot is None else f"[{boot['ci'][0]:+.4f}, {boot['ci'][1]:+.4f}]",
            f"{100 * acc['mean']:+.1f} [{100 * acc['ci'][0]:+.1f}, {100 * acc['ci'][1]:+.1f}]",
            "n/a" if gap is None else
            f"{100 * gap['mean']:.1f} % [{100 * gap['ci'][0]:.1f}, {100 * gap['ci'][1]:.1f}]",
            nll["seed_variance"]]


def _metrics(seeds, arms=("kv", "ce")):
    runs = {}
    for arm in arms:
        runs[arm] = {}
        for seed in seeds:
            steps = []
            for step in range(1, 21):
                row = {"step": step, "loss": 3 / step, "ce": 2 / step + seed * 0.01, "lr": 1e-4,
                       "tokens_per_s": 500.0 + step, "elapsed": 2.0 * step}
                if arm == "kv":
                    row.update({f"kv/{t}": 1 / step for t in TEACHERS})
                    row.update({f"cos/{t}": 1 - 1 / step for t in TEACHERS})
                    row.update({f"cos/{t}/{layer}": 0.5 for t in TEACHERS for layer in range(3)})
                steps.append(row)
            runs[arm][seed] = steps
    return runs


@pytest.fixture
def facts(tmp_path):
    bench = tmp_path / "train-kv-seed0.tsv"
    bench.write_text(BENCHMARK_TSV)
    return {
        "env": {"device": "cpu", "precision": "bf16-mixed", "scheduler": "local", "cpus": 2,
                "packages": {"torch": "2.13.0", "transformers": "5.23.0"}},
        "dims": {"student": {"architecture": "qwen3", "num_layers": 3, "num_kv_heads": 3,
                             "head_dim": 16, "kv_dim_total": 144, "mismatches": [],
                             "layers": [{"kind": "full"}] * 3},
                 "gemma": {"architecture": "gemma3_text", "num_layers": 4, "num_kv_heads": 1,
                           "head_dim": 32, "kv_dim_total": 128,
                           "mismatches": ["GQA: 1 KV heads serve 4 query heads"],
                           "layers": [{"kind": "sliding", "window": 16}] * 3 + [{"kind": "full"}]}},
        "data": {"source": "synthetic", "rows_hash": "sha256:0123abcd", "test_rows": N,
                 "splits.train.rows": 16},
        "kv_storage": {t: {"bytes_per_token": 1024, "dtype": "bfloat16", "key_space": "post-rope"}
                       for t in TEACHERS},
        "benchmarks": {"train/kv/seed0": read_benchmark(bench)},
    }


def _text(html):
    """Visible text of the HTML (tags dropped, entities decoded, whitespace folded)."""
    return html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def _stat(mean, ci, n_seeds=3, p_value=0.25):
    """A seed_level_test dict with the fields the sentences read."""
    return {"mean": mean, "ci": ci, "interval": "t", "n_seeds": n_seeds, "p_value": p_value,
            "p_floor": 2 / 2 ** n_seeds}


def test_describe_difference_is_honest():
    flat = describe_difference("accuracy", _stat(0.8, [-1.2, 2.9], p_value=0.5), False, " pp",
                               "kv", "ce")
    assert "not significant at 95 %" in flat and "CI includes 0" in flat
    assert "this evaluation does not show that kv and ce differ on accuracy" in flat
    assert "better" not in flat and "worse" not in flat
    assert "sign-flip p = 0.5 (floor 0.25)" in flat
    better = describe_difference("answer NLL", _stat(-0.31, [-0.4, -0.2]), True, " nats/token",
                                 "kv", "ce")
    assert better.startswith("answer NLL: kv − ce = -0.31 nats/token (95 % CI [-0.4, -0.2] "
                             "nats/token, t interval over 3 seeds and the test examples; "
                             "sign-flip p = 0.25 (the floor: the smallest p this many seeds "
                             "allow)).")
    assert "CI lies entirely below 0: kv is better than ce" in better
    assert "not significant" not in better
    assert "by 0.2 nats/token to 0.4 nats/token" in better  # bounded by the CI, not the estimate
    worse = describe_difference("accuracy", _stat(-3.0, [-5.0, -1.0]), False, " pp",
                                "kv_shuffled", "kv")
    assert "kv_shuffled − kv = -3 pp" in worse and "kv_shuffled is worse than kv" in worse
    one_seed = {**_stat(-3.0, [-5.0, -1.0]), "interval": "bootstrap", "p_floor": None}
    assert "bootstrap over the test examples of one seed; bootstrap p = 0.25" in \
        describe_difference("accuracy", one_seed, False, " pp", "kv", "ce")
    assert "not significant" in describe_difference("answer NLL", _stat(0.0, [0.0, 0.0]), True,
                                                    "", "kv", "ce")
    with pytest.raises(TypeError):  # no default arm names: every sentence says which arms
        describe_difference("answer NLL", _stat(-0.31, [-0.4, -0.2]), True, " nats/token")


def test_build_summary_numbers():
    evals = _evals(seeds=[0, 1, 2])
    summary = build_summary(evals, n_boot=2000)
    kv, ce = evals["arms"]["kv"], evals["arms"]["ce"]
    assert summary["control"] == "ce" and summary["comparisons_skipped"] is None
    assert list(summary["comparisons"]) == ["kv"]  # every arm but the control
    cmp = summary["comparisons"]["kv"]
    assert cmp["seeds"] == [0, 1, 2] and cmp["n_examples"] == N
    # Hand computations: the mean over seeds and examples of the per-example difference.
    expected_nll = np.mean(_per_example(kv, "nll") - _per_example(ce, "nll"))
    assert cmp["nll"]["mean"] == pytest.approx(expected_nll)
    assert cmp["nll"]["mean"] == pytest.approx(np.mean([kv[s]["nll"] - ce[s]["nll"]
                                                        for s in range(3)]))
    lo, hi = cmp["nll"]["ci"]
    assert lo < -0.3 + 0.05 and hi > -0.3 - 0.05 and lo < cmp["nll"]["mean"] < hi
    # Headline: the t interval; p: the exact sign-flip test, at its floor with 3 seeds that agree.
    assert cmp["nll"]["interval"] == "t" and cmp["nll"]["significant"]
    assert cmp["nll"]["p_value"] == cmp["nll"]["p_floor"] == 0.25
    per_seed = (_per_example(kv, "nll") - _per_example(ce, "nll")).mean(1)
    assert cmp["nll"]["per_seed"] == pytest.approx(list(per_seed))
    assert cmp["nll"]["bootstrap"]["significant"] and cmp["nll"]["bootstrap"]["p_value"] < 0.01
    assert cmp["nll"]["n_seeds"] == 3 and cmp["nll"]["seed_variance"] == "estimated"
    expected_accuracy = np.mean([kv[s]["accuracy"] - ce[s]["accuracy"] for s in range(3)])
    assert cmp["accuracy"]["mean"] == pytest.approx(expected_accuracy)
    # Gap recovered, anchored at the control: (NLL ce − NLL kv) / (NLL ce − NLL best teacher).
    assert summary["best_teacher"]["name"] == "llama"
    teacher = evals["teachers"]["llama"]["nll"]
    ce_nll, kv_nll = _per_example(ce, "nll").mean(), _per_example(kv, "nll").mean()
    gap = cmp["gap_recovered"]
    assert gap["mean"] == pytest.approx((ce_nll - kv_nll) / (ce_nll - teacher))
    assert gap["ci"][0] < gap["mean"] < gap["ci"][1]
    # The init-anchored figure, kept under its own name.
    init, best = summary["models"]["init"]["nll"]["mean"], summary["best_teacher"]["nll"]
    assert best == pytest.approx(teacher)
    assert summary["gap_recovered_from_init"]["kv"] == pytest.approx(
        (init - summary["models"]["kv"]["nll"]["mean"]) / (init - best))
    # Held-out KV: raw cosine and probe R², per arm and per teacher, means over seeds.
    assert summary["heldout_cos"]["ce"] is None and summary["heldout_r2"]["ce"] is None
    assert summary["heldout_cos"]["kv"] == pytest.approx(
        np.mean([kv[s]["kv_cosine"]["overall"] for s in range(3)]))
    assert summary["heldout_r2"]["kv"] == pytest.approx(
        np.mean([kv[s]["kv_r2"]["overall"] for s in range(3)]))
    r2 = summary["models"]["kv"]["heldout_r2_per_teacher"]["gemma"]
    assert r2["mean"] == pytest.approx(np.mean([kv[s]["kv_r2"]["per_teacher"]["gemma"]
                                                for s in range(3)]))
    assert r2["n_seeds"] == 3 and r2["std"] > 0
    assert summary["models"]["ce"]["heldout_r2"] is None
    assert summary["models"]["ce"]["heldout_r2_per_teacher"] is None
    assert summary["models"]["kv"]["nll"]["std"] > 0
    assert summary["models"]["kv"]["nll"]["n_seeds"] == 3
    json.dumps(summary)  # the stage writes it as summary.json


def test_every_arm_is_compared_with_the_control():
    evals = _evals(seeds=[0, 1], arms=("kv", "kv_shuffled", "ce"), gains={"kv_shuffled": 0.1})
    summary = build_summary(evals, n_boot=1000)
    assert list(summary["comparisons"]) == ["kv", "kv_shuffled"]
    arms = evals["arms"]
    for arm, gain in (("kv", 0.3), ("kv_shuffled", 0.1)):
        diff = _per_example(arms[arm], "nll") - _per_example(arms["ce"], "nll")
        assert summary["comparisons"][arm]["nll"]["mean"] == pytest.approx(diff.mean())
        lo, hi = summary["comparisons"][arm]["nll"]["ci"]
        assert lo < -gain < hi
    # Another control: the differences are taken against it, so kv − ce becomes ce − kv.
    other = build_summary(evals, control="kv", n_boot=1000)
    assert list(other["comparisons"]) == ["kv_shuffled", "ce"] and other["control"] == "kv"
    assert other["comparisons"]["ce"]["nll"]["mean"] == pytest.approx(
        -summary["comparisons"]["kv"]["nll"]["mean"])


def test_contrasts_compare_two_arms_like_an_arm_and_the_control(facts):
    evals = _evals(seeds=[0, 1], arms=("kv", "kv_shuffled", "ce"), gains={"kv_shuffled": 0.1})
    summary = build_summary(evals, contrasts=[["kv", "kv_shuffled"]], n_boot=1000)
    (contrast,) = summary["contrasts"]
    assert contrast["arm"] == "kv" and contrast["reference"] == "kv_shuffled"
    arms = evals["arms"]
    diff = _per_example(arms["kv"], "nll") - _per_example(arms["kv_shuffled"], "nll")
    assert contrast["nll"]["mean"] == pytest.approx(diff.mean())
    assert contrast["seeds"] == [0, 1] and contrast["nll"]["significant"]
    _, md, _ = render_report(summary, evals, {}, facts)
    rows = _ab_rows(md)
    assert [row[:2] for row in rows] == [["kv", "ce"], ["kv_shuffled", "ce"], ["kv", "kv_shuffled"]]
    assert rows[2] == _expected_row("kv", "kv_shuffled", contrast)
    with pytest.raises(KavaError, match="report.contrasts names arm 'kv_l2', which this run does "
                                        "not have \\(kv, kv_shuffled, ce\\)"):
        build_summary(evals, contrasts=[["kv_l2", "ce"]], n_boot=100)


def test_an_arm_without_a_seed_in_common_with_the_control(facts):
    evals = _evals(seeds=[0])
    evals["arms"]["kv"] = {5: evals["arms"]["kv"][0]}
    summary = build_summary(evals, contrasts=[["ce", "kv"]], n_boot=200)
    assert summary["comparisons"] == {"kv": None}
    assert summary["contrasts"] == [{"arm": "ce", "reference": "kv", "seeds": []}]
    text = _text(render_report(summary, evals, {}, facts)[0])
    assert "shares no seed with ce" in text and "shares no seed with kv" in text


def test_ab_pairs_by_example_id_and_string_seeds():
    evals = _evals(seeds=[0, 1])
    reference = build_summary(evals, n_boot=500)
    # As loaded from JSON: string seed keys, and the control lists its examples in another order.
    for rec in evals["arms"]["ce"].values():
        order = np.random.default_rng(5).permutation(N)
        rec["per_example"] = {k: [v[i] for i in order] for k, v in rec["per_example"].items()}
    evals["arms"] = {arm: {str(s): rec for s, rec in runs.items()}
                     for arm, runs in evals["arms"].items()}
    shuffled = build_summary(evals, n_boot=500)
    before, after = reference["comparisons"]["kv"], shuffled["comparisons"]["kv"]
    assert after["seeds"] == [0, 1]
    for metric in ("nll", "accuracy", "gap_recovered"):
        assert after[metric]["mean"] == pytest.approx(before[metric]["mean"])
        assert after[metric]["ci"] == pytest.approx(before[metric]["ci"])


def test_summary_rejects_different_examples():
    evals = _evals(seeds=[0])
    evals["teachers"]["gemma"]["per_example"]["id"][0] = 9999
    with pytest.raises(KavaError, match=r"evaluation of gemma covers 120 examples \(120 "
                                        r"generated\) that differ"):
        build_summary(evals, n_boot=100)


def test_report_with_three_seeds_three_arms(facts):
    arms = ("kv", "kv_shuffled", "ce")
    evals, metrics = _evals(seeds=[0, 1, 2], arms=arms, kv_gain=0.3), _metrics([0, 1, 2], arms)
    for runs in evals["arms"].values():
        for rec in runs.values():
            rec["nll_noise"] = {"max_abs": 3e-6, "mean_abs": 1e-6}
    summary = build_summary(evals, n_boot=2000)
    html, md, plots = render_report(summary, evals, metrics, facts)
    text = _text(html)
    for heading in ("Summary", "Arms against the control", "Plots", "Run facts"):
        assert f"<h2>{heading}</h2>" in html and f"## {heading}" in md
    kv, shuffled = summary["comparisons"]["kv"], summary["comparisons"]["kv_shuffled"]
    # The table of every arm against the control, numbers as printed.
    assert _ab_rows(md) == [_expected_row("kv", "ce", kv), _expected_row("kv_shuffled", "ce",
                                                                         shuffled)]
    lo, hi = kv["nll"]["ci"]
    sentence = (f"answer NLL: kv − ce = {kv['nll']['mean']:+.4g} nats/token (95 % CI "
                f"[{lo:+.4g}, {hi:+.4g}] nats/token, t interval over 3 seeds and the test "
                f"examples; sign-flip p = 0.25 (the floor")
    assert sentence in text
    assert "kv is better than ce on answer NLL at 95 % confidence" in text
    # The data source leads: the first line says the problems are synthetic, and the headline
    # sentence names the source beside the first comparison.
    assert md.splitlines()[0] == "# kava report: synthetic problems, not GSM8K"
    headline = md.split("## Headline")[1].split("## Summary")[0]
    assert headline.strip().startswith("These are synthetic problems, not GSM8K")
    assert ("On synthetic problems (kava/synthetic.py's generator), not GSM8K: " + sentence
            ) in headline
    # kv_shuffled draws its NLL like ce: the CI must include 0 and the page must say so.
    assert not shuffled["nll"]["significant"]
    assert ("the difference is not significant at 95 %: this evaluation does not show that "
            "kv_shuffled and ce differ on answer NLL") in text
    # Both arms draw accuracy from the same 30 %: that CI includes 0 too.
    assert not kv["accuracy"]["significant"]
    assert kv["accuracy"]["ci"][0] < 0 < kv["accuracy"]["ci"][1]
    assert "differs by at most 3e-06 nats/token" in text  # the evaluation's own noise
    assert f"here llama (NLL {summary['best_teacher']['nll']:.4f})" in text
    # The init-anchored figure is labelled as such.
    assert "Gap recovered from init" in text and "anchored at the untrained student" in text
    init_gap = summary["gap_recovered_from_init"]["kv"]
    assert f"| kv | {summary['models']['kv']['nll']['mean']:.4f} | {100 * init_gap:.1f} % |" in md
    # Three inline PNGs (bars, training curves, heatmap), each a real PNG.
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert sorted(plots) == ["accuracy_nll", "heldout_kv_cosine", "training_curves"]
    assert sorted(plots.values()) == sorted(base64.b64decode(i) for i in images)
    # Run facts: data hash, layer kinds, mismatch notes, benchmark mean wall time and peak RSS.
    assert "sha256:0123abcd" in text and "3× sliding (window 16), 1× full" in text
    assert "GQA: 1 KV heads serve 4 query heads" in text
    assert "train/kv/seed0 13.0 901" in text
    assert re.search(r"\d ± \d", text)  # spread over three seeds
    # Held-out KV: the probe R² and the raw cosine, labelled apart, per teacher.
    r2 = summary["models"]["kv"]["heldout_r2_per_teacher"]["llama"]
    cos = summary["models"]["kv"]["heldout_cos_per_teacher"]["llama"]
    assert "Held-out KV R² per teacher" in text and "Raw held-out KV cosine per teacher" in text
    assert f"{r2['mean']:.3f} ± {r2['std']:.3f}" in text
    assert f"{cos['mean']:.3f} ± {cos['std']:.3f}" in text
    assert "per-head-mean baseline" in text
    assert "sha256:0123abcd" in md and "Plot: Training curves" in md
    # The regime the comparison holds in, read from the run's data facts and training logs.
    assert ("Training regime: 16 labelled training rows; each arm trained with 3 seed(s) for 20 "
            "optimiser steps at peak LR 0.0001.") in text


def test_report_single_seed_without_kv_scores(facts):
    evals = _evals(seeds=[0], kv_arms=[])
    metrics = _metrics([0])
    summary = build_summary(evals, n_boot=500)
    cmp = summary["comparisons"]["kv"]
    assert cmp["seeds"] == [0] and cmp["nll"]["n_seeds"] == 1
    assert cmp["nll"]["seed_variance"].startswith("not estimated")
    assert summary["heldout_cos"] == {"kv": None, "ce": None}
    assert summary["heldout_r2"] == {"kv": None, "ce": None}
    html, md, plots = render_report(summary, evals, metrics, {})
    text = _text(html)
    assert _ab_rows(md) == [_expected_row("kv", "ce", cmp)]
    assert ("not estimated: one training seed, so the CI covers the test examples only"
            in text)
    assert "Held-out KV cosine heatmap: n/a" in text
    assert "Held-out KV R² per teacher" not in text
    assert "KV storage: n/a" in text and "Per-rule wall time and peak memory: n/a" in text
    assert "Training regime: n/a labelled training rows; each arm trained with 1 seed(s)" in text
    assert not re.search(r"\d ± \d", text)  # one seed: no spread is claimed
    assert len(re.findall(r"data:image/png;base64,", html)) == 2
    assert sorted(plots) == ["accuracy_nll", "training_curves"]


def test_report_without_the_control_arm(facts):
    evals, metrics = _evals(seeds=[0], arms=("kv",)), _metrics([0], arms=("kv",))
    summary = build_summary(evals, n_boot=500)
    assert summary["comparisons"] == {}
    assert summary["comparisons_skipped"] == ("the comparisons need the control arm 'ce' "
                                              "(report.control); this run has kv")
    html, md, _ = render_report(summary, evals, metrics, facts)
    assert "n/a: the comparisons need the control arm 'ce' (report.control); this run has kv." in (
        _text(html))
    assert "n/a: the comparisons need the control arm 'ce'" in md
    only_control = build_summary(_evals(seeds=[0], arms=("ce",)), n_boot=200)
    assert only_control["comparisons"] == {} and only_control["heldout_cos"] == {"ce": None}


def test_report_when_teacher_is_not_better_than_the_control_or_init(facts):
    evals = _evals(seeds=[0], teacher_nll=3.0)
    summary = build_summary(evals, n_boot=500)
    assert summary["gap_recovered_from_init"] == {"kv": None, "ce": None}
    assert summary["comparisons"]["kv"]["gap_recovered"] is None
    assert summary["best_teacher"]["name"] == "llama"
    _, md, _ = render_report(summary, evals, _metrics([0]), facts)
    (row,) = _ab_rows(md)
    assert row[8] == "n/a"
    assert f"| kv | {summary['models']['kv']['nll']['mean']:.4f} | n/a |" in md


def test_read_benchmark(tmp_path):
    path = tmp_path / "bench.tsv"
    path.write_text(BENCHMARK_TSV)
    rows = read_benchmark(path)
    assert rows[0]["s"] == 12.5 and rows[0]["h:m:s"] == "0:00:12" and rows[1]["io_in"] is None
    (tmp_path / "bad.tsv").write_text("seconds\tmem\n1\t2\n")
    with pytest.raises(KavaError, match=r"bad.tsv: missing column\(s\) \['s', 'max_rss'\]"):
        read_benchmark(tmp_path / "bad.tsv")


def test_best_teacher_is_chosen_among_teachers_with_the_students_tokenizer(facts):
    evals = _evals(seeds=[0])
    for rec in [evals["init"], *evals["teachers"].values(), *evals["arms"]["kv"].values(),
                *evals["arms"]["ce"].values()]:
        rec["tokenizer"] = "student-bpe"
    evals["teachers"]["llama"]["tokenizer"] = "other-bpe"  # the lowest NLL, in other units
    summary = build_summary(evals, n_boot=200)
    assert summary["best_teacher"]["name"] == "gemma"
    assert summary["models"]["llama"]["same_tokenizer_as_init"] is False
    assert summary["models"]["kv"]["same_tokenizer_as_init"] is True
    html, _, _ = render_report(summary, evals, {}, facts)
    text = _text(html)
    assert f"{summary['models']['llama']['nll']['mean']:.4f} †" in text
    assert "does not compare with the others'" in text and "here gemma (NLL" in text
    teacher = evals["teachers"]["gemma"]["nll"]
    ce_nll, kv_nll = evals["arms"]["ce"][0]["nll"], evals["arms"]["kv"][0]["nll"]
    assert summary["comparisons"]["kv"]["gap_recovered"]["mean"] == pytest.approx(
        (ce_nll - kv_nll) / (ce_nll - teacher))

    evals["teachers"]["gemma"]["tokenizer"] = "other-bpe"
    summary = build_summary(evals, n_boot=200)
    assert summary["best_teacher"] is None
    assert summary["gap_recovered_from_init"] == {"kv": None, "ce": None}
    assert summary["comparisons"]["kv"]["gap_recovered"] is None
    text = _text(render_report(summary, evals, {}, facts)[0])
    assert "n/a: no evaluated teacher shares the student's tokenizer" in text


def test_load_the_run_files(tmp_path):
    def dump(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return path

    evals = _evals(seeds=[0])
    paths = {"init": dump(tmp_path / "eval/init.json", evals["init"]),
             "teachers": {t: dump(tmp_path / f"eval/teacher-{t}.json", rec)
                          for t, rec in evals["teachers"].items()},
             "arms": {arm: {"0": dump(tmp_path / f"eval/{arm}-seed0.json", runs[0])}
                      for arm, runs in evals["arms"].items()}}
    loaded = load_evals(paths)
    assert loaded["arms"]["kv"]["0"]["nll"] == evals["arms"]["kv"][0]["nll"]
    assert build_summary(loaded, n_boot=200)["comparisons"]["kv"]["seeds"] == [0]

    metrics = {"kv": {"0": dump(tmp_path / "m.jsonl", '{"step": 1, "ce": 2.0}\n\n{"step": 2, "ce": 1.5}\n')}}
    assert load_metrics(metrics) == {"kv": {"0": [{"step": 1, "ce": 2.0}, {"step": 2, "ce": 1.5}]}}

    manifest = {"teacher": {"name": "llama"}, "dtype": "bf16", "key_space": "pre_rope",
                "layers": [0, 1], "kv_shape": [2, 8], "truncated": 1, "skipped": 0}
    manifests = [dump(tmp_path / "kv/train.json", {**manifest, "split": "train", "examples": 8,
                                                  "tokens": 100, "bytes": 20000}),
                 dump(tmp_path / "kv/test.json", {**manifest, "split": "test", "examples": 4,
                                                 "tokens": 50, "bytes": 10000})]
    dump(tmp_path / "benchmarks/train/kv-seed0.tsv", BENCHMARK_TSV)
    facts = load_facts(
        env=dump(tmp_path / "env.json", {"device": {"type": "cpu", "count": 1}, "cpus": 2}),
        dims={"student": dump(tmp_path / "dims/student.json", {"num_layers": 3})},
        data_info=dump(tmp_path / "data.json", {"source": "synthetic", "splits": {"test": {
            "rows": 4, "sha256": "ab12", "skipped_rows": {"empty_answer": ["f:3"]}}}}),
        manifests=manifests, benchmarks_dir=tmp_path / "benchmarks",
        evaluation={"max_new_tokens": 8, "stop": ["\nQuestion:"]})
    assert facts["env"] == {"device.type": "cpu", "device.count": 1, "cpus": 2}
    assert facts["data"] == {"source": "synthetic", "splits.test.rows": 4,
                             "splits.test.sha256": "ab12"}
    storage = facts["kv_storage"]["llama"]
    # 30000 bytes over 150 tokens; raw fp32 K and V: 2 tensors x 2 layers x 2 heads x 8 x 4 bytes.
    assert storage["bytes/token"] == 200.0 and storage["raw fp32 bytes/token"] == 256
    assert storage["stored / fp32"] == pytest.approx(200 / 256, abs=1e-3)
    assert storage["splits"] == "train 8 ex, test 4 ex" and storage["truncated"] == 2
    assert facts["benchmarks"]["train/kv-seed0"][1]["max_rss"] == pytest.approx(900.7)
    assert facts["evaluation"]["max_new_tokens"] == 8 and facts["dims"]["student"]["num_layers"] == 3


def test_load_evals_rejects_empty_and_unreadable_files(tmp_path):
    record = eval_record([1], ["#### 1"], ["1"], [0.5])
    record["per_example"] = {key: [] for key in record["per_example"]}
    empty = tmp_path / "init.json"
    empty.write_text(json.dumps(record))
    with pytest.raises(KavaError, match=f"evaluation {empty}: no evaluated examples"):
        load_evals({"init": empty, "teachers": {}, "arms": {}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KavaError, match="bad.json: unreadable"):
        load_evals({"init": tmp_path / "bad.json", "teachers": {}, "arms": {}})


def test_training_curves_plot_one_line_per_arm_seed_and_teacher():
    panels = _curve_panels(_metrics([0, 1]))
    assert {(arm, seed, name) for arm, seed, name, *_ in panels["KV cosine (train)"]} == {
        ("kv", seed, t) for seed in (0, 1) for t in TEACHERS}  # no per-layer lines
    assert len(panels["CE loss"]) == 4 and len(panels["KV loss"]) == 4


def test_report_shows_the_tokens_without_a_kv_target_per_arm_and_teacher(facts, tmp_path):
    summaries = {(arm, seed): {"teachers": {"llama": {"tokens_without_target": lost},
                                            "gemma": {"tokens_without_target": 0.0}}}
                 for arm, seed, lost in (("kv", 0, 0.02), ("kv", 1, 0.04), ("ce", 0, 0.1))}
    paths = {}
    for (arm, seed), summary in summaries.items():
        path = tmp_path / f"{arm}-{seed}.json"
        path.write_text(json.dumps(summary))
        paths.setdefault(arm, {})[str(seed)] = str(path)
    loaded = load_facts(train_infos=paths)["tokens_without_target"]
    assert loaded == {"kv": {"llama": [0.02, 0.04], "gemma": [0.0, 0.0]},
                      "ce": {"llama": [0.1], "gemma": [0.0]}}
    evals = _evals(seeds=[0, 1])
    html, markdown, _ = render_report(build_summary(evals, n_boot=200), evals,
                                      _metrics([0, 1]), {**facts, "tokens_without_target": loaded})
    text = _text(html)
    assert "Student tokens without a KV target" in text
    for row in ("kv llama 3.00% 4.00%", "kv gemma 0.00% 0.00%", "ce llama 10.00% 10.00%"):
        assert row in text and f"| {row.replace(' ', ' | ')} |" in markdown


def test_headline_names_gsm8k_and_the_step_each_run_chose(facts, tmp_path):
    """On real GSM8K the title carries no synthetic warning and the headline names the copy it
    read; runs that kept their best validation step show it, runs without one are tolerated."""
    facts = {**facts, "data": {"source": "path", "path": "/data/gsm8k",
                               "splits.test.sha256": "bb1c4f23a89b8cf9"}}
    infos = {("kv", 0): {"best_step": 40, "validation": [{"step": 20, "nll": 2.5},
                                                         {"step": 40, "nll": 2.25}]},
             ("kv", 1): {"best_step": 20, "validation": [{"step": 20, "nll": 2.4}]},
             ("ce", 0): {}, ("ce", 1): {}}
    paths = {}
    for (arm, seed), info in infos.items():
        path = tmp_path / f"{arm}-{seed}.json"
        path.write_text(json.dumps(info))
        paths.setdefault(arm, {})[str(seed)] = path
    loaded = load_facts(train_infos=paths)
    assert loaded["chosen_steps"] == {"kv": {0: {"best_step": 40, "validation_nll": 2.25},
                                             1: {"best_step": 20, "validation_nll": 2.4}}}
    evals = _evals(seeds=[0, 1])
    _, md, _ = render_report(build_summary(evals, n_boot=500), evals, {}, {**facts, **loaded})
    assert md.splitlines()[0] == "# kava report"
    headline = md.split("## Headline")[1].split("## Summary")[0].strip()
    assert headline.startswith("On GSM8K (a local copy: /data/gsm8k; test rows sha256 "
                               "bb1c4f23a89b): answer NLL: kv − ce = ")
    assert "| kv | 0 | 40 | 2.25 |" in md and "| kv | 1 | 20 | 2.4 |" in md
    assert "| ce | 0 |" not in md.split("Step each arm × seed chose")[1].split("##")[0]
    _, md, _ = render_report(build_summary(evals, n_boot=500), evals, {}, facts)
    assert "Step each arm × seed chose" not in md
