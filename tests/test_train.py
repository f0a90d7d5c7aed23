"""Training from cached teacher KV on tiny random models: batches and alignment, the loss, the
loop (learning, arms, resume, signals, DDP), the stage, and bad inputs."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import PROJECT
from kava.batching import (IGNORE_INDEX, collate, example_order, kd_pairs, student_example,
                           teacher_inputs, time_alignment)
from kava.capture import forward_kv, student_forward
from kava.config import arm_configs, schema_defaults
from kava.data import PROMPT_TEMPLATE, rows_sha256, write_split
from kava.dims import detect_dims
from kava.distill import layer_scores, teacher_kv_std
from kava.errors import KavaError
from kava.io import write_json
from kava.kvfit import cka_layer_maps, kv_cosine
from kava.kvstore import KVStore, logits_spec
from kava.layer_maps import resolve
from kava.models import load_model, load_tokenizer, materialize
from kava.projector import KVProjector, load_projectors, save_projectors
from kava.synthetic import generate
from kava.train import derangement, lr_factor, mixed_precision, setup, setup_data, train
from kava.validation import validation_nll
from test_kvstore import build_store

MAX_LENGTH = 256


def train_config(**overrides):
    """The schema's train defaults with `overrides`, as one arm sees them."""
    config = {"train": {**schema_defaults("train"), **overrides}, "arms": {"arm": {}}}
    return arm_configs(config)["arm"]


def job_config(**overrides):
    """The schema's train_job defaults (how a train job runs) with `overrides`."""
    return {**schema_defaults("train_job"), **overrides}


def data_rows(n, seed=0, split="train"):
    rows = []
    for i, r in enumerate(generate(n, seed, split)):
        prompt = PROMPT_TEMPLATE.format(question=r["question"])
        rows.append({"id": f"synthetic-{split}-{i:05d}", "question": r["question"],
                     "answer": r["answer"], "prompt": prompt, "text": prompt + r["answer"]})
    return rows


def bpe_teacher(card, rows, folder, normalizer=None):
    """A copy of a tiny model with its own BPE tokenizer trained on `rows`: a teacher whose
    tokens differ from the student's byte-level ones, as across real model families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [r["text"] for r in rows],
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            special_tokens=["<bos>", "<pad>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                        pad_token="<pad>", eos_token="<eos>")
    shutil.copytree(card["dir"], folder)
    for stale in folder.glob("tokenizer*"):
        stale.unlink()
    tokenizer.save_pretrained(folder)
    return materialize(folder.name, {"path": str(folder)}, None)


def dims_of(card):
    return detect_dims(load_model(card), load_tokenizer(card["dir"]), card["name"])


@pytest.fixture(scope="module")
def world(tiny_card, tmp_path_factory):
    """A student (qwen3), a same-tokenizer teacher (llama) and a cross-tokenizer teacher
    (gemma3 with a BPE tokenizer), 16 train rows, and each teacher's train KV store."""
    root = tmp_path_factory.mktemp("train")
    rows = data_rows(16)
    student = tiny_card("qwen3")
    llama = tiny_card("llama", seed=1)
    gemma = bpe_teacher(tiny_card("gemma3_text", seed=2, vocab_size=400), rows,
                        root / "gemma_bpe")
    data = root / "train.parquet"
    write_split([{**r, "final": "0"} for r in rows], data)
    # Rows of another draw under their own ids, as prepare holds them out of the train split.
    validation_rows = [{**r, "id": f"synthetic-validation-{i:05d}"}
                       for i, r in enumerate(data_rows(4, seed=1))]
    validation = root / "validation.parquet"
    write_split([{**r, "final": "0"} for r in validation_rows], validation)
    data_info = {"source": "synthetic", "path": None,
                 "splits": {"train": {"rows": len(rows), "sha256": rows_sha256(rows)}}}
    teachers = []
    for card in (llama, gemma):
        manifest = build_store(card, rows, root / card["name"], max_length=MAX_LENGTH)
        teachers.append({"card": card, "dims": dims_of(card), "manifest": manifest})
    return {"root": root, "rows": rows, "student": student, "student_dims": dims_of(student),
            "teachers": teachers, "data": data, "data_info": data_info,
            "validation": validation, "validation_rows": validation_rows,
            "env": {"precision": "fp32", "recommended": {"micro_batch": 2}}}


def run(world, out, cfg, arm="kv", seed=0, teachers=None, job=None, log=lambda m: None,
        **kwargs):
    """Train in this process (`job`: the train_job settings, default the schema's); returns the
    output paths."""
    outputs = {"student": out / "student", "projector": out / "projector.safetensors",
               "metrics": out / "metrics.jsonl", "summary": out / "train.json"}
    train(cfg, job=job or job_config(), arm=arm, seed=seed, student_card=world["student"],
          student_dims=world["student_dims"], teachers=teachers or world["teachers"],
          rows=world["rows"], data_info=world["data_info"], env=world["env"],
          max_length=MAX_LENGTH, outputs=outputs, checkpoint_dir=out / "ckpt",
          tracker_dir=out / "tb", log=log, **kwargs)
    return outputs


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def student_weights(path):
    return load_file(str(path / "model.safetensors"))


# ---- batches and alignment --------------------------------------------------------------------

def test_labels_cover_exactly_the_answer_tokens(world):
    tokenizer = load_tokenizer(world["student"]["dir"])
    row = world["rows"][0]
    example = student_example(tokenizer, row, 1024)
    answer = example["labels"] != IGNORE_INDEX
    spans = example["char_spans"]
    assert answer.any() and not answer[0]
    assert torch.equal(example["labels"][answer], example["input_ids"][answer])
    # Byte-level tokens: the labelled tokens spell the answer exactly.
    assert "".join(row["text"][a:b] for a, b in spans[answer].tolist()) == row["answer"]
    # Truncation keeps the first tokens; the labels follow.
    short = student_example(tokenizer, row, 20)
    assert len(short["input_ids"]) == 20 and (short["labels"] == IGNORE_INDEX).all()


