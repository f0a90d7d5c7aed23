"""The control arms of kv (train.kv_target self and token_mean, train.kv_exclude_layers) and
config/ablation.yaml, on the tiny models and stores of test_train."""

import json
from collections import defaultdict

import pytest
import torch
import yaml

from conftest import PROJECT
from kava.batching import collate, pad_id, teacher_inputs
from kava.capture import student_forward
from kava.distill import kv_layers
from kava.errors import KavaError
from kava.kvstore import KVStore
from kava.models import load_model
from kava.train import setup, setup_data, step_batches
from test_train import MAX_LENGTH, metrics, smoke_dry_run, train_config, world  # noqa: F401
from test_train import run as train_run


def control_data(world, teacher, **cfg):
    return setup_data(train_config(**cfg), 0, world["student"], world["student_dims"],
                      [teacher], world["rows"], MAX_LENGTH)


def test_self_targets_are_the_initial_students_own_kv(world):
    # The cross-tokenizer teacher, of another KV shape: the targets take the student's place.
    teacher = world["teachers"][1]
    name = teacher["card"]["name"]
    data = control_data(world, teacher, kv_target="self")
    n_layers = world["student_dims"]["num_layers"]
    assert data.layer_maps[name] == list(range(n_layers)) and data.kv_lost[name] == 0
    student = load_model(world["student"])
    for i in (0, 7, 15):
        alone = collate([data.students[i]], {}, pad_id(data.tokenizer), "auto")
        with torch.no_grad():
            own = student_forward(student, alone, data.key_space).kv
        # As the loss reads them: a collated batch of the targets, aligned to the student.
        batch = collate([data.students[i]],
                        teacher_inputs(data.stores, data.positions, [i], data.used_layers),
                        pad_id(data.tokenizer), data.alignment)
        targets = batch.teachers[name]
        assert bool(targets.mask.all())
        for layer in range(n_layers):
            for which in (0, 1):
                torch.testing.assert_close(targets.kv[layer][which], own[layer][which],
                                           rtol=1e-5, atol=1e-5)


def test_a_self_arm_starts_at_zero_kv_loss_through_the_identity(world, tmp_path):
    teacher = world["teachers"][1]
    name = teacher["card"]["name"]
    out = train_run(world, tmp_path, train_config(steps=1, effective_batch=4, micro_batch=2,
                                                  kv_target="self"), teachers=[teacher])
    first = metrics(out["metrics"])[0]
    assert first[f"kv/{name}"] == pytest.approx(0, abs=1e-5)
    assert first[f"cos/{name}"] == pytest.approx(1, abs=1e-5)
    summary = json.loads(out["summary"].read_text())
    assert summary["teachers"][name]["projector"] == "identity"


def test_token_mean_target_is_the_mean_over_each_token_ids_occurrences(world):
    teacher = world["teachers"][0]
    name = teacher["card"]["name"]
    data = control_data(world, teacher, kv_target="token_mean")
    store = KVStore(teacher["manifest"])
    occurrences = defaultdict(list)  # token id -> [(example, position)] over the whole store
    for i in range(len(store)):
        for t, token in enumerate(store.example(i)["input_ids"].tolist()):
            occurrences[token].append((i, t))
    example = data.stores[name].example(3)
    ids = example["input_ids"].tolist()
    assert ids == store.example(3)["input_ids"].tolist()
    assert max(len(occurrences[token]) for token in ids) > 1  # some means are over several
    for layer in data.used_layers[name]:
        for kind in "kv":
            for t, token in enumerate(ids):
                by_hand = torch.stack([store.example(i)[kind][layer][p].double()
                                       for i, p in occurrences[token]]).mean(dim=0)
                torch.testing.assert_close(example[kind][layer][t].double(), by_hand,
                                           rtol=1e-5, atol=1e-6)


def step_loss(world, teacher, **cfg):
    """(loss, per-layer KV terms) of the first step's one micro-batch, kv_weight 1, no CE."""
    run = setup(train_config(ce_weight=0.0, effective_batch=4, micro_batch=4, **cfg), seed=0,
                 student_card=world["student"], student_dims=world["student_dims"],
                 teachers=[teacher], rows=world["rows"], max_length=MAX_LENGTH,
                 env=world["env"], device=torch.device("cpu"))
    batch = step_batches(run, 1)
    loss, stats = run.model(batch.micro_batches[0], batch.ce_items, batch.kv_items, 1)
    return float(loss.detach()), stats["kv"][:, 0]


def test_excluding_layers_removes_exactly_their_terms(world):
    teacher = world["teachers"][0]
    full, terms = step_loss(world, teacher)
    excluded, same_terms = step_loss(world, teacher, kv_exclude_layers=[0, 2])
    torch.testing.assert_close(same_terms, terms)  # every layer is still measured
    n = len(terms)
    assert excluded == pytest.approx((full * n - float(terms[0] + terms[2])) / (n - 2), rel=1e-5)
    assert excluded != pytest.approx(full, rel=1e-3)


def test_kv_exclude_layers_must_name_layers_and_leave_one():
    with pytest.raises(KavaError, match=r"names layer 4, but the student has 4 layers \(0-3\)"):
        kv_layers([1, 4], 4)
    with pytest.raises(KavaError, match="excludes all 2 student layers"):
        kv_layers([0, 1], 2)
    assert kv_layers([0], 3) == [1, 2]


def test_a_layer_beyond_the_student_is_refused_when_the_workflow_is_parsed(tmp_path):
    def beyond(config):
        config["arms"] = {"ce": {"kv_weight": 0}, "kv": {"kv_exclude_layers": [0, 3]}}

    result = smoke_dry_run(tmp_path, beyond)
    assert result.returncode != 0
    assert ("kava: error: config arms.kv: kv_exclude_layers names layer 3, but student student "
            "has 3 layers (0-2)") in result.stdout + result.stderr


@pytest.mark.parametrize("arm, refusal", [
    ({"kv_target": "self", "kd_weight": 1.0},
     "config arms.bad: kv_target self is a control of the KV loss and serves no teacher logits; "
     "set kd_weight 0"),
    ({"layer_map": "minilm", "kv_exclude_layers": [0]},
     "config arms.bad: layer_map minilm maps only the student's last layer; kv_exclude_layers "
     "would leave out that or nothing")])
def test_controls_that_cannot_combine_are_refused_when_the_workflow_is_parsed(tmp_path, arm,
                                                                             refusal):
    def bad(config):
        config["arms"] = {"ce": {"kv_weight": 0}, "bad": arm}

    result = smoke_dry_run(tmp_path, bad)
    assert result.returncode != 0
    assert f"kava: error: {refusal}" in result.stdout + result.stderr


def test_the_ablation_contrasts_every_control_with_kv():
    config = yaml.safe_load((PROJECT / "config" / "ablation.yaml").read_text())
    contrasts = config["report"]["contrasts"]
    assert all(arm == "kv" for arm, _ in contrasts)
    assert {control for _, control in contrasts} == set(config["arms"]) - {"kv", "ce"}
    assert len(config["arms"]) * len(config["seeds"]) <= 27  # the 60-minute budget
