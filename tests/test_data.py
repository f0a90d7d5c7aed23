"""Data preparation: sources, row checks, subsets, the generator and the prepare stage."""

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import PROJECT
from kava.data import (PROMPT_TEMPLATE, _table_records, check_row, hold_out, prepare, read_split,
                       rows_sha256, subset, usable_rows)
from kava.errors import KavaError
from kava.synthetic import TEMPLATES, generate

GSM8K = PROJECT.parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(),
                                 reason="GSM8K copy not present at ../shared/data/gsm8k")


def config(**overrides):
    return {"source": "path", "path": None, "train_size": None, "validation_size": 0,
            "test_size": None, "seed": 0, "on_bad_row": "error", **overrides}


def row(question="Tom has 2 apples and buys 3. How many?", answer="2+3 = <<2+3=5>>5\n#### 5"):
    return {"question": question, "answer": answer}


def write_jsonl(folder, train_lines, test_lines=None):
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train_lines), ("test", test_lines or [json.dumps(row())])):
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


# ---- the generator ---------------------------------------------------------------------------

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def test_generator_is_seeded_and_its_arithmetic_is_right():
    rows = generate(200, seed=7, split="train")
    assert rows == generate(200, seed=7, split="train")
    assert rows != generate(200, seed=8, split="train")
    assert len({r["question"] for r in rows}) == 200
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for r in rows:
        lines = r["answer"].split("\n")
        steps = [ANNOTATION.search(line) for line in lines[:-1]]
        assert 2 <= len(steps) <= 4 and all(steps), r["answer"]
        for a, op, b, value, shown in (step.groups() for step in steps):
            a, b, value = int(a), int(b), int(value)
            assert ops[op](a, b) == value == int(shown) and value >= 0
            assert op != "/" or a % b == 0
        assert lines[-1] == f"#### {steps[-1].group(4)}"
        assert check_row(r)[2] == steps[-1].group(4)


def test_generator_uses_every_template_and_test_avoids_train():
    train = generate(300, seed=0, split="train")
    marks = ["change", "packs", "pages", "saves half", "equally", "farm", "train travels", "hall"]
    assert len(marks) == len(TEMPLATES)
    assert all(any(mark in r["question"] for r in train) for mark in marks)
    test = generate(300, seed=0, split="test", exclude={r["question"] for r in train})
    assert not {r["question"] for r in test} & {r["question"] for r in train}


# ---- sources ---------------------------------------------------------------------------------

@needs_gsm8k
def test_gsm8k_from_a_path_with_subsets():
    tables, info = prepare(config(path=str(GSM8K), train_size=20, test_size=10))
    assert info["source"] == "path" and info["path"] == str(GSM8K.resolve())
    train = tables["train"]
    assert len(train) == 20 and info["splits"]["train"]["available"] == 7473
    assert info["splits"]["test"]["available"] == 1319
    indices = [int(r["id"].rsplit("-", 1)[1]) for r in train]
    assert indices == sorted(indices) and all(r["id"].startswith("gsm8k-train-") for r in train)
    lines = (GSM8K / "train.jsonl").read_text().splitlines()
    for r in train:
        source = json.loads(lines[int(r["id"].rsplit("-", 1)[1])])
        assert r["question"] == source["question"] and r["answer"] == source["answer"]
        assert r["prompt"] == PROMPT_TEMPLATE.format(question=r["question"])
        assert r["text"] == r["prompt"] + r["answer"]
        assert r["final"] == r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    again, info_again = prepare(config(path=str(GSM8K), train_size=20, test_size=10))
    assert again == tables and info_again["splits"] == info["splits"]
    other, _ = prepare(config(path=str(GSM8K), train_size=20, test_size=10, seed=1))
    assert [r["id"] for r in other["train"]] != [r["id"] for r in train]


@needs_gsm8k
def test_gsm8k_finals_drop_thousands_commas():
    tables, _ = prepare(config(path=str(GSM8K)))
    finals = {r["final"] for r in tables["train"]}
    assert all(re.fullmatch(r"-?\d+", f) for f in finals)
    raw = [json.loads(line)["answer"] for line in (GSM8K / "train.jsonl").open()]
    assert sum("," in a.rsplit("####", 1)[1] for a in raw) > 0  # the case really occurs


