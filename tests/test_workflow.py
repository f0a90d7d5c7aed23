"""The Snakemake layer: config validation, profiles, and the smoke pipeline end to end."""

import base64
import html as html_lib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT


def snakemake(*args, env=None):
    """Run snakemake; `.output` is stdout and stderr together (it reports errors on stdout)."""
    # Rules run `python -m stages...`: put this interpreter's environment first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=PROJECT,
                            capture_output=True, text=True,
                            env={**os.environ, "PATH": path, **(env or {})})
    result.output = result.stdout + result.stderr
    return result


def write_config(tmp_path, mutate):
    config = yaml.safe_load((PROJECT / "config" / "smoke.yaml").read_text())
    mutate(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_schema_error_names_the_key(tmp_path):
    def bad(config):
        config["models"]["student"]["derive"]["keep_layer"] = [0]

    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, bad)))
    assert result.returncode != 0
    assert "'keep_layer' was unexpected" in result.output


def test_unknown_source_kind_is_a_schema_error(tmp_path):
    def bad(config):
        config["models"]["teacher_llama"] = {"ollama": "llama3"}

    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, bad)))
    assert result.returncode != 0 and "'ollama' was unexpected" in result.output


def test_undefined_teacher_is_named(tmp_path):
    def bad(config):
        config["teachers"] = ["teacher_llama", "qwen_big"]

    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, bad)))
    assert result.returncode != 0 and "'qwen_big' is named as a teacher" in result.output


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(report={"contrasts": [["kv", "kv_shufled"]]}),
     "kava: error: config: report.contrasts names arm 'kv_shufled', which this run does not have "
     "(ce, kv)"),
    (lambda c: c.setdefault("eval", {}).update(teachers=["student"]),
     "kava: error: config: eval.teachers names 'student', which is not a teacher (teacher_llama, "
     "teacher_gemma)"),
])
def test_a_config_cross_check_fails_before_any_job(tmp_path, change, message):
    """Names that refer to each other are checked when the workflow is parsed, so a bad one
    stops a dry run, not the report after every training job."""
    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, change)))
    assert result.returncode != 0 and message in result.output, result.output[-2000:]


def test_slurm_dry_run_maps_gpu_rules_to_gpus(tmp_path):
    result = snakemake("-n", "--profile", "profiles/slurm",
                       env={"KAVA_SLURM_ACCOUNT": "acct", "KAVA_SLURM_PARTITION": "gpu",
                            "KAVA_OUTPUT_PATH": str(tmp_path)})
    assert result.returncode == 0, result.output
    jobs = {}
    rule = None
    for line in result.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule:
            jobs.setdefault(rule, set()).add(line)
    assert all("gpu=1" in res for res in jobs["dims"]) and all("gpu=1" in r for r in jobs["probe"])
    assert not any("gpu=" in res for res in jobs["materialize"]) and not any("gpu=" in r for r in jobs["report"])
    assert not any("gpu=" in res for res in jobs["kv_manifest"])
    assert all("gpu=1" in res for res in jobs["evaluate"])
    assert all("slurm_account=acct" in res and "slurm_partition=gpu" in res
               for lines in jobs.values() for res in lines)


def test_study_config_plans_three_seeds_on_a_data_path(tmp_path):
    result = snakemake("-n", "--profile", "profiles/local", "--configfile", "config/study.yaml",
                       "--nolock", env={"KAVA_DATA_PATH": str(tmp_path / "gsm8k"),
                                        "KAVA_OUTPUT_PATH": str(tmp_path / "out")})
    assert result.returncode == 0, result.output[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.M))
    # 2 arms x 3 seeds trained; init, 2 teachers and the 6 trained students evaluated.
    assert counts["train"] == "6" and counts["evaluate"] == "9" and counts["report"] == "1"
    assert f"--env-data-path={tmp_path / 'gsm8k'}" in result.stdout


def test_logits_are_stored_for_the_train_split_only(tmp_path):
    """A KD arm reads its teachers' train-store logits; evaluation reads the test store's KV
    only, so the test split's precompute stores none. (The shards, hence the precompute jobs,
    are known once the prepare checkpoint has run.)"""
    arms = tmp_path / "arms.yaml"
    arms.write_text(yaml.safe_dump({"arms": {"ce": {"kv_weight": 0},
                                             "kd": {"kv_weight": 0, "kd_weight": 1.0}}}))
    env = {"KAVA_OUTPUT_PATH": str(tmp_path / "out")}
    configs = ("--configfile", "config/smoke.yaml", str(arms))
    prepared = snakemake("--profile", "profiles/local", "--until", "prepare", "--nolock",
                         *configs, env=env)
    assert prepared.returncode == 0, prepared.output[-3000:]
    planned = snakemake("-n", "-p", "--profile", "profiles/local", "--nolock", *configs, env=env)
    assert planned.returncode == 0, planned.output[-3000:]
    commands = [line for line in planned.stdout.splitlines() if "stages.precompute" in line]
    by_split = {split: [c for c in commands if f"--split {split} " in c]
                for split in ("train", "test")}
    assert by_split["train"] and by_split["test"]
    assert all("--logits" in c for c in by_split["train"])
    assert not any("--logits" in c for c in by_split["test"])


