"""KV distillation losses over padded batches, logit KD from a stored top-k (KL for a teacher
with the student's tokenizer, ULD across tokenizers), and the weighting of several teachers.

All take KV of one layer as `[B, T, H, D]` with a `[B, T]` boolean mask (True = a real,
aligned token) and average over valid tokens and heads only. A batch with no valid token gives
0 with zero gradient, not NaN: it simply has nothing to learn from.

The answer cross-entropy is not here: a transformers causal LM computes it when called with
`labels=` (labels shifted inside, -100 for prompt and pad ignored, mean over the remaining
tokens, logits upcast to float32). Under gradient accumulation pass `num_items_in_batch`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kava.config import schema_enum
from kava.errors import KavaError

KV_LOSSES = schema_enum("kv_loss")
TEACHER_WEIGHTINGS = schema_enum("teacher_weighting")
KD_KINDS = schema_enum("kd_loss")

# Floor under vector norms: log-norm and cosine, and their gradients, stay finite at zero vectors.
_NORM_EPS = 1e-6


def _valid(pred, target, mask):
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise KavaError(f"kv loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
                        f"mask {tuple(mask.shape)} do not match as [B, T, H, D] and [B, T]")
    # Select before any arithmetic, in float32: nothing in a pad or unaligned token (not even
    # inf or nan) reaches the loss or its gradient, and bf16 KV is compared at full precision.
    return pred[mask].float(), target[mask].float()


def _mean(x):
    # Sum over nothing is 0, so an all-masked batch gives 0 and zero gradients.
    return x.sum() / max(x.numel(), 1)


def _norms(x):
    # Clamping the squared norm (not the norm) keeps the gradient at 0 finite: d(x·x)/dx = 2x.
    return x.square().sum(dim=-1).clamp_min(_NORM_EPS ** 2).sqrt()


def _cosine(p, s, p_norm, s_norm):
    return (p * s).sum(dim=-1) / (p_norm * s_norm)


def kv_loss(pred, target, mask, kind, *, alpha, beta, std=None, relation_heads=1,
            relation_temperature=1.0):
    """Scalar loss between two `[B, T, H, D]` KV tensors of one layer over the valid tokens.

    mercator: alpha·(1 − cos) + beta·(log‖pred‖ − log‖target‖)² per token and head (direction
        plus relative scale; alpha and beta are used by this kind only).
    mse, smooth_l1: per element, averaged over valid tokens, heads and head_dim.
    std: if given (a fixed scale: the teacher's own K or V std at that layer, as KaVa/CODI
        normalise), both sides are divided by it first, so the loss is in units of the target's
        spread. Mercator is scale-free, so for it this changes nothing.
    relation: relation_loss with relation_heads and relation_temperature (used by this kind
        only); pred and target may differ in heads and head_dim, and std changes nothing (the
        relations of a rescaled side differ only by the softmax's sharpness, which a fixed
        scale cannot be allowed to tune, so it is not applied)."""
    if kind not in KV_LOSSES:
        raise KavaError(f"unknown kv loss {kind!r}; choose one of {', '.join(KV_LOSSES)}")
    if kind == "relation":
        return relation_loss(pred, target, mask, relation_heads, relation_temperature)
    p, s = _valid(pred, target, mask)
    if std is not None:
        p, s = p / std, s / std
    if kind == "mse":
        return _mean((p - s).square())
    if kind == "smooth_l1":
        return _mean(F.smooth_l1_loss(p, s, reduction="none"))
    p_norm, s_norm = _norms(p), _norms(s)
    per_head = (alpha * (1 - _cosine(p, s, p_norm, s_norm))
                + beta * (p_norm.log() - s_norm.log()).square())
    return _mean(per_head)


def relation_width_error(heads, widths):
    """None if `heads` relation heads split every KV width in `widths` ({side: H·D}) evenly,
    else the reason, naming the sides."""
    uneven = {side: width for side, width in widths.items() if width % heads}
    if not uneven:
        return None
    return (f"train.relation_heads {heads} does not divide the joined KV width (heads x "
            f"head_dim) of " + ", ".join(f"{side} ({width})" for side, width in uneven.items()))


def _relation_logp(x, mask, heads, temperature):
    """[B, T, H, D] KV → [B, R, T, T] log row-softmax of the scaled dot products between the
    tokens' joined-and-resplit relation heads, each row i over the valid tokens j ≤ i."""
    b, t = x.shape[:2]
    width = x.shape[2] * x.shape[3]
    # Zeroed first, so nothing of a pad or unaligned token (not even inf or nan) reaches a
    # score. Join the KV heads, re-split into R relation heads: [B, R, T, width / R].
    x = x.float().masked_fill(~mask[:, :, None, None], 0.0)
    x = x.reshape(b, t, heads, width // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / (math.sqrt(width / heads) * temperature)
    # Row i relates to the valid j ≤ i, and always to itself: a row with nothing allowed would
    # be all -inf, whose softmax (and gradient) is nan even where the row is dropped.
    eye = torch.eye(t, dtype=torch.bool, device=x.device)
    allowed = eye.tril() | (torch.ones_like(eye).tril() & mask[:, None, None, :])
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1), allowed


