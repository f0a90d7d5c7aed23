"""Which teacher tokens each student token learns from (time alignment; which teacher *layer*
each student layer learns from is kava.layer_maps). Time alignments are
dense `[Ts, Tt]` row-stochastic matrices plus a `[Ts]` validity mask: a student token's target
is `weights[i] @ teacher_kv`, i.e. for one example

    aligned = torch.einsum("st,thd->shd", weights.to(kv.dtype), teacher_kv)   # [Ts, H, D]

(and "bst,bthd->bshd" for a padded batch). Rows with valid=False are all zero and must be
masked out of the loss, never treated as a zero target.
"""

import torch

from kava.errors import KavaError


def span_alignment(student_spans, teacher_spans):
    """Align two tokenisations of the same text by their character spans (`[T, 2]`, start and
    end offsets, end exclusive). Student token i takes teacher token j with weight proportional
    to the number of characters they share; rows sum to 1. A student token sharing no character
    with any teacher token (zero-width special tokens, text the teacher did not see) gets an
    all-zero row and valid=False.

    A teacher token that runs past the end of a student token has already seen characters the
    student token has not; that small look-ahead is inherent to cross-tokenizer alignment."""
    student = torch.as_tensor(student_spans, dtype=torch.long).reshape(-1, 2)
    teacher = torch.as_tensor(teacher_spans, dtype=torch.long).reshape(-1, 2)
    start = torch.maximum(student[:, None, 0], teacher[None, :, 0])
    end = torch.minimum(student[:, None, 1], teacher[None, :, 1])
    overlap = (end - start).clamp_min(0)
    total = overlap.sum(dim=1, keepdim=True)
    # Overlaps are whole characters, so clamping the total at 1 only touches all-zero rows,
    # which stay zero and are flagged invalid.
    weights = overlap.double() / total.clamp_min(1)
    return weights.float(), total.squeeze(1) > 0


def causal_span_alignment(student_spans, teacher_spans):
    """Like span_alignment, but each student token reads only the teacher token that has seen
    exactly its text, or less: the last teacher token that ends inside the student token (at or
    before its end, after its start). Span overlap would also average in a teacher token running
    past the student token's end, one that has already read characters the student has not.
    A student token no teacher token ends inside is invalid."""
    student = torch.as_tensor(student_spans, dtype=torch.long).reshape(-1, 2)
    teacher = torch.as_tensor(teacher_spans, dtype=torch.long).reshape(-1, 2)
    inside = ((teacher[None, :, 1] <= student[:, None, 1])
              & (teacher[None, :, 1] > student[:, None, 0])
              & (teacher[None, :, 1] > teacher[None, :, 0]))
    valid = inside.any(dim=1)
    # The last qualifying teacher token: argmax over position-weighted flags picks the highest.
    last = (inside * torch.arange(1, len(teacher) + 1)).argmax(dim=1)
    weights = torch.zeros(len(student), len(teacher))
    weights[valid, last[valid]] = 1.0
    return weights, valid


def shared_spans(spans, segments):
    """Token character spans (`[T, 2]`) over one rendering of a row, moved onto another text
    that holds the same segments: `segments` lists (start here, start there, length). The part
    of a token inside a segment moves with it (a token over two segments keeps its larger part);
    a token inside none, text only this rendering has, gets the empty span (0, 0), so it
    overlaps nothing and the span alignments leave it out."""
    spans = torch.as_tensor(spans, dtype=torch.long).reshape(-1, 2)
    segments = torch.as_tensor(segments, dtype=torch.long).reshape(-1, 3)
    start = torch.maximum(spans[:, None, 0], segments[None, :, 0])
    end = torch.minimum(spans[:, None, 1], segments[None, :, 0] + segments[None, :, 2])
    inside, best = (end - start).clamp_min(0).max(dim=1)
    rows = torch.arange(len(spans))
    shift = segments[best, 1] - segments[best, 0]
    moved = torch.stack([start[rows, best] + shift, end[rows, best] + shift], dim=1)
    return torch.where((inside > 0)[:, None], moved, torch.zeros_like(moved))


def position_alignment(n_student, n_teacher):
    """Token i reads token i, on the positions both have: the alignment of a control arm whose
    teacher KV comes from another example, so it keeps the statistics of each position while
    its content belongs to other text."""
    n = min(n_student, n_teacher)
    weights = torch.zeros(n_student, n_teacher)
    weights[torch.arange(n), torch.arange(n)] = 1.0
    return weights, torch.arange(n_student) < n


def interpolate_alignment(n_student, n_teacher):
    """Align by relative position when character offsets are not available: student token i sits
    at fractional teacher position i*(Tt-1)/(Ts-1) and takes its two neighbours with linear
    weights, so first↔first and last↔last. A single student token maps to the teacher's last
    token, the one that (causally) has seen the whole text. With no teacher tokens every
    student token is invalid."""
    if n_teacher == 0 or n_student == 0:
        return torch.zeros(n_student, n_teacher), torch.zeros(n_student, dtype=torch.bool)
    i = torch.arange(n_student, dtype=torch.float64)
    if n_student == 1:
        pos = torch.full((1,), float(n_teacher - 1), dtype=torch.float64)
    else:
        # Integer numerator: the endpoints land exactly on 0 and Tt-1.
        pos = i * (n_teacher - 1) / (n_student - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(n_teacher - 1)
    frac = pos - lo
    rows = i.long()
    weights = torch.zeros(n_student, n_teacher, dtype=torch.float64)
    # accumulate=True: at the last position lo == hi and the two halves must add up to 1.
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.float(), torch.ones(n_student, dtype=torch.bool)


def shared_boundaries(student_spans, teacher_spans):
    """(student token indices, teacher token indices) of the positions both tokenisations share:
    pairs of non-empty tokens whose character spans end at the same offset, in text order. At
    such a pair both models have read exactly the same text, so relations between shared
    positions (kava.losses.relation_loss) index the same characters on both sides. Zero-width
    tokens (BOS, specials) share no boundary: they hold no text."""
    student = torch.as_tensor(student_spans, dtype=torch.long).reshape(-1, 2)
    teacher = torch.as_tensor(teacher_spans, dtype=torch.long).reshape(-1, 2)
    same_end = ((student[:, None, 1] == teacher[None, :, 1])
                & (student[:, None, 1] > student[:, None, 0])
                & (teacher[None, :, 1] > teacher[None, :, 0]))
    # A tokenizer may end two tokens at one offset (a byte-split character gives a zero-width
    # tail); each side's last such token has read the whole text up to it.
    last = torch.arange(1, len(teacher) + 1) * same_end
    student_idx = same_end.any(dim=1).nonzero().squeeze(1)
    teacher_idx = last[student_idx].argmax(dim=1)
    keep = torch.ones(len(student_idx), dtype=torch.bool)
    keep[:-1] = student[student_idx[:-1], 1] != student[student_idx[1:], 1]
    return student_idx[keep], teacher_idx[keep]


def boundary_alignment(student_spans, teacher_spans):
    """One-hot alignment on shared_boundaries: a student token that ends where a teacher token
    ends reads that teacher token; every other student token is invalid."""
    n_student = len(torch.as_tensor(student_spans).reshape(-1, 2))
    n_teacher = len(torch.as_tensor(teacher_spans).reshape(-1, 2))
    student_idx, teacher_idx = shared_boundaries(student_spans, teacher_spans)
    weights = torch.zeros(n_student, n_teacher)
    weights[student_idx, teacher_idx] = 1.0
    valid = torch.zeros(n_student, dtype=torch.bool)
    valid[student_idx] = True
    return weights, valid
