"""The projector-free relation KV loss (MiniLMv2, arXiv 2012.15828): the loss itself, the
positions two tokenisations share, the minilm layer map, its settings, and a train run against
a teacher of another shape and tokenizer."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kava.align import boundary_alignment, shared_boundaries
from kava.distill import build_projectors
from kava.errors import KavaError
from kava.kvfit import kv_cosine
from kava.kvstore import KVStore
from kava.layer_maps import layers_to_store, minilm_layer_map, probe_layer_maps, resolve
from kava.losses import kv_loss, relation_loss
from kava.models import load_tokenizer
from kava.projector import load_projectors
# world is a fixture: imported, pytest finds it here.
from test_train import MAX_LENGTH, job_config, metrics, run, train_config, world  # noqa: F401


def joined(b, t, width, seed=0):
    return torch.randn(b, t, width, generator=torch.Generator().manual_seed(seed))


def mask_of(b, t, invalid=()):
    mask = torch.ones(b, t, dtype=torch.bool)
    for i, j in invalid:
        mask[i, j] = False
    return mask


# ---- the loss -----------------------------------------------------------------------------------

def test_identical_inputs_give_zero():
    k = joined(2, 7, 16).unflatten(-1, (2, 8))
    mask = mask_of(2, 7, [(0, 0), (1, 5), (1, 6)])
    assert relation_loss(k, k.clone(), mask, heads=4) == 0
    # And a different teacher gives more than 0, so the zero above can fail.
    other = joined(2, 7, 16, seed=1).unflatten(-1, (2, 8))
    assert relation_loss(k, other, mask, heads=4) > 1e-3


def test_invariant_to_an_orthogonal_map_within_each_relation_head():
    """q·k is unchanged by an orthogonal map of both vectors, so each relation head's matrix is
    unchanged by an orthogonal map of its own slice. With R = KV heads that is a per-KV-head
    orthogonal map. A map mixing relation heads changes the loss (R > 1) unless R = 1."""
    student = joined(2, 6, 16)
    teacher = joined(2, 6, 24, seed=1).unflatten(-1, (3, 8))
    mask = mask_of(2, 6, [(1, 4), (1, 5)])
    heads = 2
    blocks = [torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(s)))[0]
              for s in (2, 3)]
    rotated = student @ torch.block_diag(*blocks)
    base = relation_loss(student.unflatten(-1, (2, 8)), teacher, mask, heads)
    torch.testing.assert_close(relation_loss(rotated.unflatten(-1, (2, 8)), teacher, mask, heads),
                               base)
    # Also on the teacher side, whose relation heads (12 channels) cut across its KV heads.
    teacher_blocks = [torch.linalg.qr(torch.randn(12, 12,
                                                  generator=torch.Generator().manual_seed(s)))[0]
                      for s in (5, 6)]
    teacher_rotated = (teacher.flatten(-2) @ torch.block_diag(*teacher_blocks)).unflatten(
        -1, (3, 8))
    torch.testing.assert_close(
        relation_loss(student.unflatten(-1, (2, 8)), teacher_rotated, mask, heads), base)
    full = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(4)))[0]
    mixed = (student @ full).unflatten(-1, (2, 8))
    assert not torch.allclose(relation_loss(mixed, teacher, mask, heads), base, atol=1e-4)
    torch.testing.assert_close(relation_loss(mixed, teacher, mask, 1),
                               relation_loss(student.unflatten(-1, (2, 8)), teacher, mask, 1))


def test_invariant_to_the_kv_head_count_of_one_joined_width():
    student = joined(2, 5, 16)
    teacher = joined(2, 5, 32, seed=1).unflatten(-1, (1, 32))
    mask = mask_of(2, 5, [(0, 2)])
    two = relation_loss(student.unflatten(-1, (2, 8)), teacher, mask, heads=4)
    four = relation_loss(student.unflatten(-1, (4, 4)), teacher, mask, heads=4)
    assert two > 0
    torch.testing.assert_close(two, four)


def test_matches_a_hand_computation_on_a_two_head_toy():
    """Student: one KV head of 4 channels (relation heads: channels 0-1, 2-3); teacher: two KV
    heads of 2. Three tokens, the middle one unaligned; temperature 2."""
    s = [[1.0, 0.0, 0.5, -1.0], [9.0, 9.0, 9.0, 9.0], [0.0, 2.0, 1.0, 1.0]]
    u = [[[1.0, 1.0], [0.0, 1.0]], [[7.0, 7.0], [7.0, 7.0]], [[-1.0, 2.0], [2.0, 0.0]]]
    mask = torch.tensor([[True, False, True]])
    temperature = 2.0
    scale = 1 / (math.sqrt(2) * temperature)  # width 4 / R 2 = 2 channels per relation head

    def row_softmax(vectors, i):
        # Row i over the valid tokens j ≤ i: tokens 0 and 2 (token 1 is unaligned).
        keys = [j for j in (0, 2) if j <= i]
        logits = [scale * sum(a * b for a, b in zip(vectors[i], vectors[j])) for j in keys]
        z = sum(math.exp(x) for x in logits)
        return [math.exp(x) / z for x in logits]

    total = 0.0
    for head in (0, 1):
        student_vectors = [token[2 * head:2 * head + 2] for token in s]
        teacher_vectors = [token[head] for token in u]
        for i in (0, 2):
            p, q = row_softmax(teacher_vectors, i), row_softmax(student_vectors, i)
            total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    expected = total / 4  # 2 valid rows x 2 relation heads

    loss = relation_loss(torch.tensor([s]).unflatten(-1, (1, 4)), torch.tensor([u]), mask,
                         heads=2, temperature=temperature)
    assert expected > 1e-3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # kv_loss dispatches to it, ignoring std (a fixed scale the relation must not see).
    via_kv_loss = kv_loss(torch.tensor([s]).unflatten(-1, (1, 4)), torch.tensor([u]), mask,
                          "relation", alpha=1.0, beta=0.0, std=3.0, relation_heads=2,
                          relation_temperature=temperature)
    assert via_kv_loss.item() == pytest.approx(expected, rel=1e-5)


def test_pad_values_and_empty_batches_stay_out():
    student = joined(1, 4, 8).unflatten(-1, (2, 4)).requires_grad_()
    teacher = joined(1, 4, 8, seed=1).unflatten(-1, (1, 8)).clone()
    mask = torch.tensor([[False, True, True, False]])
    teacher[0, 0] = float("nan")
    teacher[0, 3] = float("inf")
    loss = relation_loss(student, teacher, mask, heads=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert student.grad[0, 0].abs().sum() == 0 and student.grad[0, 3].abs().sum() == 0
    none = relation_loss(student, teacher, torch.zeros(1, 4, dtype=torch.bool), heads=2)
    assert none.item() == 0


def test_relation_heads_must_divide_both_widths():
    with pytest.raises(KavaError, match=r"relation_heads 3 .* teacher \(32\)"):
        relation_loss(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 1, 32),
                      torch.ones(1, 2, dtype=torch.bool), heads=3)


# ---- positions both tokenisations share ---------------------------------------------------------

def test_shared_boundaries_on_toy_spans():
    # Student: BOS, "ab", a byte-split "é" (two tokens, same span), "c"; teacher "a", "bé", "c".
    student = [[0, 0], [0, 2], [2, 3], [2, 3], [3, 4]]
    teacher = [[0, 1], [1, 3], [3, 4]]
    s, t = shared_boundaries(student, teacher)
    # "ab" ends at 2, where no teacher token ends; the last byte token of "é" reads "bé".
    assert s.tolist() == [3, 4] and t.tolist() == [1, 2]
    weights, valid = boundary_alignment(student, teacher)
    assert valid.tolist() == [False, False, False, True, True]
    assert weights.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_shared_boundaries_of_smollm2_and_gemma_on_cjk_and_emoji(real_cards):
    text = "Tom 买了 3 个苹果 🍎, 共 12 元。"
    spans = {name: load_tokenizer(real_cards[name]["dir"])(text, return_offsets_mapping=True)
             ["offset_mapping"] for name in ("smollm2", "gemma3")}
    s, t = shared_boundaries(spans["smollm2"], spans["gemma3"])
    ends = [spans["smollm2"][i][1] for i in s]
    # Checked by hand: Gemma keeps "买了", "苹果" and " 个" whole and splits " " from "🍎";
    # SmolLM2 splits CJK characters and the emoji into bytes and glues " 🍎". Shared ends: after
    # "Tom", " ", "了", " ", "3", "个", "果", "🍎", ",", "共", " ", "1", "2", "元", "。".
    assert ends == [3, 4, 6, 7, 8, 10, 12, 14, 15, 17, 18, 19, 20, 22, 23]
    assert [spans["gemma3"][j][1] for j in t] == ends
    assert [text[spans["gemma3"][j][0]:spans["gemma3"][j][1]] for j in t][2:8] == [
        "买了", " ", "3", " 个", "苹果", "🍎"]
    # A byte-split character is read at its last byte token, which has seen all of it.
    for i in s.tolist():
        student = spans["smollm2"]
        assert i + 1 == len(student) or student[i + 1][1] != student[i][1]
    assert 0 not in t.tolist()  # Gemma's BOS holds no text


# ---- layer map and settings ---------------------------------------------------------------------

def test_minilm_maps_the_last_student_layer_to_an_upper_middle_teacher_layer():
    assert minilm_layer_map(4, 24) == [None, None, None, 18]  # layer 19 of 24, as MiniLMv2
    assert minilm_layer_map(15, 18)[-1] == 13 and minilm_layer_map(3, 30)[-1] == 23
    assert minilm_layer_map(1, 1) == [0]
    card = {"num_layers": 3, "source": {}}
    mapping, why = resolve({"layer_map": "minilm"}, card, {"model": "t", "num_layers": 10},
                           [7])
    assert mapping == [None, None, 7] and "upper-middle layer 7" in why
    with pytest.raises(KavaError, match="teacher t layer 7"):
        resolve({"layer_map": "minilm"}, card, {"model": "t", "num_layers": 10}, [9])
    assert layers_to_store("mapped", 10, card, "t", {"a": {"layer_map": "minilm"}}) == [7]
    # The probe scores every student layer, against the one layer the store holds.
    info = {"config": {"kv_target": "teacher"}, "teachers": {"t": {"layer_map": [None, None, 7]}}}
    assert probe_layer_maps(info, 3, {"t": {"num_layers": 10}}, card) == {"t": [7, 7, 7]}


def test_relation_takes_no_projector_and_checks_widths_per_teacher():
    cfg = {**train_config(kv_loss="relation", relation_heads=4)}
    maps = {"gemma": [0, 1]}
    projectors = build_projectors(maps, {"gemma": (1, 256)}, (3, 64), cfg)
    assert projectors["gemma"].kind == "none" and not list(projectors["gemma"].parameters())
    with pytest.raises(KavaError, match="train.projector ridge with kv_loss relation"):
        build_projectors(maps, {"gemma": (1, 256)}, (3, 64), {**cfg, "projector": "ridge"})
    with pytest.raises(KavaError, match=r"relation_heads 5 .*the student \(192\), "
                                        r"teacher gemma \(256\)"):
        build_projectors(maps, {"gemma": (1, 256)}, (3, 64), {**cfg, "relation_heads": 5})


# ---- a run against a teacher of another shape and tokenizer -------------------------------------

@pytest.mark.parametrize("layer_map", ["auto", "minilm"])
def test_relation_run_against_teachers_of_other_shapes(world, tmp_path, layer_map):  # noqa: F811
    gemma = world["teachers"][1]
    assert (gemma["dims"]["num_kv_heads"], gemma["dims"]["head_dim"]) != (
        world["student_dims"]["num_kv_heads"], world["student_dims"]["head_dim"])
    cfg = train_config(steps=2, effective_batch=4, micro_batch=2, kv_loss="relation",
                       layer_map=layer_map)
    logged = []
    out = run(world, tmp_path, cfg, job=job_config(max_tokens_without_target=0.0),
              log=logged.append)
    lines = metrics(out["metrics"])
    summary = json.loads(out["summary"].read_text())
    assert set(summary["time_alignment"].values()) == {"boundary"}
    for teacher in world["teachers"]:
        name = teacher["card"]["name"]
        assert all(math.isfinite(line[f"kv/{name}"]) and line[f"kv/{name}"] > 0
                   for line in lines)
        assert summary["teachers"][name]["projector"] == "none"
        mapping = summary["teachers"][name]["layer_map"]
        assert (mapping[:-1] == [None] * 3) == (layer_map == "minilm")
    # Across tokenizers only shared boundaries count: some student tokens get no target.
    assert summary["teachers"][gemma["card"]["name"]]["tokens_without_target"] > 0
    # ...by design, so the log says so without the uncovered-token warning of other losses.
    assert not [line for line in logged if line.startswith("warning: ")]
    assert any(line.startswith(f"teacher {gemma['card']['name']}: ") and
               "stay out of the relation loss" in line for line in logged)
    projectors = load_projectors(out["projector"])
    assert all(p.kind == "none" for p in projectors.values())
    # The evaluation's held-out cosine runs too: nan where there is nothing to compare (other
    # shapes, or a layer the map leaves out), never an error.
    stores = {t["card"]["name"]: KVStore(t["manifest"]) for t in world["teachers"]}
    student = AutoModelForCausalLM.from_pretrained(out["student"])
    cos = kv_cosine(student, projectors, stores, world["rows"][:4], load_tokenizer(out["student"]),
                    MAX_LENGTH, batch_size=4, key_space="pre_rope", time_alignment="auto")
    assert all(len(values) == 4 and all(math.isnan(v) for v in values)
               for values in cos["per_layer"].values())


def test_each_teacher_gets_its_own_kv_loss_in_one_arm(world, tmp_path):  # noqa: F811
    """teacher_kv_loss: the same-tokenizer teacher by mse through its projector, the teacher of
    another shape and tokenizer by relation at shared boundaries; each term at the first step
    (before any update) equals that teacher's term in the arm of its loss alone."""
    llama, gemma = (t["card"]["name"] for t in world["teachers"])
    common = dict(steps=1, effective_batch=4, micro_batch=2)
    first = {}
    for arm, cfg in {"mse": train_config(**common, kv_loss="mse"),
                     "relation": train_config(**common, kv_loss="relation"),
                     "mixed": train_config(**common, kv_loss="mse",
                                           teacher_kv_loss={gemma: "relation"})}.items():
        out = run(world, tmp_path / arm, cfg, arm=arm)
        first[arm] = metrics(out["metrics"])[0]
        summary = json.loads(out["summary"].read_text())
        if arm == "mixed":
            assert summary["time_alignment"] == {llama: "auto", gemma: "boundary"}
            assert summary["teachers"][gemma]["projector"] == "none"
            assert summary["teachers"][llama]["projector"] != "none"
    assert first["mixed"][f"kv/{llama}"] == pytest.approx(first["mse"][f"kv/{llama}"], rel=1e-5)
    assert first["mixed"][f"kv/{gemma}"] == pytest.approx(first["relation"][f"kv/{gemma}"],
                                                         rel=1e-5)
    assert first["mixed"][f"kv/{gemma}"] != pytest.approx(first["mse"][f"kv/{gemma}"], rel=1e-2)


def test_teacher_kv_loss_names_a_teacher_of_the_arm():
    from kava.config import cross_checked, schema_defaults

    config = {"models": {"a": {}, "b": {}, "s": {}}, "teachers": ["a", "b"], "student": "s",
              "train": schema_defaults("train"), "data": schema_defaults("data"),
              "eval": schema_defaults("eval"), "report": schema_defaults("report"),
              "arms": {"mixed": {"teachers": ["a"], "teacher_kv_loss": {"b": "relation"}}}}
    with pytest.raises(KavaError, match=r"arms.mixed: train.teacher_kv_loss names 'b', which "
                                        r"is not a teacher this arm learns from \(a\)"):
        cross_checked(config)
    config["arms"]["mixed"]["teachers"] = None
    assert cross_checked(config)["arms"]["mixed"]["teacher_kv_loss"] == {"b": "relation"}


def test_relation_refuses_another_time_alignment(world, tmp_path):  # noqa: F811
    cfg = train_config(steps=1, effective_batch=4, micro_batch=2, kv_loss="relation",
                       time_alignment="causal")
    with pytest.raises(KavaError, match="time_alignment causal with kv_loss relation"):
        run(world, tmp_path, cfg)
