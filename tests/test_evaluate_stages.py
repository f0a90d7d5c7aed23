"""The evaluate and report stages as Snakemake runs them (outputs, one-line errors on bad input),
and the held-out KV fit (raw cosine, probe R²) on setups whose answer is known by hand."""

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
from kava.evaluate import eval_record, heldout_kv
from kava.models import load_model, load_tokenizer
from kava.projector import KVProjector, save_projectors
from kava.synthetic import generate
from test_kvstore import build_store

EVAL = {"max_new_tokens": 6, "batch_size": 8, "dtype": "fp32", "generate_examples": None,
        "probe_examples": 8, "probe_ridge": 1e-6, "stop": ["\nQuestion:"],
        "noise_examples": 3}


def prepared_rows(n, split="test"):
    """Prepared rows (every column, the real prompt template), as data/<split>.parquet holds."""
    records = ((f"{split} row {i}", r) for i, r in enumerate(generate(n, 0, split)))
    return usable_rows(records, split, "synthetic", "error")[0]


def stage(name, *args):
    return subprocess.run([sys.executable, "-m", f"stages.{name}", "--threads", "1", *map(str, args)],
                          cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})


def evaluate(tmp_path, model_args, data, eval_cfg=EVAL):
    out = tmp_path / "eval"
    result = stage("evaluate", "--name", "m", *model_args, "--data", data,
                   "--eval", json.dumps(eval_cfg), "--max-length", 256, "--out", out / "m.json",
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
    result, out = evaluate(tmp_path, ["--card", tmp_path / "card.json", "--noise-check"],
                           tmp_path / "test.parquet")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "m.json").read_text())
    assert record["n"] == 3 and record["kv_cosine"] is None and record["kv_r2"] is None
    # --noise-check (the init job's): the batched NLL against each example alone.
    assert 0 <= record["nll_noise"]["max_abs"] < 1e-3
    assert record["nll_noise"]["mean_abs"] <= record["nll_noise"]["max_abs"]
    assert record["nll_noise"]["examples"] == 3
    assert record["per_example"]["id"] == [row["id"] for row in rows]
    assert record["settings"]["dtype"] == "fp32" and record["model"]["name"] == card["name"]
    assert record["settings"]["nll_dtype"] == "fp32"
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
                       {"control": "ce", "contrasts": [], "n_boot": 100, "seed": 0}),
                   "--title", "kava report", *[str(x) for pair in outputs.items() for x in pair])
    assert "no evaluated examples (empty predictions)" in one_line_error(result)
    assert not any(path.exists() for path in outputs.values())


# ---- held-out KV fit, by hand -----------------------------------------------------------------

SHAPE = (2, 16)  # tiny llama: 2 KV heads of 64 / 4


@pytest.fixture(scope="module")
def self_store(tiny_card, tmp_path_factory):
    """A tiny llama as its own teacher: its fp32 pre-RoPE KV of 10 train rows and 5 test rows,
    stored."""
    card = tiny_card("llama")
    folder = tmp_path_factory.mktemp("self")
    splits = {}
    for split, n in (("train", 10), ("test", 5)):
        rows = prepared_rows(n, split)
        splits[split] = rows, build_store(card, rows, folder / split, per_shard=3, dtype="fp32",
                                          split=split)
    return card, splits


def train_info(card):
    """The parts of train.json the held-out measures read: key space, alignment, per teacher
    the weights its KV came from and the layer map."""
    return {"key_space": "pre_rope", "config": {"time_alignment": "auto", "kv_target": "teacher"},
            "teachers": {card["name"]: {
                "identity": {"teacher": {"weights_sha256": card["weights_sha256"]}},
                "layer_map": list(range(card["num_layers"]))}}}


def heldout(student_card, teacher_card, splits, projector, ridge=1e-6, test_kv=None,
            max_length=1024):
    model, tokenizer = load_model(student_card), load_tokenizer(student_card["dir"])
    (train_rows, train_manifest), (test_rows, test_manifest) = splits["train"], splits["test"]
    info = train_info(teacher_card)
    probe_maps = {teacher_card["name"]: info["teachers"][teacher_card["name"]]["layer_map"]}
    return heldout_kv(model, tokenizer, {teacher_card["name"]: projector}, info, probe_maps,
                      [train_manifest], [test_manifest], train_rows, test_rows,
                      max_length=max_length, batch_size=2, probe_ridge=ridge, test_kv=test_kv)