def relation_loss(pred, target, mask, heads, temperature=1.0):
    """MiniLMv2's self-attention relation distillation (Wang et al. 2021, arXiv 2012.15828) on
    one of K or V: KL(teacher ‖ student) between the row-softmaxes of scaled dot products
    among the valid tokens, causally (token i relates to the valid tokens j ≤ i), averaged
    over valid rows and relation heads.

    pred (student) and target (teacher) are `[B, T, H, D]` over the same tokens (aligned at
    shared token boundaries) but may differ in H and D: each side's heads are joined to one
    H·D vector per token and re-split into `heads` relation heads, each scaled by
    1/sqrt(H·D / heads) and divided by `temperature`. No parameters, so no projector: a
    relation is unchanged by an orthogonal map within a relation head and by how the joined
    width is split into KV heads. mask `[B, T]`; a batch with no valid token gives 0."""
    if pred.shape[:2] != mask.shape or target.shape[:2] != mask.shape:
        raise KavaError(f"relation loss: pred {tuple(pred.shape)}, target "
                        f"{tuple(target.shape)} and mask {tuple(mask.shape)} do not match as "
                        f"[B, T, H, D] and [B, T]")
    reason = relation_width_error(heads, {"student": pred.shape[2] * pred.shape[3],
                                          "teacher": target.shape[2] * target.shape[3]})
    if reason:
        raise KavaError(reason)
    student, allowed = _relation_logp(pred, mask, heads, temperature)
    teacher, _ = _relation_logp(target, mask, heads, temperature)
    # Zero, not nan, where a token is not allowed: -inf − -inf would poison the sum.
    per_row = F.kl_div(student, teacher, log_target=True, reduction="none").masked_fill(
        ~allowed, 0.0).sum(dim=-1)                                  # [B, R, T]
    rows = mask[:, None, :].expand_as(per_row)
    return _mean(per_row[rows])


def masked_cosine(pred, target, mask):
    """Mean cosine similarity per token and head over the valid tokens (0 when there are none;
    weigh batches by mask.sum() when averaging). nan when the two sides differ in (heads,
    head_dim): KV compared without a projector (kv_loss relation) has no cosine."""
    if pred.shape[:2] == target.shape[:2] and pred.shape[2:] != target.shape[2:]:
        return torch.tensor(float("nan"), device=pred.device)
    p, s = _valid(pred, target, mask)
    return _mean(_cosine(p, s, _norms(p), _norms(s)))


class TeacherMixture(nn.Module):
    """How much each teacher's KV loss counts, per student layer.

    fixed: the given weights (default uniform), normalised to sum to 1, constant.
    learned: a softmax over trainable logits `[n_layers, n_teachers]`, starting at the given
        weights. Left alone, learned weights drift to whichever teacher is easiest to match;
        subtract a multiple of entropy() from the total loss to keep them spread.
    validation: one weight per teacher, the same in every layer, set from outside by
        set_weights (kava.distill.validation_weighting): in [0, 1], the largest 1, or all 0.

    total = ce_weight·CE + kv_weight·teacher_mixture(kv_losses) [− λ·teacher_mixture.entropy()]
    """

    def __init__(self, n_layers, n_teachers, mode, weights):
        super().__init__()
        if mode not in TEACHER_WEIGHTINGS:
            raise KavaError(f"unknown teacher weighting {mode!r}; choose one of "
                            f"{', '.join(TEACHER_WEIGHTINGS)}")
        w = torch.ones(n_teachers) if weights is None else torch.tensor(weights).float()
        if w.shape != (n_teachers,) or not bool((w > 0).all()):
            raise KavaError(f"teacher weights {weights} must be {n_teachers} positive numbers")
        self.mode = mode
        if mode == "validation":
            w = w / w.max()  # weights() reads these back as they are
        # softmax(log w) = w / Σw: one code path for fixed and learned.
        logits = w.log().expand(n_layers, n_teachers).clone()
        if mode == "learned":
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def weights(self):
        """`[n_layers, n_teachers]`, each row summing to 1 (validation: the largest 1, or all
        0)."""
        if self.mode == "validation":
            # A softmax cannot give 0, nor all 0: the buffer holds log-weights, −inf for 0.
            return self.logits.exp()
        return self.logits.softmax(dim=-1)

    @torch.no_grad()
    def set_weights(self, weights):
        """validation: `[n_teachers]` weights (in [0, 1], the largest 1, or all 0) for every
        layer."""
        self.logits.copy_(weights.to(self.logits).log().expand_as(self.logits))

    def forward(self, kv_losses, layers=None):
        """kv_losses `[n_layers, n_teachers]` → Σ_t w·KV per layer, averaged over `layers`
        (indices; None: all)."""
        if kv_losses.shape != self.logits.shape:
            raise KavaError(f"teacher weights: kv losses have shape {tuple(kv_losses.shape)}, "
                            f"expected [n_layers, n_teachers] = {list(self.logits.shape)}")
        per_layer = (self.weights() * kv_losses).sum(dim=-1)
        return (per_layer if layers is None else per_layer[layers]).mean()

    def entropy(self):
        """Mean over layers of the entropy of the teacher weights (max log n_teachers)."""
        return -(self.weights() * self.logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def with_tail(top_logp):
    """[..., k] log-probabilities → [..., k + 1]: the k plus one bucket holding the rest of the
    mass, log(1 − Σ p), computed as log1p(−Σ p) and floored so a top-k that holds all the mass
    (to rounding) gives a finite, tiny tail."""
    tail = torch.log1p(-top_logp.exp().sum(dim=-1).clamp(max=1 - 1e-6))
    return torch.cat([top_logp, tail.unsqueeze(-1)], dim=-1)


def kd_loss(student_logits, top_ids, top_logp, tail_logp, mask, temperature=1.0):
    """Forward KL(teacher ‖ student) over the teacher's stored top-k tokens plus one tail
    bucket, averaged over the `mask` positions, times temperature² — the stored-top-k logit KD
    of DistillKit (arcee-ai/DistillKit) and Minitron (Muralidharan et al. 2024, arXiv
    2407.14679: forward KL, τ = 1); the τ² keeps the gradient's scale independent of τ (Hinton
    et al. 2015, arXiv 1503.02531).

    student_logits [B, T, V]; top_ids [B, T, k] (any integer dtype), top_logp [B, T, k] and
    tail_logp [B, T] the teacher's stored log-probabilities at τ = 1 (kava.precompute); mask
    [B, T] bool, the positions to distil. The student's buckets are its log-softmax at the same
    k ids and the log of its remaining mass. The temperature acts on the k + 1 buckets of both
    sides alike, as if each were one token: exact at τ = 1; otherwise the tail's own spread is
    unknown from the store, so it tempers as one token. A batch with no position gives 0."""
    logits = student_logits[mask].float()
    teacher = _tempered(_teacher_buckets(top_logp[mask], tail_logp[mask]), temperature)
    student = _tempered(with_tail(logits.log_softmax(dim=-1).gather(-1, top_ids[mask].long())),
                        temperature)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=-1)
    return temperature ** 2 * _mean(per_position)


