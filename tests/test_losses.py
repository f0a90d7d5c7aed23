import functools
import math

import pytest
import torch

from kava import losses
from kava.config import schema_defaults
from kava.errors import KavaError
from kava.losses import (KV_LOSSES, TeacherMixture, kd_kind, kd_loss, masked_cosine,
                         uld_loss, with_tail)

# Mercator's alpha and beta as a run gets them: the schema's train defaults.
TRAIN = schema_defaults("train")
kv_loss = functools.partial(losses.kv_loss, alpha=TRAIN["kv_alpha"], beta=TRAIN["kv_beta"])


def _batch(seed=0, shape=(3, 7, 3, 64)):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[1, 0] = False   # an unaligned student token
    mask[2, 2:4] = False
    return pred, target, mask


@pytest.mark.parametrize("kind", KV_LOSSES)
@pytest.mark.parametrize("normalise", [False, True])
def test_identical_inputs_give_zero(kind, normalise):
    _, target, mask = _batch()
    std = torch.tensor(1.7) if normalise else None  # a fixed scale, as the teacher's std is
    assert kv_loss(target.clone(), target, mask, kind, std=std).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kind", KV_LOSSES)
def test_masked_positions_never_reach_the_loss_or_gradient(kind):
    pred, target, mask = _batch()
    clean = kv_loss(pred, target, mask, kind)
    poisoned_pred, poisoned_target = pred.clone(), target.clone()
    poisoned_pred[~mask] = float("nan")
    poisoned_target[~mask] = float("inf")
    poisoned_pred.requires_grad_(True)
    loss = kv_loss(poisoned_pred, poisoned_target, mask, kind)
    assert torch.equal(loss, clean)
    loss.backward()
    assert torch.isfinite(poisoned_pred.grad).all()
    assert poisoned_pred.grad[~mask].abs().sum() == 0 and poisoned_pred.grad[mask].abs().sum() > 0
    assert torch.equal(masked_cosine(poisoned_pred, poisoned_target, mask),
                       masked_cosine(pred, target, mask))