def test_parquet_and_save_to_disk_sources_match_jsonl(tmp_path):
    import datasets

    rows = [row(f"Question {i}?", f"{i}+1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}") for i in range(5)]
    jsonl = write_jsonl(tmp_path / "jsonl", [json.dumps(r) for r in rows],
                        [json.dumps(r) for r in rows[:2]])
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for split, part in (("train", rows), ("test", rows[:2])):
        datasets.Dataset.from_list(part).to_parquet(str(parquet / f"{split}.parquet"))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(saved))
    results = [prepare(config(path=str(folder)))[0] for folder in (jsonl, parquet, saved)]

    def content(tables):
        return [(r["question"], r["answer"], r["final"]) for split in tables for r in tables[split]]

    assert content(results[0]) == content(results[1]) == content(results[2])
    assert results[0]["train"][4]["final"] == "5"


def test_auto_prefers_the_env_path_then_falls_back_to_the_generator(tmp_path, monkeypatch):
    folder = write_jsonl(tmp_path / "mydata", [json.dumps(row())])
    tables, info = prepare(config(source="auto"), env_path=str(folder))
    assert info["source"] == "path" and tables["train"][0]["id"] == "mydata-train-00000"

    from huggingface_hub import constants
    # Port 9 on localhost refuses at once: the hub is unreachable, whatever this machine's network.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    tables, info = prepare(config(source="auto", train_size=4, test_size=3))
    assert info["source"] == "synthetic" and info["path"] is None
    assert "unreachable" in info["tried"][1] and "KAVA_DATA_PATH" in info["tried"][0]
    assert [len(tables[s]) for s in ("train", "test")] == [4, 3]
    with pytest.raises(KavaError, match="data.source hub: hub openai/gsm8k: .*unreachable"):
        prepare(config(source="hub"))


def test_synthetic_needs_sizes():
    with pytest.raises(KavaError, match="data.train_size: the synthetic generator needs"):
        prepare(config(source="synthetic", test_size=3))


# ---- bad input -------------------------------------------------------------------------------

def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    lines = [json.dumps(row()), "", json.dumps(row()), '{"question": "Broken", "answer": ']
    folder = write_jsonl(tmp_path / "d", lines)
    with pytest.raises(KavaError, match=rf"{re.escape(str(folder))}/train.jsonl:4: malformed JSON"):
        prepare(config(path=str(folder)))
    tables, info = prepare(config(path=str(folder), on_bad_row="skip"))
    assert len(tables["train"]) == 2
    assert info["splits"]["train"]["skipped"] == {"malformed_json": 1}
    assert info["splits"]["train"]["skipped_rows"]["malformed_json"] == [f"{folder}/train.jsonl:4"]
    # Ids count rows, bad ones included, so they stay stable whatever on_bad_row says.
    assert [r["id"] for r in tables["train"]] == ["d-train-00000", "d-train-00001"]


@pytest.mark.parametrize("record, reason", [
    (row(answer=""), "empty answer"),
    (row(answer="   \n"), "empty answer"),
    (row(question=""), "empty question"),
    ({"question": "Q?"}, "no string 'question' and 'answer'"),
    ([1, 2], "not a JSON object"),
    (row(answer="It is 5."), r"answer does not end in '#### <number>'"),
    (row(answer="#### five"), r"answer does not end in '#### <number>'"),
])
def test_unusable_rows_are_named_or_counted(tmp_path, record, reason):
    folder = write_jsonl(tmp_path / "d", [json.dumps(row()), json.dumps(record)])
    with pytest.raises(KavaError, match=rf"train.jsonl:2: {reason}"):
        prepare(config(path=str(folder)))
    tables, info = prepare(config(path=str(folder), on_bad_row="skip"))
    assert len(tables["train"]) == 1 and sum(info["splits"]["train"]["skipped"].values()) == 1


def test_empty_dataset_is_an_error(tmp_path):
    folder = write_jsonl(tmp_path / "d", [])
    with pytest.raises(KavaError, match="split 'train' has no usable rows"):
        prepare(config(path=str(folder)))
    folder = write_jsonl(tmp_path / "e", [json.dumps(row(answer=""))])
    with pytest.raises(KavaError, match=r"split 'train' has no usable rows \(1 skipped"):
        prepare(config(path=str(folder), on_bad_row="skip"))


