import math

import pytest
import torch

from kava.align import (auto_layer_map, causal_span_alignment, cka_layer_map, explicit_layer_map,
                        interpolate_alignment, linear_cka, position_alignment, pruned_from,
                        ratio_layer_map, span_alignment)
from kava.errors import KavaError


# ---- layer maps -------------------------------------------------------------------------------

def test_auto_layer_map_follows_the_pruned_students_kept_layers():
    card = {"source": {"derive": {"base": "smollm2", "keep_layers": [0, 3, 6, 9, 29]}}}
    assert pruned_from(card) == ("smollm2", [0, 3, 6, 9, 29])
    mapping, why = auto_layer_map(5, 30, "smollm2", pruned_from(card))
    assert mapping == [0, 3, 6, 9, 29] and "pruned" in why
    mapping, why = auto_layer_map(5, 18, "gemma3", pruned_from(card))
    assert mapping == ratio_layer_map(5, 18) and why.startswith("ratio")
    assert pruned_from({"source": {"gguf": {}}}) is None


def test_ratio_map_18_to_20_spreads_evenly():
    layer_map = ratio_layer_map(18, 20)
    assert layer_map == [math.floor(i * 19 / 17 + 0.5) for i in range(18)]
    assert layer_map[0] == 0 and layer_map[-1] == 19
    assert all(a < b for a, b in zip(layer_map, layer_map[1:]))


def test_ratio_map_15_to_30_rounds_half_up():
    # i*29/14 hits exactly 14.5 at i=7.
    assert ratio_layer_map(15, 30) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]


def test_ratio_map_deeper_student_repeats_every_teacher_layer():
    layer_map = ratio_layer_map(30, 18)
    assert len(layer_map) == 30 and layer_map[0] == 0 and layer_map[-1] == 17
    assert all(a <= b for a, b in zip(layer_map, layer_map[1:]))
    assert set(layer_map) == set(range(18))


def test_ratio_map_edge_cases():
    assert ratio_layer_map(7, 7) == list(range(7))
    assert ratio_layer_map(1, 20) == [19]
    assert ratio_layer_map(4, 1) == [0, 0, 0, 0]
    with pytest.raises(KavaError, match="at least one layer"):
        ratio_layer_map(0, 20)


def test_explicit_map_accepts_a_valid_map():
    assert explicit_layer_map([0, 5, 5, 17], 4, 18, "gemma3-270m") == [0, 5, 5, 17]


def test_explicit_map_out_of_range_names_the_layers_and_teacher():
    with pytest.raises(KavaError) as err:
        explicit_layer_map([0, 1, 2, 18], 4, 18, "gemma3-270m")
    message = str(err.value)
    assert "student layer 3" in message and "teacher layer 18" in message
    assert "gemma3-270m" in message and "\n" not in message
    with pytest.raises(KavaError, match="student layer 0 maps to teacher layer -1"):
        explicit_layer_map([-1, 1], 2, 18, "gemma3-270m")


def test_explicit_map_wrong_length_or_type():
    with pytest.raises(KavaError, match="3 entries, the student has 4 layers"):
        explicit_layer_map([0, 1, 2], 4, 18, "gemma3-270m")
    with pytest.raises(KavaError, match="student layer 1 maps to '3'"):
        explicit_layer_map([0, "3"], 2, 18, "gemma3-270m")


# ---- CKA --------------------------------------------------------------------------------------

def _orthogonal(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return q


def test_cka_of_a_representation_with_itself_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g) + 5.0  # a large mean, removed by centring
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=g)
    y = x[:, :20] @ torch.randn(20, 24, generator=g) + 0.5 * torch.randn(300, 24, generator=g)
    base = linear_cka(x, y).item()
    assert 0.2 < base < 0.99
    rotated = linear_cka(x @ _orthogonal(32, g) * 3.7, y @ _orthogonal(24, g)).item()
    assert rotated == pytest.approx(base, abs=1e-6)  # the rotation itself is float32


def test_cka_of_independent_features_is_small():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    assert linear_cka(x, y).item() < 0.05


def test_cka_constant_features_and_row_mismatch():
    x = torch.randn(50, 8)
    assert linear_cka(x, torch.ones(50, 8)).item() == 0.0
    with pytest.raises(KavaError, match="50 and 49 rows"):
        linear_cka(x, x[:49])


def test_cka_layer_map_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(400, d, generator=g) for d in (24, 32, 40, 24, 32)]
    planted = [3, 0, 4, 1]
    student = [teacher[t] @ _orthogonal(teacher[t].shape[1], g)[:, :16] * 2.0
               + 0.1 * torch.randn(400, 16, generator=g) for t in planted]
    layer_map, scores = cka_layer_map(student, teacher)
    assert layer_map == planted
    assert scores.shape == (4, 5)
    assert scores[torch.arange(4), torch.tensor(planted)].min() > 0.5


def test_cka_layer_map_needs_the_same_tokens():
    with pytest.raises(KavaError, match=r"row counts \[10, 11\]"):
        cka_layer_map([torch.randn(10, 4)], [torch.randn(11, 4)])


# ---- span alignment ---------------------------------------------------------------------------

def test_same_tokenisation_gives_the_identity():
    spans = torch.tensor([[0, 1], [1, 3], [3, 6], [6, 7]])
    weights, valid = span_alignment(spans, spans)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, torch.eye(4)) and valid.all()


def test_student_split_tokens_share_one_teacher_token():
    # student "12" "34", teacher "1234"
    weights, valid = span_alignment([[0, 2], [2, 4]], [[0, 4]])
    assert torch.equal(weights, torch.tensor([[1.0], [1.0]])) and valid.all()