def test_straddling_token_is_an_answer_token():
    class Spans:
        """A tokenizer stand-in whose one token glues the prompt's last space to the answer."""

        def __call__(self, text, **kwargs):
            # "Q: ", "A:", " 4", "2": the prompt ends after the space of " 4".
            return {"input_ids": [5, 6, 7, 8], "offset_mapping": [(0, 3), (3, 5), (5, 7), (7, 8)]}

    row = {"id": "x", "prompt": "Q: A: ", "text": "Q: A: 42"}
    example = student_example(Spans(), row, 16)
    assert example["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]


def test_time_alignment_identity_spans_and_interpolation(world):
    tokenizer = load_tokenizer(world["student"]["dir"])
    student = student_example(tokenizer, world["rows"][1], MAX_LENGTH)
    same = KVStore(world["teachers"][0]["manifest"]).example(1)
    weights, valid = time_alignment(student, same, "auto")
    assert weights is None and valid.all()  # same tokens: the identity, no matrix at all
    other = KVStore(world["teachers"][1]["manifest"]).example(1)
    assert len(other["input_ids"]) < len(student["input_ids"])  # BPE merges bytes
    weights, valid = time_alignment(student, other, "auto")
    assert weights.shape == (len(student["input_ids"]), len(other["input_ids"]))
    torch.testing.assert_close(weights[valid].sum(1), torch.ones(int(valid.sum())))
    # Each student byte lies in exactly one teacher token: one weight of 1 per row.
    assert torch.equal(weights[valid].max(1).values, torch.ones(int(valid.sum())))
    forced, valid = time_alignment(student, other, "interpolate")
    assert valid.all() and forced[0, 0] == 1 and forced[-1, -1] == 1


def test_collate_pads_and_masks(world):
    tokenizer = load_tokenizer(world["student"]["dir"])
    stores = {t["card"]["name"]: KVStore(t["manifest"]) for t in world["teachers"]}
    students = [student_example(tokenizer, world["rows"][i], n) for i, n in ((0, 40), (1, 64))]
    positions = {name: [0, 1] for name in stores}
    layers = {name: [0, 3] for name in stores}
    batch = collate(students, teacher_inputs(stores, positions, [0, 1], layers),
                    tokenizer.pad_token_id, "auto")
    assert batch.input_ids.shape == (2, 64)
    assert batch.attention_mask[0].tolist() == [1] * 40 + [0] * 24
    assert (batch.labels[0, 40:] == IGNORE_INDEX).all()
    for name, targets in batch.teachers.items():
        assert not targets.mask[0, 40:].any() and targets.mask[1].any()
        k, v = targets.kv[3]
        assert k.shape[:2] == (2, 64) and k.dtype == torch.float32
        assert torch.equal(k[0, 40:], torch.zeros_like(k[0, 40:]))


def test_real_tokenizers_map_each_student_token_to_the_teacher_tokens_covering_it(real_cards):
    """SmolLM2 (the student's tokenizer) against Gemma3 on a GSM8K sentence."""
    text = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half "
            "as many clips in May. How many clips did Natalia sell altogether in April and May?\n"
            "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72")
    encoded = {}
    for name in ("smollm2", "gemma3"):
        tokens = load_tokenizer(real_cards[name]["dir"])(text, return_offsets_mapping=True)
        encoded[name] = {"input_ids": torch.tensor(tokens["input_ids"]),
                         "char_spans": torch.tensor(tokens["offset_mapping"])}
    student, teacher = encoded["smollm2"], encoded["gemma3"]
    assert not torch.equal(student["input_ids"], teacher["input_ids"][:len(student["input_ids"])])
    weights, valid = time_alignment(student, teacher, "auto")
    t_spans = teacher["char_spans"].tolist()
    for i, (start, end) in enumerate(student["char_spans"].tolist()):
        covering = [j for j, (a, b) in enumerate(t_spans) if a < end and start < b]
        assert valid[i] == bool(covering)
        assert torch.nonzero(weights[i]).flatten().tolist() == covering, text[start:end]
        overlap = torch.tensor([min(end, t_spans[j][1]) - max(start, t_spans[j][0])
                                for j in covering], dtype=torch.float32)
        torch.testing.assert_close(weights[i, covering], overlap / overlap.sum())
    assert valid.sum() == len(student["input_ids"])  # SmolLM2 adds no BOS: every token is text
    assert teacher["char_spans"][0].tolist() == [0, 0]  # Gemma's BOS: covers nothing


def test_example_order_depends_on_the_seed_only():
    first = example_order(10, seed=3, start=0, count=25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert example_order(10, seed=3, start=7, count=11) == first[7:18]
    assert example_order(10, seed=4, start=0, count=10) != first[:10]


# ---- the loss on the model's own KV -------------------------------------------------------------

@pytest.fixture(scope="module")
def self_teacher(world):
    """The student as its own teacher, stored in fp32: KV loss 0 and cosine 1 at the start."""
    card = world["student"]
    manifest = build_store(card, world["rows"], world["root"] / "self", max_length=MAX_LENGTH,
                           dtype="fp32")
    return {"card": card, "dims": world["student_dims"], "manifest": manifest}


def test_a_teacher_identical_to_the_student_gives_zero_kv_loss(world, self_teacher, tmp_path):
    cfg = train_config(steps=1, effective_batch=4, micro_batch=2)
    out = run(world, tmp_path, cfg, teachers=[self_teacher])
    first = metrics(out["metrics"])[0]
    name = self_teacher["card"]["name"]
    assert first[f"kv/{name}"] == pytest.approx(0, abs=1e-5)
    assert first[f"cos/{name}"] == pytest.approx(1, abs=1e-5)


def test_post_rope_capture_matches_the_cache(world):
    model = load_model(world["student"])
    tokenizer = load_tokenizer(world["student"]["dir"])
    students = [student_example(tokenizer, world["rows"][0], 48)]
    batch = collate(students, {}, tokenizer.pad_token_id, "auto")
    kv = student_forward(model, batch, "post_rope").kv
    expected = forward_kv(model, batch.input_ids, batch.attention_mask, range(4), "post_rope")
    for layer, (k, v) in enumerate(kv):
        torch.testing.assert_close(k, expected[layer][0])
        torch.testing.assert_close(v, expected[layer][1])


@pytest.mark.parametrize("architecture, overrides", [
    ("qwen3", {}), ("gemma3_text", {"final_logit_softcapping": 30.0})])
def test_the_lm_head_run_at_the_read_positions_only_gives_the_full_forwards_ce_and_logits(
        world, tiny_card, architecture, overrides):
    """student_forward's answer CE, the logits it keeps and their gradients are transformers'
    own full forward's (labels, num_items_in_batch), at those positions."""
    card = tiny_card(architecture, **overrides)
    tokenizer = load_tokenizer(world["student"]["dir"])
    students = [student_example(tokenizer, row, 48) for row in world["rows"][:3]]
    batch = collate(students, {}, tokenizer.pad_token_id, "auto")
    read = batch.attention_mask.bool() & (torch.arange(batch.input_ids.shape[1]) % 3 == 0)
    model = load_model(card)
    items = int(batch.labels[:, 1:].ne(IGNORE_INDEX).sum()) + 5  # as if other micro-batches
    ours = student_forward(model, batch, "pre_rope", items, [read])
    ours_loss = ours.ce + ours.logits[read].logsumexp(-1).mean()
    ours_grads = torch.autograd.grad(ours_loss, list(model.parameters()))
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 labels=batch.labels, num_items_in_batch=items)
    full_loss = full.loss + full.logits[read].logsumexp(-1).mean()
    full_grads = torch.autograd.grad(full_loss, list(model.parameters()))
    torch.testing.assert_close(ours.ce, full.loss)
    torch.testing.assert_close(ours.logits[read], full.logits[read])
    for ours_grad, full_grad in zip(ours_grads, full_grads):
        torch.testing.assert_close(ours_grad, full_grad, rtol=1e-4, atol=1e-6)
    assert ours.logits.values.shape[0] < batch.attention_mask.sum()  # prompts not run
    with pytest.raises(KavaError, match="not run on"):
        ours.logits[batch.attention_mask.bool()]


