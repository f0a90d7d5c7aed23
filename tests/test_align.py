import math

import pytest
import torch

from kava.align import (causal_span_alignment, interpolate_alignment, position_alignment,
                        shared_spans, span_alignment)
from kava.errors import KavaError


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


# ---- spans moved between renderings (data.prompt_format chat) ---------------------------------

def test_shared_spans_move_segments_and_drop_the_rest():
    # Rendered "<u>Q12<a>A3": question "Q12" at 3 → 0 and answer "A3" at 9 → 5 of "Q12: A3".
    segments = [(3, 0, 3), (9, 5, 2)]
    spans = [[0, 3],    # "<u>": template only
             [2, 5],    # ">Q1": its question part moves
             [5, 9],    # "2<a>": larger part "<a>" is template, but only "2" is shared
             [8, 11],   # ">A3"
             [11, 11]]  # zero-width
    moved = shared_spans(spans, segments)
    assert moved.tolist() == [[0, 0], [0, 2], [2, 3], [5, 7], [0, 0]]
    # A token over both segments keeps the part in the segment it overlaps more.
    assert shared_spans([[4, 10]], segments).tolist() == [[1, 3]]
    assert shared_spans(torch.zeros(0, 2), segments).shape == (0, 2)


def test_moved_spans_align_two_renderings_by_their_shared_characters():
    # Two renderings of question "ab" and answer "cd": "[ab]<cd>" and "##ab##cd##".
    student, teacher = [[1, 2], [2, 3], [3, 5], [5, 7]], [[0, 2], [2, 3], [3, 4], [6, 8]]
    weights, valid = span_alignment(shared_spans(student, [(1, 0, 2), (5, 2, 2)]),
                                    shared_spans(teacher, [(2, 0, 2), (6, 2, 2)]))
    # "a" reads teacher "a", "b" reads "b", "]<" (template) nothing, "cd" reads "cd".
    assert valid.tolist() == [True, True, False, True]
    assert weights.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
