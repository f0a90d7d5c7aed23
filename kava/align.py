"""Which teacher layer and which teacher tokens each student layer and token learns from.

Layer maps are lists indexed by student layer, holding a teacher layer. Time alignments are
dense `[Ts, Tt]` row-stochastic matrices plus a `[Ts]` validity mask: a student token's target
is `weights[i] @ teacher_kv`, i.e. for one example

    aligned = torch.einsum("st,thd->shd", weights.to(kv.dtype), teacher_kv)   # [Ts, H, D]

(and "bst,bthd->bshd" for a padded batch). Rows with valid=False are all zero and must be
masked out of the loss, never treated as a zero target.
"""

import torch

from kava.errors import KavaError


def ratio_layer_map(n_student, n_teacher):
    """Spread the student's layers evenly over the teacher's: first↔first, last↔last, the rest
    by rounding the proportional position. A student deeper than its teacher repeats teacher
    layers. A one-layer student maps to the teacher's last layer: its only layer is also the
    one that feeds the LM head, so the most abstract teacher layer is the closest match."""
    if n_student < 1 or n_teacher < 1:
        raise KavaError(f"layer map needs at least one layer, got {n_student} student and "
                        f"{n_teacher} teacher layers")
    if n_student == 1:
        return [n_teacher - 1]
    # Integer round-half-up of i*(n_teacher-1)/(n_student-1): no float ties, same on every machine.
    span_s, span_t = n_student - 1, n_teacher - 1
    return [(2 * i * span_t + span_s) // (2 * span_s) for i in range(n_student)]


def pruned_from(card):
    """(base model name, keep_layers) of a depth-pruned (`derive`) model's card, else None."""
    derive = card["source"].get("derive")
    return (derive["base"], list(derive["keep_layers"])) if derive else None


def auto_layer_map(n_student, n_teacher, teacher, pruned=None):
    """(layer map, why it was chosen). A student pruned from this very teacher (`pruned`, from
    pruned_from) holds the teacher's layers `keep_layers` in the teacher's own coordinates, so
    each student layer maps to the layer it was copied from; a ratio map would score most of
    them against a neighbouring layer whose K/V live in other coordinates. Otherwise ratio."""
    if pruned is not None and pruned[0] == teacher:
        return list(pruned[1]), f"the student is {teacher} pruned to layers {pruned[1]}"
    return ratio_layer_map(n_student, n_teacher), "ratio: the student is not pruned from it"


def explicit_layer_map(mapping, n_student, n_teacher, teacher_name):
    """Check a user-given map (one teacher layer per student layer) against both models."""
    mapping = list(mapping)
    if len(mapping) != n_student:
        raise KavaError(f"layer map for teacher {teacher_name} has {len(mapping)} entries, "
                        f"the student has {n_student} layers")
    for student_layer, teacher_layer in enumerate(mapping):
        if isinstance(teacher_layer, bool) or not isinstance(teacher_layer, int):
            raise KavaError(f"layer map for teacher {teacher_name}: student layer {student_layer} "
                            f"maps to {teacher_layer!r}, not a layer index")
        if not 0 <= teacher_layer < n_teacher:
            raise KavaError(f"layer map for teacher {teacher_name}: student layer {student_layer} "
                            f"maps to teacher layer {teacher_layer}, but {teacher_name} has layers "
                            f"0..{n_teacher - 1}")
    return mapping


def _centre(x):
    # float64: CKA is a ratio of large sums, and centring in float32 loses the small variations
    # that sit on top of a large mean.
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def _hsic(xc, yc):
    # Unnormalised linear HSIC, ||Yc^T Xc||_F^2; the feature-space form is cheap for N >> d.
    return (yc.T @ xc).square().sum()


def _cka(xc, yc, x_norm, y_norm):
    # A constant representation (zero norm) shares no linear structure with anything: CKA 0.
    return _hsic(xc, yc) / (x_norm * y_norm).clamp_min(torch.finfo(torch.float64).tiny)


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) between `[N, d1]` and `[N, d2]` features of the same N
    inputs: 1 for identical representations, invariant to orthogonal maps and isotropic scaling,
    0 when either side is constant. Returns a float64 scalar tensor."""
    if x.shape[0] != y.shape[0]:
        raise KavaError(f"linear_cka needs features of the same inputs, got {x.shape[0]} and "
                        f"{y.shape[0]} rows")
    xc, yc = _centre(x), _centre(y)
    return _cka(xc, yc, _hsic(xc, xc).sqrt(), _hsic(yc, yc).sqrt())


def cka_layer_map(student_feats, teacher_feats):
    """For each student layer, the teacher layer whose features (e.g. flattened KV, `[N, d]`,
    same N tokens for every layer) have the highest linear CKA with it. Returns the map and the
    float64 `[n_student, n_teacher]` score matrix (for the report)."""
    n_rows = {f.shape[0] for f in [*student_feats, *teacher_feats]}
    if len(n_rows) != 1:
        raise KavaError(f"cka_layer_map needs features of the same tokens for every layer, got "
                        f"row counts {sorted(n_rows)}")
    # Centre and self-normalise each layer once; only the cross terms are per pair.
    student = [_centre(f) for f in student_feats]
    teacher = [_centre(f) for f in teacher_feats]
    s_norms = [_hsic(f, f).sqrt() for f in student]
    t_norms = [_hsic(f, f).sqrt() for f in teacher]
    scores = torch.stack([
        torch.stack([_cka(s, t, sn, tn) for t, tn in zip(teacher, t_norms)])
        for s, sn in zip(student, s_norms)
    ])
    return scores.argmax(dim=1).tolist(), scores


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