def test_logits_read_at_every_computed_position_are_the_computed_values_uncopied(world):
    tokenizer = load_tokenizer(world["student"]["dir"])
    students = [student_example(tokenizer, row, MAX_LENGTH) for row in world["rows"][:3]]
    batch = collate(students, {}, tokenizer.pad_token_id, "auto")
    # The logits at column t predict the token at t + 1.
    answer = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX).ne(
        IGNORE_INDEX)
    logits = student_forward(load_model(world["student"]), batch, "pre_rope", 1).logits
    assert logits[answer] is logits.values  # the CE of a ce or kv arm reads them all
    some = answer & (torch.arange(answer.shape[1]) % 2 == 0)
    assert 0 < int(some.sum()) < len(logits.values)
    assert torch.equal(logits[some], logits.values[logits.index[some]])


def test_cka_layer_map_of_the_student_against_itself_is_the_identity(world, self_teacher):
    stores = {"self": KVStore(self_teacher["manifest"])}
    maps = cka_layer_maps(load_model(world["student"]), load_tokenizer(world["student"]["dir"]),
                          stores, world["rows"][:4], MAX_LENGTH, "auto")
    assert maps["self"]["layer_map"] == [0, 1, 2, 3]
    scores = torch.tensor(maps["self"]["scores"], dtype=torch.float64)
    torch.testing.assert_close(scores.diagonal(), torch.ones(4, dtype=torch.float64))


# ---- the loop ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted kv run: the bit-identity reference for resume and signals."""
    cfg = train_config(steps=12, effective_batch=4, micro_batch=2, lr=3e-3, projector_lr=1e-2,
                       warmup_ratio=0.0)
    out = run(world, tmp_path_factory.mktemp("reference"), cfg, job=job_config(checkpoint_every=4))
    return cfg, out