@pytest.mark.parametrize("direction", ["student_to_teacher", "teacher_to_student"])
def test_heldout_kv_is_one_when_the_student_is_its_teacher(self_store, direction):
    card, splits = self_store
    n = card["num_layers"]
    projector = KVProjector(list(range(n)), SHAPE, SHAPE, kind="identity", hidden=512,
                            direction=direction)
    result = heldout(card, card, splits, projector)
    assert set(result) == {"cosine", "r2"}
    for measure in ("cosine", "r2"):
        scores = result[measure]
        assert set(scores) == {"overall", "per_teacher", "per_layer"}
        assert scores["overall"] == pytest.approx(1, abs=1e-4)
        assert scores["per_teacher"] == {card["name"]: pytest.approx(1, abs=1e-4)}
        assert scores["per_layer"][card["name"]] == pytest.approx([1.0] * n, abs=1e-4)


def test_heldout_cosine_of_negated_keys_is_zero_and_the_probe_ignores_the_projector(self_store):
    """K projected to −K (cosine −1) and V kept (cosine 1): the mean over K and V is 0. The probe
    reads the student's own KV, not the projector's output, so its R² stays 1."""
    card, splits = self_store
    n = card["num_layers"]
    projector = KVProjector(list(range(n)), SHAPE, SHAPE, kind="linear", hidden=512,
                            direction="teacher_to_student")
    with torch.no_grad():
        for layer in range(n):
            projector.maps[f"k{layer}"].dims.weight.neg_()
    result = heldout(card, card, splits, projector)
    assert result["cosine"]["per_layer"][card["name"]] == pytest.approx([0.0] * n, abs=1e-5)
    assert result["r2"]["per_layer"][card["name"]] == pytest.approx([1.0] * n, abs=1e-4)


def test_heldout_probe_r2_of_another_student_is_below_one(self_store, tiny_card):
    """A student of other weights holds its teacher's KV less than exactly: R² falls below 1,
    and a heavy ridge (which shrinks the probe towards the train mean) pulls it towards 0."""
    card, splits = self_store
    other = tiny_card("llama", seed=1)
    n = card["num_layers"]
    projector = KVProjector(list(range(n)), SHAPE, SHAPE, kind="identity", hidden=512,
                            direction="teacher_to_student")
    r2 = heldout(other, card, splits, projector)["r2"]
    assert all(score < 0.99 for score in r2["per_layer"][card["name"]])
    shrunk = heldout(other, card, splits, projector, ridge=1e6)["r2"]
    assert shrunk["per_layer"][card["name"]] == pytest.approx([0.0] * n, abs=0.05)


def test_heldout_one_pass_equals_the_cosine_and_probe_alone(self_store, tiny_card):
    """heldout_kv scores cosine and probe in one pass over the test rows: the same numbers as
    kv_cosine and kv_probe_r2, each with its own pass."""
    from kava.kvfit import kv_cosine, kv_probe_r2
    from kava.kvstore import KVStore

    card, splits = self_store
    other = tiny_card("llama", seed=1)
    projector = KVProjector(list(range(card["num_layers"])), SHAPE, SHAPE, kind="linear",
                            hidden=512, direction="teacher_to_student")
    both = heldout(other, card, splits, projector)
    model, tokenizer = load_model(other), load_tokenizer(other["dir"])
    (train_rows, train_manifest), (test_rows, test_manifest) = splits["train"], splits["test"]
    stores = {card["name"]: KVStore(test_manifest)}
    layer_maps = {card["name"]: projector.layer_map}
    args = dict(key_space="pre_rope", time_alignment=train_info(card)["config"]["time_alignment"])
    cosine = kv_cosine(model, {card["name"]: projector.eval()}, stores, test_rows, tokenizer,
                       1024, 2, **args)
    r2 = kv_probe_r2(model, tokenizer, {card["name"]: KVStore(train_manifest)}, stores,
                     layer_maps, train_rows, test_rows, 1024, 2, 1e-6, **args)
    for name, alone in (("cosine", cosine), ("r2", r2)):
        assert both[name]["per_layer"][card["name"]] == pytest.approx(
            alone["per_layer"][card["name"]], abs=1e-6)
    assert r2["overall"] < 0.99  # another student: a probe that can fail


