"""The evaluate and report stages as Snakemake runs them (outputs, one-line errors on bad input),
and the held-out KV cosine on setups whose answer is known by hand."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT
from kava.data import usable_rows, write_split
from kava.errors import KavaError
from kava.evaluate import eval_record, heldout_kv_cosine
from kava.models import load_model, load_tokenizer
from kava.projector import KVProjector
from kava.synthetic import generate
from test_kvstore import build_store

EVAL = {"max_new_tokens": 6, "batch_size": 8, "dtype": "fp32", "stop": ["\nQuestion:"]}


def prepared_rows(n):
    """Prepared test rows (every column, the real prompt template), as data/test.parquet holds."""
    records = ((f"row {i}", r) for i, r in enumerate(generate(n, 0, "test")))
    return usable_rows(records, "test", "synthetic", "error")[0]


def stage(name, *args):
    return subprocess.run([sys.executable, "-m", f"stages.{name}", "--threads", "1", *map(str, args)],
                          cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})


def evaluate(tmp_path, model_args, data):
    out = tmp_path / "eval"
    result = stage("evaluate", "--name", "m", *model_args, "--data", data,
                   "--eval", json.dumps(EVAL), "--max-length", 256, "--out", out / "m.json",
                   "--predictions", out / "m" / "predictions.jsonl")
    return result, out


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("kava: error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_evaluate_stage_on_a_split_smaller_than_the_batch(tiny_card, tmp_path):
    card = tiny_card("llama")
    (tmp_path / "card.json").write_text(json.dumps(card))
    rows = prepared_rows(3)  # batch_size 8
    write_split(rows, tmp_path / "test.parquet")
    result, out = evaluate(tmp_path, ["--card", tmp_path / "card.json"], tmp_path / "test.parquet")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "m.json").read_text())
    assert record["n"] == 3 and record["kv_cosine"] is None
    assert record["per_example"]["id"] == [row["id"] for row in rows]
    assert record["settings"]["dtype"] == "fp32" and record["model"]["name"] == card["name"]
    lines = [json.loads(line) for line in (out / "m" / "predictions.jsonl").read_text().splitlines()]
    assert [line["question"] for line in lines] == [row["question"] for row in rows]
    assert [line["reference"] for line in lines] == [row["final"] for row in rows]
    assert [line["generated"] for line in lines] == record["per_example"]["prediction"]
    assert all(line["correct"] == (line["extracted"] == line["reference"]) for line in lines)
    assert all(line["answer_nll"] > 0 for line in lines)


def test_a_4bit_teacher_evaluates_through_its_card(tiny_card, tmp_path):
    card = tiny_card("llama")
    write_split(prepared_rows(2), tmp_path / "test.parquet")
    nll = {}
    for quantize in ("none", "nf4"):
        (tmp_path / f"{quantize}.json").write_text(json.dumps({**card, "quantize": quantize}))
        result, out = evaluate(tmp_path / quantize, ["--card", tmp_path / f"{quantize}.json"],
                               tmp_path / "test.parquet")
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((out / "m.json").read_text())
        assert record["model"]["quantize"] == quantize
        nll[quantize] = record["per_example"]["nll"]
    assert nll["nf4"] != nll["none"]  # the 4-bit weights really were used
    assert nll["nf4"] == pytest.approx(nll["none"], rel=0.05)


def test_model_folder_without_tokenizer_is_one_line_error(tiny_card, tmp_path):
    card = tiny_card("llama")
    folder = tmp_path / "student"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(card["dir"], name), folder / name)
    write_split(prepared_rows(2), tmp_path / "test.parquet")
    result, out = evaluate(tmp_path, ["--model-dir", folder], tmp_path / "test.parquet")
    assert one_line_error(result).startswith(f"kava: error: model folder {folder}: no usable "
                                             f"tokenizer")
    assert not out.exists() or not any(out.rglob("*"))


def test_report_stage_refuses_empty_predictions(tmp_path):
    record = eval_record(["a"], ["#### 1"], ["1"], [0.5])
    record["per_example"] = {key: [] for key in record["per_example"]}
    (tmp_path / "init.json").write_text(json.dumps(record))
    outputs = {"--html": tmp_path / "r.html", "--markdown": tmp_path / "r.md",
               "--summary": tmp_path / "summary.json", "--figures": tmp_path / "figures"}
    result = stage("report", "--evals", json.dumps({"init": str(tmp_path / "init.json"),
                                                    "teachers": {}, "arms": {}}),
                   "--metrics", "{}", "--report", json.dumps(
                       {"treatment": "kv", "control": "ce", "n_boot": 100, "seed": 0}),
                   *[str(x) for pair in outputs.items() for x in pair])
    assert "no evaluated examples (empty predictions)" in one_line_error(result)
    assert not any(path.exists() for path in outputs.values())


# ---- held-out KV cosine, by hand -----------------------------------------------------------------

@pytest.fixture(scope="module")
def self_store(tiny_card, tmp_path_factory):
    """A tiny llama as its own teacher: its fp32 pre-RoPE KV of 5 test rows, stored."""
    card = tiny_card("llama")
    rows = prepared_rows(5)
    manifest = build_store(card, rows, tmp_path_factory.mktemp("self"), per_shard=3, dtype="fp32",
                           split="test")
    return card, rows, manifest


def cosine(card, rows, manifest, projector):
    model, tokenizer = load_model(card), load_tokenizer(card["dir"])
    info = {"key_space": "pre_rope", "config": {"time_alignment": "auto"},
            "teachers": {card["name"]: {"identity": {"teacher": {
                "weights_sha256": card["weights_sha256"]}}}}}
    return heldout_kv_cosine(model, tokenizer, {card["name"]: projector}, info, [manifest], rows,
                             max_length=1024, batch_size=2)


def test_heldout_cosine_is_one_when_the_student_is_its_teacher(self_store):
    card, rows, manifest = self_store
    shape = (2, 16)  # tiny llama: 2 KV heads of 64 / 4
    n = card["num_layers"]
    result = cosine(card, rows, manifest, KVProjector(list(range(n)), shape, shape))  # identity
    assert result["overall"] == pytest.approx(1, abs=1e-5)
    assert result["per_layer"][card["name"]] == pytest.approx([1.0] * n, abs=1e-5)


def test_heldout_cosine_of_negated_keys_is_zero(self_store):
    """K projected to −K (cosine −1) and V kept (cosine 1): the mean over K and V is 0."""
    card, rows, manifest = self_store
    shape, n = (2, 16), card["num_layers"]
    projector = KVProjector(list(range(n)), shape, shape)
    with torch.no_grad():
        for layer in range(n):
            projector.maps[f"k{layer}"].dims.weight.neg_()
    result = cosine(card, rows, manifest, projector)
    assert result["per_layer"][card["name"]] == pytest.approx([0.0] * n, abs=1e-5)


def test_heldout_cosine_refuses_a_store_of_other_weights(self_store):
    card, rows, manifest = self_store
    other = {**card, "weights_sha256": "0" * 64}
    shape = (2, 16)
    with pytest.raises(KavaError, match=f"manifest {manifest}: weights_sha256 is"):
        cosine(other, rows, manifest, KVProjector(list(range(card["num_layers"])), shape, shape))