def test_student_token_spans_two_teacher_tokens_by_overlap():
    # student "1234", teacher "12" "34"
    weights, valid = span_alignment([[0, 4]], [[0, 2], [2, 4]])
    assert torch.equal(weights, torch.tensor([[0.5, 0.5]])) and valid.all()
    # student "123", teacher "1" "234": one character in the first, two in the second
    weights, _ = span_alignment([[0, 3]], [[0, 1], [1, 4]])
    torch.testing.assert_close(weights, torch.tensor([[1 / 3, 2 / 3]]))


def test_uncovered_student_tokens_are_invalid_and_zero():
    # A zero-width BOS, two covered tokens, and a tail the teacher never saw.
    student = [[0, 0], [0, 2], [2, 4], [4, 6]]
    weights, valid = span_alignment(student, [[0, 2], [2, 4]])
    assert valid.tolist() == [False, True, True, False]
    assert torch.equal(weights[~valid], torch.zeros(2, 2))
    assert torch.equal(weights[valid], torch.eye(2))


def test_random_tokenisations_give_row_stochastic_weights():
    g = torch.Generator().manual_seed(4)

    def spans(n_chars):
        cuts = torch.randperm(n_chars - 1, generator=g)[:n_chars // 3].add(1).sort().values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_chars])])
        return torch.stack([bounds[:-1], bounds[1:]], dim=1)

    student, teacher = spans(300), spans(300)
    weights, valid = span_alignment(student, teacher)
    assert valid.all() and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(student)))
    # Every student character lands somewhere: total weight per teacher token, scaled back by
    # student token lengths, is exactly the teacher token's length.
    lengths = (student[:, 1] - student[:, 0]).float()
    torch.testing.assert_close(lengths @ weights, (teacher[:, 1] - teacher[:, 0]).float())


@pytest.mark.parametrize("n_student,n_teacher", [(0, 3), (3, 0), (0, 0), (1, 1), (1, 3), (3, 1)])
def test_span_alignment_empty_and_single_tokens(n_student, n_teacher):
    student = [[i, i + 1] for i in range(n_student)]
    teacher = [[0, 3]] if n_teacher == 1 else [[i, i + 1] for i in range(n_teacher)]
    weights, valid = span_alignment(student, teacher)
    assert weights.shape == (n_student, n_teacher) and valid.shape == (n_student,)
    assert valid.tolist() == [n_teacher > 0] * n_student
    if n_student and n_teacher:
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(n_student))


# ---- interpolation ----------------------------------------------------------------------------

def test_interpolation_endpoints_and_midpoints():
    weights, valid = interpolate_alignment(5, 9)
    assert valid.all()
    assert torch.equal(weights[0], torch.eye(9)[0]) and torch.equal(weights[4], torch.eye(9)[8])
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))
    # 3 student tokens over 4 teacher tokens: the middle one sits at position 1.5.
    weights, _ = interpolate_alignment(3, 4)
    assert weights[1].tolist() == [0.0, 0.5, 0.5, 0.0]
    # 5 over 3: positions 0, 0.5, 1, 1.5, 2
    weights, _ = interpolate_alignment(5, 3)
    assert weights.tolist() == [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]]


def test_interpolation_of_equal_lengths_is_the_identity():
    weights, _ = interpolate_alignment(6, 6)
    assert torch.equal(weights, torch.eye(6))


def test_interpolation_empty_and_single_tokens():
    weights, valid = interpolate_alignment(1, 7)
    assert torch.equal(weights, torch.eye(7)[6:]) and valid.all()
    weights, valid = interpolate_alignment(4, 1)
    assert torch.equal(weights, torch.ones(4, 1)) and valid.all()
    weights, valid = interpolate_alignment(0, 5)
    assert weights.shape == (0, 5) and valid.shape == (0,)
    weights, valid = interpolate_alignment(3, 0)
    assert weights.shape == (3, 0) and not valid.any()


def test_aligned_teacher_kv_averages_the_split_tokens():
    # How callers apply an alignment: student "1234" over teacher "12" "34".
    teacher_kv = torch.randn(2, 1, 256)
    weights, _ = span_alignment([[0, 4]], [[0, 2], [2, 4]])
    aligned = torch.einsum("st,thd->shd", weights, teacher_kv)
    torch.testing.assert_close(aligned[0], teacher_kv.mean(dim=0))


def test_causal_span_alignment_reads_no_teacher_token_that_saw_further():
    # Text "abcdef": student tokens "ab", "cdef"; teacher tokens "a", "bcd", "ef".
    student = [[0, 2], [2, 6]]
    teacher = [[0, 1], [1, 4], [4, 6]]
    weights, valid = causal_span_alignment(student, teacher)
    # "ab": the only teacher token ending inside it is "a" ("bcd" has read up to d).
    # "cdef": "bcd" and "ef" end inside it; the last, "ef", has read exactly its text.
    assert weights.tolist() == [[1, 0, 0], [0, 0, 1]] and valid.tolist() == [True, True]
    overlap, _ = span_alignment(student, teacher)
    assert overlap[0, 1] > 0  # plain overlap would let "ab" read "bcd"
    # A student token that no teacher token ends inside has no target.
    weights, valid = causal_span_alignment([[0, 1], [1, 6]], [[0, 6]])
    assert valid.tolist() == [False, True] and weights[0].sum() == 0


def test_position_alignment_pairs_token_i_with_token_i():
    weights, valid = position_alignment(4, 2)
    assert weights.tolist() == [[1, 0], [0, 1], [0, 0], [0, 0]]
    assert valid.tolist() == [True, True, False, False]