def uld_loss(student_logits, top_logp, tail_logp, mask, temperature=1.0):
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030) from a stored top-k:
    the L1 distance between the teacher's and the student's probabilities sorted in descending
    order — the Wasserstein-1 distance the paper derives for a uniform transport cost, which
    compares the two distributions' shapes rank by rank and so needs no map between their
    vocabularies. Summed over ranks, averaged over the `mask` positions.

    Both sides are k + 1 buckets: the k largest probabilities (the teacher's stored top-k, the
    student's own top-k of its full vocabulary) and the rest of the mass as one bucket. The
    paper sums over the whole vocabulary; past rank k the store has only the teacher's tail
    mass, and |tail_t − tail_s| is the largest lower bound of those ranks' Σ|p_t − p_s| that
    the masses alone give (triangle inequality). With it both vectors sum to 1, so the loss is
    0 exactly when the top-k and the tail agree, and at most 2.

    student_logits [B, T, V]; top_logp [B, T, k] and tail_logp [B, T] the teacher's stored
    log-probabilities at τ = 1, each position already paired with the student position that
    has read the same text (kava.batching.kd_pairs); mask [B, T] bool. The temperature acts on
    the buckets as in kd_loss; as in the paper's own code, the loss is not rescaled by it.
    A batch with no position gives 0."""
    logits = student_logits[mask].float()
    teacher = _teacher_buckets(top_logp[mask].sort(dim=-1, descending=True).values,
                               tail_logp[mask])
    student = with_tail(logits.log_softmax(dim=-1).topk(top_logp.shape[-1], dim=-1).values)
    distance = _tempered(student, temperature).exp() - _tempered(teacher, temperature).exp()
    return _mean(distance.abs().sum(dim=-1))


def _teacher_buckets(top_logp, tail_logp):
    """A stored top-k [N, k] and tail [N] as k + 1 float32 log-probability buckets."""
    return torch.cat([top_logp.float(), tail_logp.float().unsqueeze(-1)], dim=-1)


def _tempered(buckets, temperature):
    # Each bucket tempers as one token: exact at τ = 1; the tail's own spread is not stored.
    return buckets if temperature == 1.0 else (buckets / temperature).log_softmax(dim=-1)


def kd_kind(requested, same_tokenizer, teacher):
    """The KD loss (train.kd_loss) teacher `teacher`'s stored logits are distilled with: auto is
    kl for a teacher with the student's tokenizer and uld otherwise. kl reads the student's
    log-probability at each stored id, so it is refused for a teacher of another tokenizer,
    whose ids index another vocabulary."""
    if requested not in KD_KINDS:
        raise KavaError(f"unknown kd loss {requested!r}; choose one of {', '.join(KD_KINDS)}")
    if requested == "auto":
        return "kl" if same_tokenizer else "uld"
    if requested == "kl" and not same_tokenizer:
        raise KavaError(f"train.kd_loss kl distils teacher {teacher}, whose tokenizer is not the "
                        f"student's: its stored ids index another vocabulary; use kd_loss uld "
                        f"(or auto) for it")
    return requested