def test_path_errors_name_the_path(tmp_path):
    with pytest.raises(KavaError, match="not a folder"):
        prepare(config(path=str(tmp_path / "nope")))
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(KavaError, match="needs exactly one of test.jsonl or test.parquet"):
        prepare(config(path=str(tmp_path)))
    (tmp_path / "test.parquet").write_text("not parquet")
    with pytest.raises(KavaError, match="test.parquet: not a readable parquet file"):
        prepare(config(path=str(tmp_path)))
    with pytest.raises(KavaError, match="neither data.path nor"):
        prepare(config())


# ---- the stage -------------------------------------------------------------------------------

def run_prepare(out_dir, data, env_path=""):
    return subprocess.run(
        [sys.executable, "-m", "stages.prepare", "--threads", "1", "--data", json.dumps(data),
         f"--env-data-path={env_path}", "--out-dir", str(out_dir)],
        cwd=PROJECT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT)})


def test_prepare_stage_writes_parquet_and_provenance(tmp_path):
    data = config(source="synthetic", train_size=6, test_size=4, seed=3)
    result = run_prepare(tmp_path / "out", data)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "out" / "data.json").read_text())
    assert info["source"] == "synthetic" and info["template"] == PROMPT_TEMPLATE
    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert table.column_names == ["id", "question", "answer", "final", "prompt", "text"]
    assert table.num_rows == 6 == info["splits"]["train"]["rows"]
    assert pq.read_table(tmp_path / "out" / "validation.parquet").num_rows == 0
    assert read_split(tmp_path / "out" / "test.parquet", ("id",), 1, 3) == [
        {"id": "synthetic-test-00001"}, {"id": "synthetic-test-00002"}]
    tables, _ = prepare(data)
    assert info["splits"]["train"]["sha256"] == rows_sha256(tables["train"])


