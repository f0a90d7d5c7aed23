"""teacher_weighting validation: each teacher's weight follows how its loss gradient aligns with
the answer-CE gradient on the validation rows, and a teacher that points away is switched off."""

import json
import math
import shutil

import pytest
import torch
import yaml
from snakemake.utils import validate

from conftest import PROJECT
from kava.batching import collate, pad_id, student_example
from kava.config import SCHEMA, cross_checked
from kava.distill import validation_weights
from kava.errors import KavaError
from kava.losses import TeacherMixture
from kava.models import load_model, load_tokenizer, materialize
from kava.report.load import load_facts
from kava.report.render import _teacher_weighting_rows
from kava.train import resume, run_identity, save_checkpoint, setup
from test_kvstore import build_store
from test_train import (MAX_LENGTH, data_rows, dims_of, job_config, metrics, run,
                        student_weights, train_config)

# ---- the weight function ----------------------------------------------------------------------


def test_a_teacher_whose_gradient_opposes_the_validation_gradient_gets_weight_0():
    reference = torch.tensor([1.0, 0.0, 0.0])
    along, against, barely = (torch.tensor([2.0, 1.0, 0.0]), torch.tensor([-1.0, 0.5, 0.0]),
                              torch.tensor([0.1, 0.0, 3.0]))
    weights, cosines = validation_weights([along, against, barely], reference)
    torch.testing.assert_close(cosines, torch.tensor([2 / math.sqrt(5), -1 / math.sqrt(1.25),
                                                      0.1 / math.sqrt(9.01)]))
    # The best-aligned teacher counts as it would alone: a weaker one does not dilute it.
    assert weights[1] == 0 and weights[0].item() == 1.0
    # ∝ cosine: the aligned teacher outweighs the nearly orthogonal one by their cosines' ratio.
    assert (weights[0] / weights[2]).item() == pytest.approx((cosines[0] / cosines[2]).item())
    # None points along it: all off, and the arm trains on CE alone.
    weights, _ = validation_weights([-along, against], reference)
    assert torch.equal(weights, torch.zeros(2))


def test_validation_mixture_takes_weights_of_0_including_all_of_them():
    mixture = TeacherMixture(3, 2, mode="validation", weights=[1.0, 3.0])
    torch.testing.assert_close(mixture.weights(), torch.tensor([[1 / 3, 1.0]]).expand(3, 2))
    losses = torch.tensor([[1.0, 2.0]]).expand(3, 2)
    mixture.set_weights(torch.tensor([0.0, 1.0]))
    assert mixture(losses).item() == 2.0
    mixture.set_weights(torch.zeros(2))
    assert mixture(losses).item() == 0.0 and torch.equal(mixture.weights(), torch.zeros(3, 2))


# ---- the config -------------------------------------------------------------------------------

def smoke_config(**data):
    config = yaml.safe_load((PROJECT / "config" / "smoke.yaml").read_text())
    config["data"] = {**config.get("data", {}), **data}
    config["arms"] = {"ce": {"kv_weight": 0}, "kv_val": {"teacher_weighting": "validation"}}
    config["report"] = {**config.get("report", {}), "contrasts": []}
    validate(config, str(SCHEMA))  # fills the schema's defaults, as the workflow does
    return config


def test_validation_weighting_without_validation_rows_is_refused_at_parse_time():
    with pytest.raises(KavaError, match=r"^config arms.kv_val: teacher_weighting validation "
                                        r"weighs the teachers on the validation rows, but "
                                        r"data.validation_size is 0$"):
        cross_checked(smoke_config(validation_size=0))
    assert cross_checked(smoke_config(validation_size=4))["arms"]["kv_val"][
        "teacher_weighting"] == "validation"


# ---- a run with a helpful and an adversarial teacher ------------------------------------------

def moved_copy(card, rows, folder, sign):
    """A copy of `card`'s model moved a short step along (+1, raising it) or against (−1) the
    gradient of its answer CE on `rows`: its KV is the student's KV moved where the answers get
    less (+1) or more (−1) likely, so pulling the student toward it opposes (or follows) that
    CE's gradient to first order."""
    model = load_model(card, torch.float32)
    tokenizer = load_tokenizer(card["dir"])
    batch = collate([student_example(tokenizer, r, MAX_LENGTH) for r in rows], {},
                    pad_id(tokenizer), "auto")
    params = list(model.parameters())
    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 labels=batch.labels).loss
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(sign * 0.05 * g / norm)
    shutil.copytree(card["dir"], folder)
    model.save_pretrained(folder)
    return materialize(folder.name, {"path": str(folder)}, None)