@pytest.mark.parametrize("max_length", [1024, 24])
def test_heldout_kv_reads_the_nll_forwards_kv_instead_of_its_own(self_store, tiny_card,
                                                                  monkeypatch, max_length):
    """The evaluate stage hands the probe the student's test-row KV from the answer NLL's
    forward (left-padded, never truncated): the same scores as the probe's own forward
    (right-padded, cut at max_length), with no student forward over the test rows; the NLL is
    the one answer_nll gives without capturing. A row whose tokens differ is forwarded."""
    import kava.kvfit
    from kava.evaluate import answer_nll, at_word_boundary

    card, splits = self_store
    other = tiny_card("llama", seed=1)
    projector = KVProjector(list(range(card["num_layers"])), SHAPE, SHAPE, kind="linear",
                            hidden=512, direction="teacher_to_student")
    model, tokenizer = load_model(other), load_tokenizer(other["dir"])
    test_rows = splits["test"][0]
    prompts, answers = zip(*(at_word_boundary(r["prompt"], r["answer"]) for r in test_rows))
    nlls, test_kv = answer_nll(model, tokenizer, prompts, answers, 2, key_space="pre_rope")
    assert nlls == answer_nll(model, tokenizer, prompts, answers, 2)
    own = heldout(other, card, splits, projector, max_length=max_length)
    forwards = []
    forward = kava.kvfit.student_forward
    monkeypatch.setattr(kava.kvfit, "student_forward",
                        lambda model, batch, *a: forwards.append(len(batch.input_ids))
                        or forward(model, batch, *a))
    shared = heldout(other, card, splits, projector, test_kv=test_kv, max_length=max_length)
    assert forwards == [2] * 5  # the 10 train rows only
    for name in ("cosine", "r2"):
        assert shared[name]["per_layer"][card["name"]] == pytest.approx(
            own[name]["per_layer"][card["name"]], abs=1e-5)
    forwards.clear()
    test_kv[4] = {**test_kv[4], "input_ids": test_kv[4]["input_ids"].flip(0)}
    heldout(other, card, splits, projector, test_kv=test_kv, max_length=max_length)
    assert forwards == [2] * 5 + [1]  # the last test batch, row 4 alone, is forwarded


def test_heldout_kv_refuses_a_store_of_other_weights(self_store):
    card, splits = self_store
    other = {**card, "weights_sha256": "0" * 64}
    projector = KVProjector(list(range(card["num_layers"])), SHAPE, SHAPE, kind="identity",
                            hidden=512, direction="teacher_to_student")
    with pytest.raises(KavaError, match=f"manifest {splits['test'][1]}: weights_sha256 is"):
        heldout(card, other, splits, projector)


def test_evaluate_stage_on_a_trained_student(self_store, tmp_path):
    """--model-dir with its projectors, train.json and both splits' stores: the record carries
    the held-out raw cosine and probe R² (the noise check is the init job's)."""
    card, splits = self_store
    (train_rows, train_manifest), (test_rows, test_manifest) = splits["train"], splits["test"]
    write_split(train_rows, tmp_path / "train.parquet")
    write_split(test_rows, tmp_path / "test.parquet")
    projector = KVProjector(list(range(card["num_layers"])), SHAPE, SHAPE, kind="identity",
                            hidden=512, direction="student_to_teacher")
    save_projectors({card["name"]: projector}, tmp_path / "projectors.safetensors")
    (tmp_path / "train.json").write_text(json.dumps(train_info(card)))
    (tmp_path / "card.json").write_text(json.dumps(card))
    (tmp_path / "dims.json").write_text(json.dumps({"model": card["name"],
                                                    "num_layers": card["num_layers"]}))
    result, out = evaluate(tmp_path, ["--model-dir", card["dir"],
                                      "--student-card", tmp_path / "card.json",
                                      "--teacher-dims", tmp_path / "dims.json",
                                      "--projector", tmp_path / "projectors.safetensors",
                                      "--train-info", tmp_path / "train.json",
                                      "--manifests", test_manifest,
                                      "--train-manifests", train_manifest,
                                      "--train-data", tmp_path / "train.parquet"],
                           tmp_path / "test.parquet", {**EVAL, "generate_examples": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "m.json").read_text())
    assert record["kv_cosine"]["overall"] == pytest.approx(1, abs=1e-4)
    assert record["kv_r2"]["overall"] == pytest.approx(1, abs=1e-4)
    assert list(record["kv_r2"]["per_teacher"]) == [card["name"]]
    assert record["nll_noise"] is None
    # generate_examples 2: NLL of all 5 examples, accuracy of the first 2.
    assert len(record["per_example"]["nll"]) == 5 and len(record["per_example"]["correct"]) == 2
    assert "probe R²" in result.stdout
