"""The README documents every config key the schema defines, with the schema's default, and
nothing the schema lacks: the schema holds the defaults, the README shows them; and its study
tables are those the committed studies/ give."""

import json
import re

import pytest
import yaml

from conftest import PROJECT
from kava.errors import KavaError
from kava.report.studies import BLOCK, add_study, render_readme, study_table


def schema_keys(schema, prefix=""):
    for key, spec in schema.get("properties", {}).items():
        name = f"{prefix}{key}"
        nested = [k for k in spec.get("properties", {})] if spec.get("type") == "object" else []
        if nested and key != "models":
            yield from schema_keys(spec, f"{name}.")
        else:
            yield name, spec


def test_every_config_key_is_documented_with_its_default():
    schema = yaml.safe_load((PROJECT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (PROJECT / "README.md").read_text()
    table = re.search(r"## Config keys\n(.*?)\n## ", readme, re.S).group(1)
    documented = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", table, re.M))
    keys = dict(schema_keys(schema))
    assert set(documented) == set(keys)
    for key, spec in keys.items():
        shown = documented[key].strip()
        if "default" not in spec:
            assert shown == "(required)", key
        else:
            assert yaml.safe_load(shown.strip("`")) == spec["default"], key


def test_quick_start_has_the_two_commands():
    readme = (PROJECT / "README.md").read_text()
    quick = re.search(r"## Quick start\n(.*?)\n## ", readme, re.S).group(1)
    assert re.findall(r"^make \w+", quick, re.M) == ["make run", "make test"]


def test_study_tables_match_the_committed_studies():
    """Every committed study has its block in the README, and each block is exactly what
    kava.report.studies renders from studies/<name>/: numbers in the README name their run."""
    readme = (PROJECT / "README.md").read_text()
    blocks = [m.group(2) for m in BLOCK.finditer(readme)]
    committed = sorted(p.parent.name for p in (PROJECT / "studies").glob("*/summary.json"))
    assert sorted(blocks) == committed
    assert render_readme(readme) == readme, \
        "README study tables differ: run python -m kava.report.studies --readme README.md"


def _study(folder, source, kv_mean):
    nll = {"mean": kv_mean, "ci": [kv_mean - 0.1, kv_mean + 0.1], "interval": "t",
           "n_seeds": 3, "p_value": 0.25, "p_floor": 0.25, "bootstrap": {"ci": [-0.2, -0.05]}}
    summary = {"control": "ce", "contrasts": [],
               "models": {"ce": {"kind": "arm", "nll": {"mean": 2.5, "std": 0.02}},
                          "kv": {"kind": "arm", "nll": {"mean": 2.5 + kv_mean, "std": 0.01}}},
               "comparisons": {"kv": {"seeds": [0, 1, 2], "nll": nll, "gap_recovered": None}}}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "STUDY.json").write_text(json.dumps({
        "commit": "0123456789abcdef", "command": "make run", "date": "2026-12-05",
        "data": {"source": source, "path": "/data/gsm8k" if source == "path" else None,
                 "test_sha256": "bb1c4f23a89b8cf9ea2c"}}))


def test_a_changed_summary_makes_the_readme_disagree(tmp_path):
    _study(tmp_path / "default", "path", -0.125)
    readme = "intro\n<!-- study:default -->\nold numbers\n<!-- /study -->\ntail\n"
    rendered = render_readme(readme, tmp_path)
    assert rendered != readme and rendered.startswith("intro\n<!-- study:default -->\n")
    assert rendered.endswith("<!-- /study -->\ntail\n")
    assert "| kv − ce | 3 | -0.1250 [" in rendered
    assert "on GSM8K (a local copy: /data/gsm8k; test rows sha256 bb1c4f23a89b)" in rendered
    assert "Synthetic" not in rendered and "commit 0123456" in rendered
    assert render_readme(rendered, tmp_path) == rendered
    assert "validation NLL" not in rendered  # a study that recorded no chosen steps
    study = json.loads((tmp_path / "default" / "STUDY.json").read_text())
    study["validation"] = {"kv": {"steps": [20, 30, 30], "nll": [2.7, 2.6, 2.8]}}
    (tmp_path / "default" / "STUDY.json").write_text(json.dumps(study))
    table = study_table("default", tmp_path)
    assert "| kv | 2.3750 ± 0.0100 | 2.7000 ± 0.1000 | 20, 30, 30 |" in table
    assert "| ce | 2.5000 ± 0.0200 | — | — |" in table
    _study(tmp_path / "synthetic", "synthetic", -0.125)
    block = study_table("synthetic", tmp_path)
    assert block.startswith("**Synthetic problems, not GSM8K:**")


def test_add_study_records_the_run(tmp_path):
    results = tmp_path / "results"
    (results / "eval").mkdir(parents=True)
    (results / "data").mkdir()
    (results / "eval" / "summary.json").write_text('{"control": "ce"}')
    (results / "data" / "data.json").write_text(json.dumps(
        {"source": "path", "path": "/data/gsm8k", "splits": {"train": {"sha256": "aa"},
                                                              "test": {"sha256": "bb"}}}))
    for arm, seed, best, curve in (("kv", 0, 20, [3.1, 2.9, 2.7, 2.8]),
                                   ("kv", 1, 30, [3.1, 2.9, 2.8, 2.6]),
                                   ("ce", 0, None, None)):  # a run that did not choose
        folder = results / "train" / arm / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "train.json").write_text(json.dumps(
            {"best_step": best, "validation": curve and [{"step": 10 * k, "nll": nll}
                                                         for k, nll in enumerate(curve)]}))
    add_study("real", results, "make run", tmp_path / "studies")
    study = json.loads((tmp_path / "studies" / "real" / "STUDY.json").read_text())
    assert study["validation"] == {"kv": {"steps": [20, 30], "nll": [2.7, 2.6]}}
    assert study["command"] == "make run" and re.fullmatch(r"[0-9a-f]{40}", study["commit"])
    assert study["data"] == {"source": "path", "path": "/data/gsm8k", "train_sha256": "aa",
                             "test_sha256": "bb"}
    assert json.loads((tmp_path / "studies" / "real" / "summary.json").read_text()) == {
        "control": "ce"}
    with pytest.raises(KavaError, match=r"study file .*data.json: unreadable"):
        add_study("none", tmp_path / "missing", "make run", tmp_path / "studies")