def test_prepare_stage_bad_row_is_one_line_and_writes_nothing(tmp_path):
    folder = write_jsonl(tmp_path / "d", [json.dumps(row())], ["{not json"])
    result = run_prepare(tmp_path / "out", config(source="auto"), env_path=str(folder))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kava: error: {folder}/test.jsonl:1: malformed JSON (Expecting property name enclosed "
        f"in double quotes, column 2) (data.on_bad_row: skip counts and skips such rows)"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ---- text encodings --------------------------------------------------------------------------

ACCENTED = row(question="Zoé a 2 pommes et en achète 3. Combien ?")


def write_encoded(folder, text, encoding):
    """A split folder whose train.jsonl is `text` in `encoding` (test.jsonl plain UTF-8)."""
    write_jsonl(folder, [])
    (folder / "train.jsonl").write_bytes(text.encode(encoding))
    return folder


@pytest.mark.parametrize("encoding, newline", [("utf-8-sig", "\n"), ("utf-8", "\r\n"),
                                               ("utf-8-sig", "\r\n")])
def test_windows_jsonl_keeps_every_row(tmp_path, encoding, newline):
    """A byte order mark (as Windows editors write it) and CRLF lines are valid UTF-8 JSONL:
    under on_bad_row: skip no row may be lost to them."""
    lines = [json.dumps(ACCENTED, ensure_ascii=False), json.dumps(row())]
    folder = write_encoded(tmp_path / "d", "".join(line + newline for line in lines), encoding)
    for on_bad_row in ("error", "skip"):
        tables, info = prepare(config(path=str(folder), on_bad_row=on_bad_row))
        assert [r["question"] for r in tables["train"]] == [ACCENTED["question"], row()["question"]]
        assert info["splits"]["train"]["skipped"] == {}


@pytest.mark.parametrize("encoding, message", [
    ("utf-16", "train.jsonl: not UTF-8 but UTF-16 (it starts with a UTF-16 byte order mark); "
               "save it as UTF-8"),
    ("utf-32", "train.jsonl: not UTF-8 but UTF-32 (it starts with a UTF-32 byte order mark); "
               "save it as UTF-8"),
    ("utf-16-le", "train.jsonl:1: not UTF-8 (NUL bytes: UTF-16 or UTF-32 without a byte order "
                  "mark?); save it as UTF-8"),
    ("latin-1", "train.jsonl:2: not UTF-8 (byte 0xe9, byte 17 of the line: latin-1 or cp1252?); "
                "save it as UTF-8"),
])
def test_jsonl_in_another_encoding_is_named(tmp_path, encoding, message):
    text = json.dumps(row()) + "\n" + json.dumps(ACCENTED, ensure_ascii=False) + "\n"
    folder = write_encoded(tmp_path / "d", text, encoding)
    # A wrong encoding is the file's fault, not a row's: skip does not hide it.
    for on_bad_row in ("error", "skip"):
        with pytest.raises(KavaError) as err:
            prepare(config(path=str(folder), on_bad_row=on_bad_row))
        assert str(err.value) == f"{folder}/{message}"


# ---- validation rows --------------------------------------------------------------------------

def assert_held_out(tables, info, validation_size):
    """Validation rows: from the train split, as many as asked, in no train batch or test row."""
    train, validation, test = ({r["id"] for r in tables[s]} for s in ("train", "validation", "test"))
    assert len(validation) == validation_size == info["splits"]["validation"]["rows"]
    assert all(i.split("-")[-2] == "train" for i in validation)
    assert not validation & train and not validation & test
    assert {r["question"] for r in tables["validation"]}.isdisjoint(
        {r["question"] for r in tables["test"]})
    assert info["splits"]["validation"]["sha256"] == rows_sha256(tables["validation"])
    assert info["splits"]["validation"]["from"] == "train"


@needs_gsm8k
def test_gsm8k_validation_rows_are_train_rows_held_out_of_training():
    tables, info = prepare(config(path=str(GSM8K), train_size=20, validation_size=8, test_size=10))
    assert_held_out(tables, info, 8)
    # Holding out validation rows leaves the train rows what they were without them.
    plain, _ = prepare(config(path=str(GSM8K), train_size=20, test_size=10))
    assert tables["train"] == plain["train"]
    again, info_again = prepare(config(path=str(GSM8K), train_size=20, validation_size=8,
                                       test_size=10))
    assert again == tables and info_again == info
    other, _ = prepare(config(path=str(GSM8K), train_size=20, validation_size=8, test_size=10,
                              seed=1))
    assert {r["id"] for r in other["validation"]} != {r["id"] for r in tables["validation"]}
    # The validation rows do not move when train_size changes.
    more, _ = prepare(config(path=str(GSM8K), train_size=40, validation_size=8, test_size=10))
    assert more["validation"] == tables["validation"]


def test_validation_rows_from_a_jsonl_path(tmp_path):
    questions = [f"Tom has {n} apples and buys 3. How many?" for n in range(12)]
    folder = write_jsonl(tmp_path / "d", [json.dumps(row(q)) for q in questions])
    tables, info = prepare(config(path=str(folder), train_size=None, validation_size=4))
    assert_held_out(tables, info, 4)
    # train_size null: every train-split row not held out.
    assert len(tables["train"]) == 8 == info["splits"]["train"]["rows"]
    assert tables == prepare(config(path=str(folder), validation_size=4))[0]
    with pytest.raises(KavaError, match="data.validation_size 12: the train split has only 12"):
        prepare(config(path=str(folder), validation_size=12))


def test_validation_rows_from_the_generator():
    data = config(source="synthetic", train_size=10, validation_size=5, test_size=6, seed=2)
    tables, info = prepare(data)
    assert_held_out(tables, info, 5)
    assert len(tables["train"]) == 10
    assert tables == prepare(data)[0]


def test_hub_rows_hold_out_validation_the_same_way():
    """The hub is out of reach here; its records come from a datasets.Dataset, which is what
    the hub path iterates (_hub_splits)."""
    import datasets

    dataset = datasets.Dataset.from_list([row(f"Tom has {n} apples and buys 3. How many?")
                                          for n in range(30)])
    rows, _ = usable_rows(_table_records(dataset, "hub[train]"), "train", "gsm8k", "error")
    train, validation = hold_out(rows, 10, 6, seed=0)
    assert len(train) == 10 and len(validation) == 6
    assert not {r["id"] for r in train} & {r["id"] for r in validation}
    assert train == subset(rows[:], 10, 0)
    assert (train, validation) == hold_out(rows, 10, 6, seed=0)
    assert validation != hold_out(rows, 10, 6, seed=1)[1]