def test_short_run_lowers_ce_and_kv_loss(world, reference):
    _, out = reference
    lines = metrics(out["metrics"])
    assert [line["step"] for line in lines] == list(range(1, 13))
    start, end = lines[:3], lines[-3:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    assert mean(end, "ce") < mean(start, "ce") - 0.3
    for teacher in world["teachers"]:
        name = teacher["card"]["name"]
        assert mean(end, f"kv/{name}") < mean(start, f"kv/{name}")
        assert mean(end, f"cos/{name}") > mean(start, f"cos/{name}")
        assert {f"cos/{name}/{layer}" for layer in range(4)} <= set(lines[0])
    for key in ("loss", "lr", "tokens_per_s", "elapsed", "grad_norm"):
        assert key in lines[0]
    # The outputs load on their own: plain transformers, and projectors from their file.
    AutoModelForCausalLM.from_pretrained(out["student"])
    load_tokenizer(out["student"])
    projectors = load_projectors(out["projector"])
    assert list(projectors) == [t["card"]["name"] for t in world["teachers"]]
    summary = json.loads(out["summary"].read_text())
    assert summary["data"] == world["data_info"] and summary["steps"] == 12
    assert set(summary["teachers"]) == set(projectors)
    assert not (out["student"].parent / "ckpt").exists()  # checkpoints go once published


def test_arms_share_init_and_data_order(world, tmp_path):
    firsts = {}
    for arm, seed, kv_weight in (("ce", 0, 0.0), ("kv", 0, 1.0), ("ce", 1, 0.0)):
        cfg = train_config(steps=1, effective_batch=4, micro_batch=4, kv_weight=kv_weight)
        out = run(world, tmp_path / f"{arm}{seed}", cfg, arm=arm, seed=seed)
        firsts[arm, seed] = metrics(out["metrics"])[0]
    # Step 1 is scored before any update: same seed, same examples, same student.
    assert firsts["ce", 0]["ce"] == firsts["kv", 0]["ce"]
    assert firsts["ce", 0]["tokens"] == firsts["kv", 0]["tokens"]
    assert firsts["ce", 1]["ce"] != firsts["ce", 0]["ce"]


def test_ce_arm_trains_its_projectors_without_touching_the_student(world, tmp_path):
    # A trainable projector in the teacher_to_student direction: the one that has something to fit.
    base = dict(steps=3, effective_batch=4, micro_batch=4, warmup_ratio=0.0, projector="linear",
                projector_direction="teacher_to_student")
    probe = run(world, tmp_path / "probe", train_config(kv_weight=0.0, **base), arm="ce")
    plain = run(world, tmp_path / "plain",
                train_config(kv_weight=0.0, probe_projector=False, **base), arm="ce")
    a, b = student_weights(probe["student"]), student_weights(plain["student"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    fitted, unfitted = metrics(probe["metrics"]), metrics(plain["metrics"])
    name = world["teachers"][0]["card"]["name"]
    assert fitted[-1][f"kv/{name}"] < fitted[0][f"kv/{name}"]
    assert fitted[-1][f"kv/{name}"] < unfitted[-1][f"kv/{name}"]
    assert unfitted[-1]["grad_norm_projector"] == 0


def test_other_arm_settings_train(world, tmp_path):
    """mlp projectors, std-normalised mse, learned teacher weights with an entropy term."""
    cfg = train_config(steps=3, effective_batch=4, micro_batch=4, projector="mlp",
                       projector_hidden=16, kv_loss="mse", kv_std_norm=True,
                       teacher_weighting="learned", teacher_entropy_weight=0.1,
                       teacher_weights={t["card"]["name"]: w for t, w in zip(world["teachers"], (1, 3))})
    out = run(world, tmp_path, cfg)
    lines = metrics(out["metrics"])
    names = [t["card"]["name"] for t in world["teachers"]]
    assert lines[0][f"w/{names[0]}"] == pytest.approx(0.25)
    assert lines[-1][f"w/{names[0]}"] + lines[-1][f"w/{names[1]}"] == pytest.approx(1)
    assert lines[-1][f"w/{names[0]}"] != lines[0][f"w/{names[0]}"]
    assert load_projectors(out["projector"])[names[0]].kind == "mlp"
    weights = json.loads(out["summary"].read_text())["teachers"]
    assert [len(weights[name]["weights"]) for name in names] == [4, 4]


def test_kv_cosine_of_a_trained_student(world, reference):
    _, out = reference
    student = AutoModelForCausalLM.from_pretrained(out["student"])
    stores = {t["card"]["name"]: KVStore(t["manifest"]) for t in world["teachers"]}
    cos = kv_cosine(student, load_projectors(out["projector"]), stores, world["rows"][:6],
                    load_tokenizer(out["student"]), MAX_LENGTH, batch_size=4, key_space="pre_rope",
                    time_alignment="auto")
    assert set(cos["per_teacher"]) == set(stores)
    assert all(len(values) == 4 for values in cos["per_layer"].values())
    assert -1 <= cos["overall"] <= 1 and cos["overall"] > 0.1


# ---- the stage: kill, signals, DDP --------------------------------------------------------------

def stage_command(world, out, cfg, seed=0, job=None):
    files = {}
    for key in ("student_card", "student_dims", "data_info", "env"):
        files[key] = world["root"] / f"{key}.json"
    write_json(files["student_card"], world["student"])
    write_json(files["student_dims"], world["student_dims"])
    write_json(files["data_info"], world["data_info"])
    write_json(files["env"], world["env"])
    teacher_files = []
    for t in world["teachers"]:
        card, dims = (world["root"] / f"{t['card']['name']}.{kind}.json" for kind in ("card", "dims"))
        write_json(card, t["card"])
        write_json(dims, t["dims"])
        teacher_files.append((card, dims, t["manifest"]))
    return [
        "-m", "stages.train", "--threads", "1", "--arm", "kv", "--seed", str(seed),
        "--train", json.dumps(cfg), "--job", json.dumps(job or job_config()),
        "--student-card", str(files["student_card"]),
        "--student-dims", str(files["student_dims"]),
        "--teacher-cards", *[str(c) for c, _, _ in teacher_files],
        "--teacher-dims", *[str(d) for _, d, _ in teacher_files],
        "--manifests", *[str(m) for _, _, m in teacher_files],
        "--data", str(world["data"]), "--validation-data", str(world["validation"]),
        "--data-info", str(files["data_info"]),
        "--env", str(files["env"]), "--max-length", str(MAX_LENGTH),
        "--checkpoint-dir", str(out / "ckpt"), "--tracker-dir", str(out / "tb"),
        "--student-out", str(out / "student"),
        "--projector-out", str(out / "projector.safetensors"),
        "--metrics-out", str(out / "metrics.jsonl"), "--summary-out", str(out / "train.json")]


def start_stage(args, launcher=(sys.executable,)):
    return subprocess.Popen([*launcher, *args], cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def long_config():
    # Enough steps that the run is still going when the test stops it.
    return train_config(steps=60, effective_batch=4, micro_batch=2, lr=3e-3, projector_lr=1e-2,
                        warmup_ratio=0.0)


def long_job():
    return job_config(checkpoint_every=4)


@pytest.fixture(scope="module")
def long_reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    done = subprocess.run([sys.executable,
                           *stage_command(world, out, long_config(), job=long_job())],
                          cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # The stage records how the rows were rendered beside the data they came from.
    assert json.loads((out / "train.json").read_text())["data"] == {**world["data_info"],
                                                                   "prompt_format": "plain"}
    return out


def assert_same_outputs(out, reference):
    a, b = student_weights(out / "student"), student_weights(reference / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Tensors, not bytes: safetensors writes its metadata in no fixed order.
    p, q = (load_file(str(d / "projector.safetensors")) for d in (out, reference))
    assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)
    drop = ("tokens_per_s", "elapsed")
    strip = [{k: v for k, v in line.items() if k not in drop} for line in metrics(out / "metrics.jsonl")]
    assert strip == [{k: v for k, v in line.items() if k not in drop}
                     for line in metrics(reference / "metrics.jsonl")]


def tensorboard_curves(folder):
    """{tag: [(step, value)]} of the scalars in a folder of TensorBoard event files, read the
    way TensorBoard reads them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_curves_match_metrics(out):
    """Every metrics.jsonl value is a scalar at its step in out/tb, each step once."""
    lines = metrics(out / "metrics.jsonl")
    curves = tensorboard_curves(out / "tb")
    assert set(curves) == {key for line in lines for key in line} - {"step"}
    for tag, points in curves.items():
        want = [(line["step"], line[tag]) for line in lines if tag in line]
        assert [step for step, _ in points] == [step for step, _ in want]
        # Event files hold float32.
        assert [value for _, value in points] == pytest.approx([v for _, v in want], rel=1e-6)


def test_kill_mid_run_then_rerun_gives_identical_weights(world, long_reference, tmp_path):
    args = stage_command(world, tmp_path, long_config(), job=long_job())
    process = start_stage(args)
    latest = tmp_path / "ckpt" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text().strip() >= "step-00000008", process)
    process.kill()
    process.wait()
    assert not (tmp_path / "train.json").exists()
    resumed = subprocess.run([sys.executable, *args], cwd=PROJECT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert json.loads((tmp_path / "train.json").read_text())["resumed_from_step"] >= 8
    assert_same_outputs(tmp_path, long_reference)
    # The curves of the killed attempt (unflushed, or past the checkpoint) are not doubled.
    assert_curves_match_metrics(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_nonzero_and_resumes(world, long_reference, tmp_path, sig):
    args = stage_command(world, tmp_path, long_config(), job=long_job())
    process = start_stage(args)
    live = tmp_path / "ckpt" / "metrics.live.jsonl"
    wait_for(lambda: live.exists() and len(live.read_text().splitlines()) >= 5, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert f"stopped by {sig.name}" in stderr and "rerun to resume" in stderr
    step = int((tmp_path / "ckpt" / "latest").read_text().strip().removeprefix("step-"))
    assert step >= 5  # saved at the step boundary after the signal, not a periodic one
    state = torch.load(tmp_path / "ckpt" / f"step-{step:08d}" / "state.pt", weights_only=True)
    assert state["step"] == step
    if sig == signal.SIGTERM:
        resumed = subprocess.run([sys.executable, *args], cwd=PROJECT, capture_output=True,
                                 text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert_same_outputs(tmp_path, long_reference)
        assert_curves_match_metrics(tmp_path)


def test_ddp_two_gloo_processes_equal_one(world, tmp_path):
    cfg = train_config(steps=3, effective_batch=4, micro_batch=1, lr=3e-3, projector_lr=1e-2,
                       warmup_ratio=0.0)
    one = subprocess.run([sys.executable, *stage_command(world, tmp_path / "one", cfg)],
                         cwd=PROJECT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                          *stage_command(world, tmp_path / "two", cfg)],
                         cwd=PROJECT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = student_weights(tmp_path / "one" / "student"), student_weights(tmp_path / "two" / "student")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    pa, pb = (load_file(str(tmp_path / d / "projector.safetensors")) for d in ("one", "two"))
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], atol=1e-5, rtol=1e-4)
    la, lb = (metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    for x, y in zip(la, lb):
        assert x["ce"] == pytest.approx(y["ce"], rel=1e-5) and x["tokens"] == y["tokens"]
    assert json.loads((tmp_path / "two" / "train.json").read_text())["processes"] == 2


# ---- bad inputs -------------------------------------------------------------------------------

def test_resume_against_changed_manifest_is_refused(world, tmp_path):
    # A NaN at step 2 (lr 1e30) leaves the checkpoint of step 1 behind, as a kill would.
    cfg = train_config(steps=4, effective_batch=4, micro_batch=2, lr=1e30, warmup_ratio=0.0)
    job = job_config(checkpoint_every=1)
    with pytest.raises(KavaError, match="at step 2"):
        run(world, tmp_path, cfg, job=job)
    assert (tmp_path / "ckpt" / "latest").exists()
    # The teacher's KV was precomputed again, differently (fp32 instead of bf16).
    teacher = world["teachers"][0]
    again = {**teacher, "manifest": build_store(teacher["card"], world["rows"], tmp_path / "again",
                                                max_length=MAX_LENGTH, dtype="fp32")}
    with pytest.raises(KavaError, match=rf"other KV shards of teacher {teacher['card']['name']} "
                                        r"\(its manifest changed since\); refusing to resume"):
        run(world, tmp_path, cfg, teachers=[again, world["teachers"][1]], job=job)


def test_nan_loss_stops_naming_step_and_arm_and_keeps_the_checkpoint(world, tmp_path):
    cfg = train_config(steps=6, effective_batch=4, micro_batch=2, lr=1e30, warmup_ratio=0.0)
    with pytest.raises(KavaError) as err:
        run(world, tmp_path, cfg, arm="kv_big_lr", job=job_config(checkpoint_every=1))
    message = str(err.value)
    assert "arm kv_big_lr seed 0" in message and "at step 2" in message and "nan" in message
    assert "last good checkpoint (step 1)" in message and "\n" not in message
    state = torch.load(tmp_path / "ckpt" / "step-00000001" / "state.pt", weights_only=True)
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(
        str(tmp_path / "ckpt" / "step-00000001" / "model.safetensors")).values())
    assert not (tmp_path / "train.json").exists()


def test_manifest_of_another_teacher_or_empty_is_refused(world, tmp_path):
    cfg = train_config(steps=1)
    wrong = [dict(world["teachers"][0]), world["teachers"][1]]
    wrong[0]["card"] = {**wrong[0]["card"], "weights_sha256": "f" * 64}
    with pytest.raises(KavaError, match="weights_sha256 is .* the config asks for 'fff"):
        run(world, tmp_path, cfg, teachers=wrong)
    empty = tmp_path / "empty.json"
    manifest = json.loads(world["teachers"][0]["manifest"].read_text())
    empty.write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(KavaError, match=f"manifest {empty}: lists no shards"):
        run(world, tmp_path, cfg, teachers=[{**world["teachers"][0], "manifest": empty}])


def test_student_layer_mapped_beyond_the_teacher_is_refused(world, tmp_path):
    name = world["teachers"][1]["card"]["name"]
    cfg = train_config(steps=1, layer_map="explicit",
                       explicit_layer_map={world["teachers"][0]["card"]["name"]: [0, 1, 2, 3],
                                           name: [0, 1, 2, 4]})
    with pytest.raises(KavaError, match=f"student layer 3 maps to teacher layer 4, but {name} "
                                        r"has layers 0\.\.3"):
        run(world, tmp_path, cfg)
    # Stored layers: precompute may keep only some; the map must stay inside them.
    with pytest.raises(KavaError, match=f"student layer 1 maps to teacher {name} layer 1, which "
                                        r"its KV store does not hold \(stored layers: \[0, 3\]\)"):
        resolve({"layer_map": "ratio"}, {"num_layers": 4, "source": {}}, {"model": name, "num_layers": 4},
                [0, 3])


def test_projectors_round_trip_with_their_shapes(tmp_path):
    projectors = {"a": KVProjector([0, 2, 5], (2, 256), (3, 64), kind="linear", hidden=512,
                                   direction="teacher_to_student"),
                  "b.x": KVProjector([1, 1, 3], (1, 32), (3, 64), kind="mlp", hidden=8,
                                     direction="teacher_to_student")}
    save_projectors(projectors, tmp_path / "p.safetensors")
    loaded = load_projectors(tmp_path / "p.safetensors")
    assert list(loaded) == ["a", "b.x"] and loaded["b.x"].kind == "mlp"
    for name, projector in projectors.items():
        for key, value in projector.state_dict().items():
            assert torch.equal(loaded[name].state_dict()[key], value)


def test_arm_overrides_and_run_wide_keys():
    config = {"train": {"lr": 1e-4}, "seeds": [0], "cka_layer_map": {"examples": 16},
              "arms": {"ce": {"kv_weight": 0}, "kv": {}}}
    arms = arm_configs(config)
    assert arms == {"ce": {"lr": 1e-4, "kv_weight": 0}, "kv": {"lr": 1e-4}}
    # A run-wide key, or one of how a job runs, is not an arm's: one line says where it lives.
    for key, home in (("seeds", "seeds"), ("checkpoint_every", "train_job.checkpoint_every")):
        config["arms"]["kv"] = {key: 1}
        with pytest.raises(KavaError) as err:
            arm_configs(config)
        assert str(err.value) == (f"config arms.kv: '{key}' was unexpected: an arm sets keys of "
                                  f"the train section only (set {home} for the whole run)")


# ---- the rule ---------------------------------------------------------------------------------

def smoke_dry_run(tmp_path, mutate=None, *extra):
    config = yaml.safe_load((PROJECT / "config" / "smoke.yaml").read_text())
    if mutate:
        mutate(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [shutil.which("snakemake", path=os.path.dirname(sys.executable)), "-n", "-p",
         "--profile", "profiles/local", "--configfile", str(path), *extra],
        cwd=PROJECT, capture_output=True, text=True,
        env={**os.environ, "KAVA_OUTPUT_PATH": str(tmp_path / "out")})


def test_an_arm_with_an_unknown_key_is_named(tmp_path):
    def bad(config):
        config["arms"] = {"ce": {"kv_weight": 0}, "kv": {"kv_wieght": 2}}

    result = smoke_dry_run(tmp_path, bad)
    assert result.returncode != 0
    assert "config arms.kv" in result.stdout + result.stderr
    assert "'kv_wieght' was unexpected" in result.stdout + result.stderr


def test_a_job_given_two_gpus_runs_under_torchrun(tmp_path):
    def three_arms(config, gpus=1):
        config["arms"] = {"ce": {"kv_weight": 0}, "kv": {}, "mse": {"kv_loss": "mse"}}
        config["train_job"] = {"gpus": gpus}

    # A two-GPU machine: the local profile's one GPU raised to two, as its comment says, and
    # train_job.gpus 2.
    result = smoke_dry_run(tmp_path, lambda config: three_arms(config, gpus=2),
                           "--resources", "gpu=2")
    assert result.returncode == 0, result.stdout[-3000:]
    commands = [line for line in result.stdout.splitlines() if "stages.train" in line]
    assert len(commands) == 3
    assert all("torchrun --standalone --nproc_per_node 2 -m stages.train" in line
               for line in commands)
    single = smoke_dry_run(tmp_path, three_arms)
    commands = [line for line in single.stdout.splitlines() if "stages.train" in line]
    assert len(commands) == 3 and all("python -m stages.train" in line for line in commands)


# ---- issue 8: targets that cannot be gamed, and the controls ------------------------------------

def test_layer_map_auto_on_a_derived_student(world, tmp_path):
    """A student pruned from the llama teacher maps to the layers it kept (and starts as an exact
    copy of the teacher's first layer); the cross-tokenizer teacher falls back to ratio."""
    llama = world["teachers"][0]
    keep = [0, 2, 3]
    card = materialize("derived", {"derive": {"base": llama["card"]["name"], "keep_layers": keep}},
                       tmp_path / "derived", llama["card"])
    derived_world = {**world, "student": card, "student_dims": dims_of(card)}
    out = run(derived_world, tmp_path / "run", train_config(steps=1, effective_batch=4))
    teachers = json.loads(out["summary"].read_text())["teachers"]
    name, other = llama["card"]["name"], world["teachers"][1]["card"]["name"]
    assert teachers[name]["layer_map"] == keep and "pruned" in teachers[name]["layer_map_reason"]
    assert teachers[name]["projector"] == "identity"
    assert teachers[other]["layer_map"] == [0, 2, 3] and "ratio" in teachers[other]["layer_map_reason"]
    assert teachers[other]["projector"] == "ridge"
    first = metrics(out["metrics"])[0]
    # Layer 0 is the teacher's layer 0 on the same tokens: same K and V (store in bf16).
    assert first[f"cos/{name}/0"] == pytest.approx(1, abs=1e-3)
    assert first[f"cos/{name}/2"] < 0.999  # deeper layers saw other inputs


def test_teacher_std_is_the_stores_own_spread(world):
    store = KVStore(world["teachers"][0]["manifest"])
    stds = teacher_kv_std(store, [0, 3], max_examples=5)
    for layer in (0, 3):
        for which, key in enumerate("kv"):
            values = torch.cat([store.example(i)[key][layer].double().flatten() for i in range(5)])
            assert stds[layer][which] == pytest.approx(float(values.std(correction=0)), rel=1e-6)


def test_std_normalised_loss_is_in_units_of_the_teachers_spread():
    torch.manual_seed(0)
    target = [(torch.randn(2, 5, 3, 4) * 3, torch.randn(2, 5, 3, 4) * 0.5)]
    pred = [(t + torch.randn_like(t), v + torch.randn_like(v)) for t, v in target]
    mask = torch.ones(2, 5, dtype=torch.bool)
    std = torch.tensor([[3.0, 0.5]])
    cfg = train_config(kv_std_norm=True, kv_loss="mse", kv_alpha=1.0, kv_beta=0.0)
    losses, _ = layer_scores(pred, target, mask, cfg, "mse", std)
    (pk, pv), (tk, tv) = pred[0], target[0]
    expected = (((pk - tk) / 3).square().mean() + ((pv - tv) / 0.5).square().mean()) / 2
    assert float(losses[0]) == pytest.approx(float(expected), rel=1e-5)


def test_ridge_projector_is_fitted_before_the_first_step(world, self_teacher, tmp_path):
    """Fitted in closed form to the student's own KV, the ridge map starts near the identity:
    the first step's KV loss is near 0, where an unfitted dense map would be far off."""
    cfg = train_config(steps=1, effective_batch=4, projector="ridge")
    first = metrics(run(world, tmp_path, cfg, teachers=[self_teacher])["metrics"])[0]
    name = self_teacher["card"]["name"]
    assert first[f"cos/{name}"] > 0.99 and first[f"kv/{name}"] < 0.05


def test_post_rope_keys_across_tokenizers_are_refused(world, tmp_path):
    gemma = world["teachers"][1]
    manifest = build_store(gemma["card"], world["rows"], tmp_path / "post", max_length=MAX_LENGTH,
                           key_space="post_rope")
    with pytest.raises(KavaError, match=r"tokenises the text differently.*post_rope"):
        run(world, tmp_path / "run", train_config(steps=1, effective_batch=4),
            teachers=[{**gemma, "manifest": manifest}])


def test_shuffled_arm_pairs_every_example_with_another_examples_kv(world):
    partner = derangement(16, seed=3)
    assert sorted(partner) == list(range(16)) and all(p != i for i, p in enumerate(partner))
    assert derangement(16, seed=4) != partner
    cfg = train_config(kv_target="shuffled")
    data = setup_data(cfg, 3, world["student"], world["student_dims"], world["teachers"],
                      world["rows"], MAX_LENGTH)
    assert data.partner == partner and set(data.alignment.values()) == {"position"}
    for name, store in data.stores.items():
        own = [store.index_of(row["id"]) for row in world["rows"]]
        assert data.positions[name] == [own[p] for p in partner]
        assert all(data.positions[name][i] != own[i] for i in range(16))


def test_warmup_does_not_waste_the_first_step():
    factors = [lr_factor(step, warmup=3, steps=10) for step in range(10)]
    assert factors[0] == pytest.approx(0.25) and factors[:4] == sorted(factors[:4])
    assert factors[3] == 1 and all(0 < f <= 1 for f in factors)


def test_gradient_agreement_is_logged_and_leaves_training_unchanged(world, tmp_path):
    """diagnose_every holds the last diagnose_examples rows out and logs align/<term> cosines;
    the trained student equals one trained on the other rows without the diagnostic."""
    cfg = dict(steps=2, effective_batch=4, micro_batch=4)
    diagnosed = run(world, tmp_path / "diag",
                    train_config(diagnose_every=1, diagnose_examples=4, **cfg))
    plain = run({**world, "rows": world["rows"][:12]}, tmp_path / "plain", train_config(**cfg))
    a, b = student_weights(diagnosed["student"]), student_weights(plain["student"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = metrics(diagnosed["metrics"])
    names = [t["card"]["name"] for t in world["teachers"]]
    for line in lines:
        for term in ["ce", *(f"kv/{n}" for n in names)]:
            assert -1 <= line[f"align/{term}"] <= 1
    assert lines[0]["align/ce"] > 0  # train CE and held-out CE agree early on
    assert json.loads(diagnosed["summary"].read_text())["examples"] == 12


def test_tokens_without_a_kv_target_are_a_fraction_per_teacher_and_warned(world, tiny_card,
                                                                           tmp_path):
    """A teacher whose tokenizer composes a decomposed accent (NFC, as Qwen2's does) covers no
    student token of the combining mark: train.json gives the fraction of the student's tokens
    left without a KV target, and the log warns once above train_job.max_tokens_without_target."""
    from tokenizers import normalizers

    rows = []
    for row in data_rows(4, seed=5):
        question = "Zoe\u0301 asks: " + row["question"]
        prompt = PROMPT_TEMPLATE.format(question=question)
        rows.append({**row, "question": question, "prompt": prompt, "text": prompt + row["answer"]})
    teacher = bpe_teacher(tiny_card("gemma3_text", seed=2, vocab_size=400), rows,
                          tmp_path / "gemma_nfc", normalizer=normalizers.NFC())
    teachers = [{"card": teacher, "dims": dims_of(teacher),
                 "manifest": build_store(teacher, rows, tmp_path / "store", max_length=MAX_LENGTH)},
                world["teachers"][0]]
    data_info = {"source": "synthetic", "path": None,
                 "splits": {"train": {"rows": len(rows), "sha256": rows_sha256(rows)}}}
    for limit, warnings in ((0.0, 1), (1.0, 0)):
        out, lines = tmp_path / f"run{limit}", []
        outputs = {"student": out / "student", "projector": out / "projector.safetensors",
                   "metrics": out / "metrics.jsonl", "summary": out / "train.json"}
        summary = train(train_config(steps=1, effective_batch=4, micro_batch=2),
                        job=job_config(max_tokens_without_target=limit), arm="kv", seed=0,
                        student_card=world["student"], student_dims=world["student_dims"],
                        teachers=teachers, rows=rows, data_info=data_info, env=world["env"],
                        max_length=MAX_LENGTH, outputs=outputs, checkpoint_dir=out / "ckpt",
                        tracker_dir=out / "tb", log=lines.append)
        lost = {name: t["tokens_without_target"] for name, t in summary["teachers"].items()}
        # The combining mark is 1 of the student's tokens per row at most: a small fraction.
        assert 0 < lost[teacher["name"]] < 0.1
        assert lost[world["teachers"][0]["card"]["name"]] == 0.0
        assert json.loads(outputs["summary"].read_text())["teachers"] == summary["teachers"]
        warned = [line for line in lines if line.startswith("warning: ")]
        assert warned == [f"warning: teacher {teacher['name']}: {lost[teacher['name']]:.1%} of "
                          f"the student's tokens have no teacher token covering them and get no "
                          f"KV target (above train_job.max_tokens_without_target 0.0%)"][:warnings]


def test_metrics_are_live_tensorboard_scalars(world, tmp_path):
    """train_job.tracker tensorboard (the default) writes each metrics line as scalars at its
    step into the job's tb folder; none writes nothing there."""
    cfg = train_config(steps=3, effective_batch=4, micro_batch=2, teacher_weighting="learned",
                       diagnose_every=2, diagnose_examples=4)
    run(world, tmp_path / "tb_run", cfg)
    assert_curves_match_metrics(tmp_path / "tb_run")
    assert "align/ce" in tensorboard_curves(tmp_path / "tb_run" / "tb")
    run(world, tmp_path / "quiet", cfg, job=job_config(tracker="none"))
    assert (tmp_path / "quiet" / "train.json").exists()
    assert not (tmp_path / "quiet" / "tb").exists()


def test_a_tracker_whose_package_is_missing_is_named_before_setup(world, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(KavaError, match=r"^train_job.tracker is wandb, but its package wandb is "
                                        r"not installed: pip install wandb"):
        run(world, tmp_path / "out", train_config(steps=1), job=job_config(tracker="wandb"))
    assert not (tmp_path / "out").exists()


# ---- logit KD and validation-selected steps ---------------------------------------------------

def with_logits(teacher, rows, folder):
    """`teacher` with a store of `rows` that holds its top-4 logits too."""
    vocab = load_model(teacher["card"]).config.vocab_size
    manifest = build_store(teacher["card"], rows, folder, max_length=MAX_LENGTH,
                           logits=logits_spec(4, "fp32", vocab))
    return {**teacher, "manifest": manifest}


@pytest.fixture(scope="module")
def logits_teacher(world, tmp_path_factory):
    """The same-tokenizer teacher with its top-4 logits stored too."""
    return with_logits(world["teachers"][0], world["rows"], tmp_path_factory.mktemp("logits"))


def test_kd_arm_trains_on_stored_logits_and_logs_kd(world, logits_teacher, tmp_path):
    teacher = logits_teacher
    cfg = train_config(steps=6, effective_batch=4, micro_batch=2, lr=3e-3, warmup_ratio=0.0,
                       kv_weight=0.0, ce_weight=0.0, kd_weight=1.0)
    lines = metrics(run(world, tmp_path, cfg, arm="kd", teachers=[teacher])["metrics"])
    kd = [line["kd"] for line in lines]
    assert all(math.isfinite(v) and v > 0 for v in kd)
    assert lines[0]["loss"] == pytest.approx(kd[0])  # ce_weight 0: the loss is the KD alone
    assert kd[-1] < kd[0]


def test_kd_arm_whose_teacher_store_has_no_logits_is_refused(world, tmp_path):
    cfg = train_config(steps=1, kd_weight=1.0)
    with pytest.raises(KavaError, match="holds none"):
        run(world, tmp_path, cfg, teachers=world["teachers"][:1])


def test_kd_on_tokens_other_than_the_students_is_refused(world, logits_teacher, tmp_path):
    # kv_target shuffled reads another example's store entry: its logits are of other tokens.
    cfg = train_config(steps=1, kd_weight=1.0, kv_target="shuffled")
    with pytest.raises(KavaError, match="stored tokens of example .* differ from the student's"):
        run(world, tmp_path, cfg, teachers=[logits_teacher])


def test_uld_pairs_each_student_token_with_the_teacher_token_ending_on_the_same_character():
    # "abcd": the student's tokens are bytes; the teacher has a BOS covering nothing, then "ab".
    student = {"input_ids": torch.arange(4), "char_spans": torch.tensor([[0, 1], [1, 2], [2, 3],
                                                                         [3, 4]])}
    teacher = {"input_ids": torch.arange(4), "char_spans": torch.tensor([[0, 0], [0, 2], [2, 3],
                                                                         [3, 4]])}
    index, mask = kd_pairs(student, teacher, "uld")
    # "a": no teacher token has read exactly it; "ab" and "abc" pair; "abcd" is the last token.
    assert mask.tolist() == [False, True, True, False]
    assert index[mask].tolist() == [1, 2]
    # A teacher token ending inside the student token but before its end is not its pair.
    wide = {"input_ids": torch.arange(2), "char_spans": torch.tensor([[0, 3], [3, 4]])}
    split = {"input_ids": torch.arange(2), "char_spans": torch.tensor([[0, 2], [2, 4]])}
    assert kd_pairs(wide, split, "uld")[1].tolist() == [False, False]
    assert kd_pairs(student, student, "kl")[1].tolist() == [True, True, True, False]


@pytest.fixture(scope="module")
def uld_teacher(world, tmp_path_factory):
    """The teacher with another tokenizer (gemma3 with its own BPE) with its top-4 logits."""
    return with_logits(world["teachers"][1], world["rows"], tmp_path_factory.mktemp("uld"))


def test_kd_from_a_teacher_with_another_tokenizer_trains_with_uld(world, uld_teacher, tmp_path):
    cfg = train_config(steps=6, effective_batch=4, micro_batch=2, lr=3e-3, warmup_ratio=0.0,
                       kv_weight=0.0, ce_weight=0.0, kd_weight=1.0)
    out = run(world, tmp_path, cfg, arm="kd", teachers=[uld_teacher])
    kd = [line["kd"] for line in metrics(out["metrics"])]
    assert all(math.isfinite(v) and 0 < v <= 2 for v in kd)  # an L1 between distributions
    assert kd[-1] < kd[0]
    summary = json.loads(out["summary"].read_text())
    assert summary["teachers"][uld_teacher["card"]["name"]]["kd_loss"] == "uld"  # auto
    # Distilled: every student token but the last that ends where some teacher token (not the
    # zero-width BOS) ends.
    trained = setup(cfg, seed=0, student_card=world["student"], student_dims=world["student_dims"],
                    teachers=[uld_teacher], rows=world["rows"], max_length=MAX_LENGTH,
                    env=world["env"], device=torch.device("cpu"))
    store = KVStore(uld_teacher["manifest"])
    expected = []
    for i, student in enumerate(trained.data.students):
        spans = store.example(store.index_of(student["id"]))["char_spans"].tolist()
        teacher_ends = {end for start, end in spans if end > start}
        expected.append(sum(end in teacher_ends for _, end in student["char_spans"][:-1].tolist()))
    assert trained.data.kd_valid[uld_teacher["card"]["name"]] == expected
    assert 0 < sum(expected) < sum(len(s["input_ids"]) - 1 for s in trained.data.students)


def test_kl_kd_from_a_teacher_with_another_tokenizer_is_refused(world, uld_teacher, tmp_path):
    cfg = train_config(steps=1, kd_weight=1.0, kd_loss="kl")
    with pytest.raises(KavaError) as refused:
        run(world, tmp_path, cfg, teachers=[uld_teacher])
    assert str(refused.value) == (
        f"train.kd_loss kl distils teacher {uld_teacher['card']['name']}, whose tokenizer is not "
        f"the student's: its stored ids index another vocabulary; use kd_loss uld (or auto) for "
        f"it")


def test_early_stopping_publishes_the_lowest_validation_step(world, tmp_path):
    # The LR warms up to one far too high: the validation NLL dips, then later steps are worse.
    cfg = train_config(steps=6, effective_batch=4, micro_batch=2, lr=0.3, warmup_ratio=1.0,
                       kv_weight=0.0, eval_every=1)
    out = run(world, tmp_path, cfg, arm="ce", teachers=world["teachers"][:1],
              validation_rows=world["validation_rows"])
    summary = json.loads(out["summary"].read_text())
    curve = {point["step"]: point["nll"] for point in summary["validation"]}
    assert list(curve) == list(range(1, 7))
    assert summary["best_step"] == min(curve, key=curve.get) < 6
    assert curve[6] > summary["best_nll"]  # the construction holds: the last step is worse
    assert [line.get("validation_nll") for line in metrics(out["metrics"])] == list(curve.values())
    published = AutoModelForCausalLM.from_pretrained(out["student"], torch_dtype=torch.float32)
    tokenizer = load_tokenizer(str(out["student"]))
    autocast, _ = mixed_precision(summary["precision"], torch.device("cpu"))
    assert validation_nll(published, tokenizer, world["validation_rows"], 2,
                          autocast) == pytest.approx(summary["best_nll"], rel=1e-5)


def test_validation_rows_never_reach_training(world):
    kwargs = dict(seed=0, student_card=world["student"], student_dims=world["student_dims"],
                  teachers=world["teachers"][:1], max_length=MAX_LENGTH, env=world["env"],
                  device=torch.device("cpu"))
    validation_ids = {r["id"] for r in world["validation_rows"]}
    trained = setup(train_config(effective_batch=4, micro_batch=2), rows=world["rows"],
                    validation_rows=world["validation_rows"], **kwargs)
    seen = {trained.data.students[i]["id"] for step in range(1, 9)
            for i in example_order(len(trained.data.students), 0, (step - 1) * 4, 4)}
    assert seen == {r["id"] for r in world["rows"]} and not seen & validation_ids
    with pytest.raises(KavaError, match="is also a train row"):
        setup(train_config(), rows=world["rows"], validation_rows=world["rows"][:1], **kwargs)