@pytest.mark.parametrize("kind", KV_LOSSES)
def test_all_masked_gives_zero_and_zero_gradient(kind):
    pred, target, _ = _batch()
    pred.requires_grad_(True)
    loss = kv_loss(pred, target, torch.zeros(3, 7, dtype=torch.bool), kind)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_mercator_hand_values():
    target = torch.randn(1, 4, 2, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    # Same direction, twice the norm: only the log-norm term, beta·(log 2)².
    assert kv_loss(2 * target, target, mask, "mercator", beta=0.5).item() == pytest.approx(
        0.5 * math.log(2) ** 2, rel=1e-5)
    # Opposite direction, same norm: alpha·2.
    opposite = kv_loss(-target, target, mask, "mercator", alpha=3.0)
    assert opposite.item() == pytest.approx(6.0, rel=1e-5)
    # Orthogonal, same norm: alpha·1.
    a = torch.tensor([1.0, 0.0]).expand(1, 4, 2, 2)
    b = torch.tensor([0.0, 1.0]).expand(1, 4, 2, 2)
    assert kv_loss(a, b, mask, "mercator").item() == pytest.approx(1.0, rel=1e-6)


def test_mercator_gradient_is_finite_at_zero_vectors():
    pred, target, mask = _batch()
    pred[0, 0] = 0.0
    target[0, 1] = 0.0
    pred[1, 2] = 0.0
    target[1, 2] = 0.0
    pred.requires_grad_(True)
    loss = kv_loss(pred, target, mask, "mercator")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_mse_and_smooth_l1_hand_values_and_std():
    target = torch.randn(2, 3, 1, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert kv_loss(target + 1, target, mask, "mse").item() == pytest.approx(1.0, rel=1e-6)
    assert kv_loss(target + 1, target, mask, "mse", std=2.0).item() == pytest.approx(0.25, rel=1e-6)
    assert kv_loss(target + 0.5, target, mask, "smooth_l1").item() == pytest.approx(0.125, rel=1e-6)
    assert kv_loss(target + 3, target, mask, "smooth_l1").item() == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("std", [2.0, torch.tensor(2.0)])
def test_std_divides_both_sides_by_a_fixed_scale(std):
    """std is a fixed scale (the teacher's per-layer K or V std from its store): the loss is that
    of pred/std against target/std, and mercator, being scale-free, ignores it."""
    pred, target, mask = _batch()
    for kind in ("mse", "smooth_l1"):
        torch.testing.assert_close(kv_loss(pred, target, mask, kind, std=std),
                                   kv_loss(pred / 2, target / 2, mask, kind))
    assert kv_loss(pred, target, mask, "mse", std=std).item() == pytest.approx(
        kv_loss(pred, target, mask, "mse").item() / 4, rel=1e-6)
    torch.testing.assert_close(kv_loss(pred, target, mask, "mercator", std=std),
                               kv_loss(pred, target, mask, "mercator"))


def test_masked_cosine():
    pred, target, mask = _batch()
    assert masked_cosine(target, target, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert masked_cosine(-target, target, mask).item() == pytest.approx(-1.0, abs=1e-6)
    expected = torch.nn.functional.cosine_similarity(pred[mask], target[mask], dim=-1).mean()
    torch.testing.assert_close(masked_cosine(pred, target, mask), expected)


def test_bf16_inputs_are_compared_in_float32():
    pred, target, mask = _batch()
    loss = kv_loss(pred.bfloat16(), target.bfloat16(), mask, "mercator")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kv_loss(pred.bfloat16().float(), target.bfloat16().float(),
                                             mask, "mercator"))


def test_bad_kind_and_shapes_are_refused():
    pred, target, mask = _batch()
    with pytest.raises(KavaError, match="unknown kv loss 'cosine'"):
        kv_loss(pred, target, mask, "cosine")
    with pytest.raises(KavaError, match=r"pred \(3, 7, 3, 64\), target \(3, 7, 1, 64\)"):
        kv_loss(pred, target[:, :, :1], mask, "mse")
    with pytest.raises(KavaError, match=r"mask \(3, 6\)"):
        kv_loss(pred, target, mask[:, :6], "mse")


# ---- teacher weights --------------------------------------------------------------------------

def test_fixed_weights_are_normalised_and_constant():
    uniform = TeacherMixture(4, 2, mode="fixed", weights=None)
    assert torch.equal(uniform.weights(), torch.full((4, 2), 0.5))
    assert list(uniform.parameters()) == []
    given = TeacherMixture(4, 2, mode="fixed", weights=[1.0, 3.0])
    torch.testing.assert_close(given.weights(), torch.tensor([[0.25, 0.75]]).expand(4, 2))
    losses = torch.tensor([[1.0, 2.0]]).expand(4, 2)
    assert given(losses).item() == pytest.approx(1.75)


def test_learned_weights_sum_to_one_per_layer_while_training():
    weights = TeacherMixture(5, 3, mode="learned", weights=[1.0, 1.0, 2.0])
    torch.testing.assert_close(weights.weights()[0], torch.tensor([0.25, 0.25, 0.5]))
    optimiser = torch.optim.SGD(weights.parameters(), lr=1.0)
    # Teacher 0 is the easiest to match in every layer: unregularised, the weights move to it.
    kv_losses = torch.tensor([[0.1, 1.0, 2.0]]).expand(5, 3)
    for _ in range(20):
        optimiser.zero_grad()
        weights(kv_losses).backward()
        optimiser.step()
    w = weights.weights()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(5))
    assert (w[:, 0] > 0.5).all()


def test_entropy_is_largest_for_uniform_weights_and_pulls_towards_them():
    assert TeacherMixture(3, 4, mode="learned", weights=None).entropy().item() \
        == pytest.approx(math.log(4))
    skewed = TeacherMixture(3, 2, mode="learned", weights=[9.0, 1.0])
    assert skewed.entropy().item() < math.log(2)
    (-skewed.entropy()).backward()  # maximising entropy
    assert (skewed.logits.grad[:, 0] > 0).all() and (skewed.logits.grad[:, 1] < 0).all()


def test_bad_teacher_weights_are_refused():
    with pytest.raises(KavaError, match="must be 2 positive numbers"):
        TeacherMixture(4, 2, mode="fixed", weights=[1.0, 0.0])
    with pytest.raises(KavaError, match="must be 3 positive numbers"):
        TeacherMixture(4, 3, mode="fixed", weights=[1.0, 1.0])
    with pytest.raises(KavaError, match="unknown teacher weighting 'greedy'"):
        TeacherMixture(4, 2, mode="greedy", weights=None)
    with pytest.raises(KavaError, match=r"expected \[n_layers, n_teachers\] = \[4, 2\]"):
        TeacherMixture(4, 2, mode="fixed", weights=None)(torch.ones(2, 4))


# ---- logit KD from a stored top-k ----------------------------------------------------------------

def test_kd_loss_is_the_hand_computed_kl_over_top_k_and_tail():
    # One position, vocabulary 4, teacher top-2 = tokens 2 and 0.
    student_logits = torch.tensor([[[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    q = [0.6, 0.3]          # teacher p(token 2), p(token 0); tail 0.1
    top_ids = torch.tensor([[[2, 0], [1, 3]]], dtype=torch.int32)
    top_logp = torch.tensor([[[math.log(0.6), math.log(0.3)], [-5.0, -5.0]]])
    tail_logp = torch.tensor([[math.log(0.1), 0.0]])
    mask = torch.tensor([[True, False]])  # the second position (garbage) is masked out
    z = [1.0, 0.0, 2.0, -1.0]
    norm = sum(math.exp(x) for x in z)
    p = [math.exp(2.0) / norm, math.exp(1.0) / norm]
    p.append(1 - sum(p))
    teacher = [*q, 0.1]
    expected = sum(t * math.log(t / s) for t, s in zip(teacher, p))
    loss = kd_loss(student_logits, top_ids, top_logp, tail_logp, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # τ = 2: both sides' buckets tempered alike, times τ².
    tempered = [x ** 0.5 for x in teacher]
    tempered = [x / sum(tempered) for x in tempered]
    student_t = [x ** 0.5 for x in p]
    student_t = [x / sum(student_t) for x in student_t]
    expected_t = 4 * sum(t * math.log(t / s) for t, s in zip(tempered, student_t))
    assert kd_loss(student_logits, top_ids, top_logp, tail_logp, mask,
                   temperature=2.0).item() == pytest.approx(expected_t, rel=1e-4)


def test_kd_loss_is_zero_at_the_teacher_and_its_gradient_finite():
    logits = torch.randn(2, 3, 50)
    logp = logits.log_softmax(-1)
    top = logp.topk(8, dim=-1)
    buckets = with_tail(top.values)
    student = logits.clone().requires_grad_()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = kd_loss(student, top.indices, buckets[..., :-1], buckets[..., -1], mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    (loss + kd_loss(student * 2, top.indices, buckets[..., :-1], buckets[..., -1], mask)).backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 2].abs().sum() == 0
    empty = kd_loss(student, top.indices, buckets[..., :-1], buckets[..., -1],
                    torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0


# ---- ULD across tokenizers -------------------------------------------------------------------

def test_uld_loss_is_the_hand_computed_l1_between_sorted_top_k_and_tail():
    # Student vocabulary 4, probabilities [0.1, 0.2, 0.3, 0.4]: sorted top-2 0.4, 0.3, tail 0.3.
    student_logits = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [9.0, 0.0, 0.0, 0.0]]]).log()
    # Teacher top-2 stored in the wrong order on purpose (0.1 then 0.7): ULD sorts it; tail 0.2.
    top_logp = torch.tensor([[[0.1, 0.7], [0.5, 0.5]]]).log()
    tail_logp = torch.tensor([[0.2, 0.0]]).log()
    mask = torch.tensor([[True, False]])  # the second position (garbage) is masked out
    # Sorted: teacher (0.7, 0.1 | 0.2), student (0.4, 0.3 | 0.3).
    expected = abs(0.7 - 0.4) + abs(0.1 - 0.3) + abs(0.2 - 0.3)
    assert uld_loss(student_logits, top_logp, tail_logp, mask).item() == pytest.approx(
        expected, rel=1e-5)
    # τ = 2: each side's buckets become p^(1/2), renormalised; no τ² factor.
    def temper(p):
        return [x ** 0.5 / sum(y ** 0.5 for y in p) for x in p]

    expected_t = sum(abs(t - s) for t, s in zip(temper([0.7, 0.1, 0.2]), temper([0.4, 0.3, 0.3])))
    assert uld_loss(student_logits, top_logp, tail_logp, mask, temperature=2.0).item() == \
        pytest.approx(expected_t, rel=1e-5)


def test_uld_loss_ignores_token_identity_and_is_zero_for_the_same_shape():
    logits = torch.randn(2, 3, 50)
    top = logits.log_softmax(-1).topk(8, dim=-1)
    buckets = with_tail(top.values)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # A student that puts the same probabilities on other tokens (a permuted vocabulary).
    student = logits[..., torch.randperm(50)].clone().requires_grad_()
    loss = uld_loss(student, buckets[..., :-1], buckets[..., -1], mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    (loss + uld_loss(student * 2, buckets[..., :-1], buckets[..., -1], mask)).backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 2].abs().sum() == 0
    assert student.grad.abs().sum() > 0
    assert uld_loss(student, buckets[..., :-1], buckets[..., -1],
                    torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_kd_kind_auto_is_kl_for_the_students_tokenizer_and_uld_otherwise():
    assert kd_kind("auto", True, "t") == "kl"
    assert kd_kind("auto", False, "t") == "uld"
    assert kd_kind("uld", True, "t") == kd_kind("uld", False, "t") == "uld"
    assert kd_kind("kl", True, "t") == "kl"
    with pytest.raises(KavaError, match=r"^train.kd_loss kl distils teacher gemma, whose "
                                        r"tokenizer is not the student's: its stored ids index "
                                        r"another vocabulary; use kd_loss uld \(or auto\) for it$"):
        kd_kind("kl", False, "gemma")
    with pytest.raises(KavaError, match="unknown kd loss 'js'"):
        kd_kind("js", True, "t")
