"""model_card: a trained student's publishable folder and its card, read back with the hub's
ModelCard.load."""

import json
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard

from conftest import PROJECT, TINY
from kava.config import schema_defaults
from kava.data import prepare
from kava.evaluate import eval_record
from kava.models import materialize
from kava.report import build_summary

N = 40


def _record(rng, accuracy, nll):
    correct = rng.random(N) < accuracy
    return eval_record(list(range(N)), [f"#### {int(c)}" for c in correct], ["1"] * N,
                       list(nll + rng.normal(0, 0.05, N)))


def evals_and_summary():
    """Evaluation records of init, a teacher and the arms kv and ce (one seed), and the report's
    summary of them."""
    rng = np.random.default_rng(0)
    evals = {"init": _record(rng, 0.2, 2.0), "teachers": {"teacher": _record(rng, 0.5, 1.0)},
             "arms": {"kv": {0: _record(rng, 0.4, 1.3)}, "ce": {0: _record(rng, 0.3, 1.6)}}}
    return evals, build_summary(evals, **schema_defaults("report"))


@pytest.fixture
def run_files(tmp_path, tiny_card):
    """The files the model_card rule reads: a student derived from a tiny base (standing in
    for the trained student), its train.json, the model cards and the report's summary."""
    base = tiny_card("llama")
    student = materialize("student", {"derive": {"base": base["name"], "keep_layers": [0, 2]}},
                          tmp_path / "student", base_card=base)
    teacher = tiny_card("qwen3")
    _, data_info = prepare({**schema_defaults("data"), "source": "synthetic", "train_size": 8,
                            "test_size": 4})
    files = {"student_card": student, "base_card": base, "teacher_cards": [teacher],
             "train_info": {"arm": "kv", "seed": 0,
                            "data": data_info,
                            "config": {"steps": 3, "kv_weight": 1.0}},
             "summary": evals_and_summary()[1]}
    paths = {}
    for key, value in files.items():
        values = value if isinstance(value, list) else [value]
        paths[key] = [tmp_path / f"{key}{k}.json" for k in range(len(values))]
        for path, content in zip(paths[key], values):
            path.write_text(json.dumps(content))
    return tmp_path, paths, files


def _stage(tmp_path, paths, arm="kv", *extra):
    return subprocess.run(
        [sys.executable, "-m", "stages.model_card", "--arm", arm, "--seed", "0",
         "--student", str(tmp_path / "student"), "--train-info", str(*paths["train_info"]),
         "--student-card", str(*paths["student_card"]), "--base-card", str(*paths["base_card"]),
         "--teacher-cards", *map(str, paths["teacher_cards"]),
         "--summary", str(*paths["summary"]), "--out", str(tmp_path / "hub"), *extra],
        cwd=PROJECT, capture_output=True, text=True)


def test_card_metadata_reads_back_with_model_card_load(run_files):
    tmp_path, paths, files = run_files
    # Snakemake's marker in a directory output: sharing it would make the student look updated.
    (tmp_path / "student" / ".snakemake_timestamp").touch()
    done = _stage(tmp_path, paths)
    assert done.returncode == 0, done.stderr
    hub = tmp_path / "hub"
    assert not (hub / ".snakemake_timestamp").exists()
    # the student's weights and tokenizer are published beside the card
    published = {p.name for p in (tmp_path / "student").iterdir() if not p.name.startswith(".")}
    assert published < {p.name for p in hub.iterdir()}
    card = ModelCard.load(hub / "README.md")
    data = card.data
    assert data.base_model == files["base_card"]["name"]
    assert data.library_name == "transformers"
    assert data.kava["teachers"] == {files["teacher_cards"][0]["name"]:
                                     files["teacher_cards"][0]["weights_sha256"]}
    assert data.kava["data_sha256"] == {split: info["sha256"] for split, info
                                        in files["train_info"]["data"]["splits"].items()}
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    kv = files["summary"]["models"]["kv"]
    assert results == {"accuracy": kv["accuracy"]["mean"], "nll": kv["nll"]["mean"]}
    contrast = files["summary"]["comparisons"]["kv"]["nll"]
    assert f"{contrast['mean']:.4f} [{contrast['ci'][0]:.4f}" in card.text
    assert "keep_layers [0, 2]" in card.text
    assert "hf upload" in card.text
    assert "prompt format plain, template `'Question: {question}" in card.text


def test_a_chat_trained_students_card_names_its_chat_template(run_files):
    tmp_path, paths, _ = run_files
    done = _stage(tmp_path, paths, "kv", "--prompt-format", "chat")
    assert done.returncode == 0, done.stderr
    text = ModelCard.load(tmp_path / "hub" / "README.md").text
    assert "prompt format chat: the student's own chat template" in text
    assert "Question: {question}" not in text


def test_an_arm_missing_from_the_summary_is_named(run_files):
    tmp_path, paths, _ = run_files
    done = _stage(tmp_path, paths, arm="kv_l2")
    assert done.returncode != 0
    assert "kava: error" in done.stderr and "'kv_l2'" in done.stderr
    assert not (tmp_path / "hub").exists()
