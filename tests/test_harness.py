"""lm_eval: lm-evaluation-harness's gsm8k task on a tiny model, offline, from the run's prepared
rows, and its scores in the report."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT
from kava.config import schema_defaults
from kava.data import prepare, write_split
from kava.report import load_facts, render_report
from test_model_card import evals_and_summary

TASK = PROJECT / "workflow" / "lm_eval" / "gsm8k.yaml"
OFFLINE = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def data_files(tmp_path):
    tables, _ = prepare({**schema_defaults("data"), "source": "synthetic", "train_size": 6,
                         "test_size": 3})
    paths = {split: tmp_path / f"{split}.parquet" for split in tables}
    for split, rows in tables.items():
        write_split(rows, paths[split])
    return paths


def _stage(card_path, data_files, out, task=TASK):
    cfg = {"lm_eval": ["gsm8k"], "dtype": "fp32", "batch_size": 2, "max_new_tokens": 8}
    return subprocess.run(
        [sys.executable, "-m", "stages.lm_eval", "--name", "teacher-tiny", "--card",
         str(card_path), "--eval", json.dumps(cfg), "--task-yamls", str(task),
         "--train-data", str(data_files["train"]), "--test-data", str(data_files["test"]),
         "--out", str(out)], cwd=PROJECT, capture_output=True, text=True, env=OFFLINE)


def test_harness_scores_a_tiny_model_offline_and_the_report_shows_them(tmp_path, tiny_card,
                                                                     data_files):
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(tiny_card("llama")))
    out = tmp_path / "lm_eval" / "teacher-tiny.json"
    done = _stage(card_path, data_files, out)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(out.read_text())["tasks"]["gsm8k"]
    assert scores["n_examples"] == 3
    for name in ("strict-match", "flexible-extract"):
        assert 0 <= scores[f"exact_match,{name}"] <= 1
        assert f"exact_match_stderr,{name}" in scores

    evals, summary = evals_and_summary()
    facts = load_facts(harness={"teacher-tiny": out})
    _, markdown, _ = render_report(summary, evals, {}, facts, title="t")
    section = markdown.split("## lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    strict = f"{100 * scores['exact_match,strict-match']:.1f} ± "
    assert f"| teacher-tiny | gsm8k | 3 | {strict}" in section
    assert "## lm-evaluation-harness" not in render_report(summary, evals, {}, {}, "t")[1]


def test_a_missing_data_file_is_named(tmp_path, tiny_card, data_files):
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(tiny_card("llama")))
    data_files["test"] = tmp_path / "absent.parquet"
    done = _stage(card_path, data_files, tmp_path / "out.json")
    assert done.returncode != 0
    assert "kava: error" in done.stderr and "absent.parquet" in done.stderr
    assert not (tmp_path / "out.json").exists()