@pytest.fixture(scope="module")
def toy(tiny_card, tmp_path_factory):
    """A student, a teacher whose KV pulls it along the validation CE gradient ("helpful") and
    one whose KV pulls it against ("adversarial"), on 4 train rows; the validation rows are the
    same texts under other ids, so both gradients are of one CE."""
    root = tmp_path_factory.mktemp("weighting")
    rows = data_rows(4)
    student = tiny_card("qwen3")
    teachers = {}
    for name, sign in (("helpful", -1), ("adversarial", 1)):
        card = moved_copy(student, rows, root / name, sign)
        teachers[name] = {"card": card, "dims": dims_of(card),
                          "manifest": build_store(card, rows, root / f"{name}_store",
                                                  max_length=MAX_LENGTH, dtype="fp32")}
    return {"rows": rows, "student": student, "student_dims": dims_of(student),
            "teachers": teachers,
            "validation_rows": [{**r, "id": f"validation-{i}"} for i, r in enumerate(rows)],
            "data_info": {"source": "synthetic", "path": None,
                          "splits": {"train": {"rows": 4, "sha256": "toy"}}},
            "env": {"precision": "fp32", "recommended": {"micro_batch": 2}}}


def toy_run(toy, out, teachers, **overrides):
    cfg = train_config(steps=3, effective_batch=4, micro_batch=2, lr=3e-3, warmup_ratio=0.0,
                       **overrides)
    return run({**toy, "teachers": None}, out, cfg, teachers=[toy["teachers"][t] for t in teachers],
               validation_rows=toy["validation_rows"])


def test_validation_weighting_switches_off_the_adversarial_teacher(toy, tmp_path):
    out = toy_run(toy, tmp_path / "val", ["helpful", "adversarial"],
                  teacher_weighting="validation", teacher_weighting_every=2)
    summary = json.loads(out["summary"].read_text())
    updates = summary["teacher_weighting"]
    assert [u["step"] for u in updates] == [1, 3]  # step 1, then every 2
    for update in updates:
        helpful, adversarial = update["teachers"]["helpful"], update["teachers"]["adversarial"]
        assert adversarial["cosine"] < 0 < helpful["cosine"]
        assert adversarial["weight"] == 0 and helpful["weight"] == 1
    lines = metrics(out["metrics"])
    assert [line["w/adversarial"] for line in lines] == [0.0] * 3
    # Switched off, the adversarial teacher changes nothing: the student trains as with the
    # helpful teacher alone.
    alone = toy_run(toy, tmp_path / "alone", ["helpful"])
    a, b = student_weights(out["student"]), student_weights(alone["student"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # Fixed uniform weights keep the adversarial teacher's pull: another student.
    uniform = student_weights(toy_run(toy, tmp_path / "uniform",
                                      ["helpful", "adversarial"])["student"])
    assert any(not torch.allclose(a[key], uniform[key], atol=1e-6) for key in a)


def test_the_weights_survive_a_checkpoint(toy, tmp_path):
    kwargs = dict(seed=0, student_card=toy["student"], student_dims=toy["student_dims"],
                  teachers=list(toy["teachers"].values()), rows=toy["rows"],
                  max_length=MAX_LENGTH, env=toy["env"], device=torch.device("cpu"),
                  validation_rows=toy["validation_rows"])
    cfg = train_config(effective_batch=4, micro_batch=2, teacher_weighting="validation")
    first = setup(cfg, **kwargs)
    first.teacher_weighting.append({"step": 1, "teachers": {"helpful": {"cosine": 0.5,
                                                                        "weight": 1.0}}})
    first.distiller.teacher_mixture.set_weights(torch.tensor([1.0, 0.0]))
    identity = run_identity(first, "kv", toy["student"], toy["data_info"])
    (tmp_path / "metrics.jsonl").write_text("")
    save_checkpoint(tmp_path / "ckpt", 1, first, identity, 0.0, tmp_path / "metrics.jsonl")
    second = setup(cfg, **kwargs)
    assert resume(tmp_path / "ckpt", identity, second, tmp_path / "m.jsonl", lambda m: None)[0] == 1
    assert second.teacher_weighting == first.teacher_weighting
    assert torch.equal(second.distiller.teacher_mixture.weights()[0], torch.tensor([1.0, 0.0]))


def test_validation_weighting_needs_validation_rows_in_the_library_too(toy, tmp_path):
    with pytest.raises(KavaError, match="teacher_weighting validation weighs the teachers on the "
                                        "validation rows, but there are none"):
        run({**toy, "teachers": None}, tmp_path, train_config(steps=1,
                                                              teacher_weighting="validation"),
            teachers=[toy["teachers"]["helpful"]])


# ---- the report -------------------------------------------------------------------------------

def test_the_report_gives_each_teachers_weights_and_steps_switched_off(tmp_path):
    summary = {"steps": 10, "teacher_weighting": [
        {"step": 1, "teachers": {"a": {"cosine": 0.2, "weight": 1.0},
                                 "b": {"cosine": -0.1, "weight": 0.0}}},
        {"step": 5, "teachers": {"a": {"cosine": 0.1, "weight": 0.25},
                                 "b": {"cosine": 0.3, "weight": 0.75}}}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(summary))
    facts = load_facts(train_infos={"kv_both": {"0": path}})
    rows = _teacher_weighting_rows(facts["teacher_weighting"])
    # Steps 1-4 at the first weights, 5-10 at the second.
    assert rows == [["kv_both", 0, "a", "0.550", "0.250", "0%", "+0.150", "1: 1.00, 5: 0.25"],
                    ["kv_both", 0, "b", "0.450", "0.750", "40%", "+0.100", "1: 0.00, 5: 0.75"]]