# The smoke run also runs lm-evaluation-harness (issue 19's done-when); --config merges into the
# smoke file's eval section. Every later call on its results passes the same config.
SMOKE_CONFIG = ("--config", "eval={lm_eval: [gsm8k]}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole smoke pipeline, run once for the tests below: {results, env}."""
    # --nolock: outputs go to a temporary folder, so this cannot collide with a user's run.
    env = {"KAVA_OUTPUT_PATH": str(tmp_path_factory.mktemp("out"))}
    first = snakemake("--profile", "profiles/local", "--configfile", "config/smoke.yaml",
                      *SMOKE_CONFIG, "--nolock", env=env)
    assert first.returncode == 0, first.output[-3000:]
    return {"results": Path(env["KAVA_OUTPUT_PATH"]) / "smoke", "env": env}


def test_smoke_pipeline_outputs(smoke):
    results = smoke["results"]
    env_json = json.loads((results / "env.json").read_text())
    assert env_json["paths"]["results"] == str(results)
    dims = json.loads((results / "dims" / "teacher_gemma.json").read_text())
    assert dims["num_sliding_layers"] == 3
    for rule in ("materialize", "dims", "probe", "evaluate", "report", "model_card"):
        assert list((results / "benchmarks" / rule).glob("*.tsv")), rule
        assert list((results / "logs" / rule).glob("*.log")), rule
    for arm in ("kv", "ce"):
        hub = results / "train" / arm / "seed0" / "hub"
        assert (hub / "README.md").is_file() and (hub / "config.json").is_file(), arm


def _text(html):
    """Visible text of the HTML (tags dropped, entities decoded, whitespace folded)."""
    return html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


EVALUATED = ["init", "teacher-teacher_llama", "teacher-teacher_gemma", "ce-seed0", "kv-seed0"]


def test_smoke_report_shows_every_section_from_the_run(smoke):
    results = smoke["results"]
    html = (results / "report.html").read_text()
    text = _text(html)
    markdown = (results / "report.md").read_text()
    for heading in ("Summary", "Arms against the control", "Plots", "Run facts"):
        assert f"<h2>{heading}</h2>" in html and f"## {heading}" in markdown
    # Summary: every evaluated model, with the accuracy it has in its own evaluation.
    for label, name in (("init", "init"), ("teacher: teacher_llama", "teacher-teacher_llama"),
                        ("teacher: teacher_gemma", "teacher-teacher_gemma"), ("ce", "ce-seed0"),
                        ("kv", "kv-seed0")):
        record = json.loads((results / "eval" / f"{name}.json").read_text())
        assert f"{label} 1 6 {100 * record['accuracy']:.1f}" in text
    # Arms against the control: kv − ce as computed from the two evaluations, with its CI, an
    # honest sentence, and the statement that one seed cannot estimate seed variance.
    kv, ce = (json.loads((results / "eval" / f"{arm}-seed0.json").read_text()) for arm in ("kv", "ce"))
    summary = json.loads((results / "eval" / "summary.json").read_text())
    nll = summary["comparisons"]["kv"]["nll"]
    assert nll["mean"] == pytest.approx(kv["nll"] - ce["nll"])
    lo, hi = nll["ci"]
    assert f"kv ce 1 6 {nll['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]" in text
    assert f"answer NLL: kv − ce = {nll['mean']:+.4g} nats/token" in text
    assert "not estimated: one training seed" in text
    # Plots: bars, training curves, held-out cosine heatmap, inline and as files.
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert sorted(p.name for p in (results / "figures").glob("*.png")) == [
        "accuracy_nll.png", "heldout_kv_cosine.png", "training_curves.png"]
    # Run facts: data source and hash, KV storage per teacher, every rule's benchmark.
    data = json.loads((results / "data" / "data.json").read_text())
    assert f"splits.test.sha256 {data['splits']['test']['sha256']}" in text
    assert "source synthetic" in text
    manifest = json.loads((results / "kv" / "teacher_gemma" / "test" / "manifest.json").read_text())
    assert f"teacher_gemma {manifest['dtype']} {manifest['key_space']}" in text
    for job in ("materialize/student", "precompute/teacher_llama-test-00000", "train/kv-seed0",
                "evaluate/init", "evaluate/kv-seed0"):
        assert re.search(rf"{re.escape(job)} \d+\.\d \d+", text), job
    assert "max_new_tokens 16" in text and "Model dimensions" in text


def test_smoke_summary_and_predictions(smoke):
    results = smoke["results"]
    summary = json.loads((results / "eval" / "summary.json").read_text())
    for metric in ("nll", "accuracy"):
        difference = summary["comparisons"]["kv"][metric]
        assert difference["ci"][0] <= difference["mean"] <= difference["ci"][1]
    assert set(summary["heldout_cos"]) == set(summary["gap_recovered_from_init"]) == {"ce", "kv"}
    assert all(-1 <= summary["heldout_cos"][arm] <= 1 for arm in ("ce", "kv"))
    for name in EVALUATED:
        lines = (results / "eval" / name / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 6 and {"question", "generated", "extracted", "reference",
                                    "correct"} <= set(json.loads(lines[0]))


def test_smoke_report_shows_the_harness_scores(smoke):
    results = smoke["results"]
    markdown = (results / "report.md").read_text()
    section = markdown.split("## lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    for name in ("teacher-teacher_llama", "teacher-teacher_gemma", "ce-seed0", "kv-seed0"):
        scores = json.loads((results / "eval" / "lm_eval" / f"{name}.json").read_text())
        gsm8k = scores["tasks"]["gsm8k"]
        assert gsm8k["n_examples"] == 6
        strict, flexible = (100 * gsm8k[f"exact_match,{f}"] for f in ("strict-match",
                                                                    "flexible-extract"))
        assert f"| {name} | gsm8k | 6 | {strict:.1f} ± " in section, name
        assert f"{flexible:.1f} ± " in section.split(f"| {name} |", 1)[1].split("\n", 1)[0]
    assert not (results / "eval" / "lm_eval" / "init.json").exists()


def test_snakemake_report_includes_the_marked_outputs(smoke, tmp_path):
    archive = tmp_path / "snakemake-report.zip"
    result = snakemake("--profile", "profiles/local", "--configfile", "config/smoke.yaml",
                       *SMOKE_CONFIG, "--nolock", "--report", str(archive), env=smoke["env"])
    assert result.returncode == 0, result.output[-3000:]
    names = {Path(name).name for name in zipfile.ZipFile(archive).namelist()}
    assert {"report.html", "summary.json", "predictions.jsonl", "accuracy_nll.png",
            "training_curves.png", "heldout_kv_cosine.png"} <= names


def test_smoke_reruns_one_stage_alone(smoke):
    results, env = smoke["results"], smoke["env"]
    forced = results / "eval" / "init.json"
    before = forced.stat().st_mtime_ns
    untouched = [results / "eval" / "kv-seed0.json", results / "dims" / "student.json"]
    stamps = [path.stat().st_mtime_ns for path in untouched]
    again = snakemake("--profile", "profiles/local", "--configfile", "config/smoke.yaml",
                      *SMOKE_CONFIG, "--nolock", "--forcerun", str(forced), env=env)
    assert again.returncode == 0, again.output[-3000:]
    assert forced.stat().st_mtime_ns > before
    assert [path.stat().st_mtime_ns for path in untouched] == stamps
    assert not [p for p in Path(results).rglob(".*.tmp-*")]


def test_jobs_bench_times_the_runs_own_jobs_and_leaves_its_results(smoke):
    summary = smoke["results"] / "train" / "kv" / "seed0" / "train.json"
    before = summary.read_bytes()
    done = subprocess.run([sys.executable, "-m", "bench.jobs", "--train", "kv-seed0", "ce-seed0",
                           "--evaluate", "kv-seed0", "ce-seed0", "--configfile", "config/smoke.yaml",
                           *SMOKE_CONFIG], cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, **smoke["env"]})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, jobs in (("train", ["kv-seed0", "ce-seed0"]), ("evaluate", ["kv-seed0", "ce-seed0"])):
        pair = figures[kind]
        assert pair["jobs"] == jobs and pair["serial_s"] > 0 and pair["side_by_side_s"] > 0
        assert pair["ratio"] == pytest.approx(pair["side_by_side_s"] / pair["serial_s"], abs=0.01)
    # Its jobs wrote into a temporary folder, not over the run's outputs.
    assert summary.read_bytes() == before


def test_jobs_bench_without_a_run_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.jobs", "--configfile", "config/smoke.yaml",
                           "--train", "kv-seed0", "ce-seed0", "--evaluate", "kv-seed0",
                           "ce-seed0"],
                          cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "KAVA_OUTPUT_PATH": str(tmp_path)})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "bench.jobs: the run has no stages.train job kv-seed0 with its inputs made: run it first "
        "(make run)")
