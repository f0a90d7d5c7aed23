"""KV distillation losses over padded batches, logit KD from a stored top-k, and the weighting
of several teachers.

All take KV of one layer as `[B, T, H, D]` with a `[B, T]` boolean mask (True = a real,
aligned token) and average over valid tokens and heads only. A batch with no valid token gives
0 with zero gradient, not NaN: it simply has nothing to learn from.

The answer cross-entropy is not here: a transformers causal LM computes it when called with
`labels=` (labels shifted inside, -100 for prompt and pad ignored, mean over the remaining
tokens, logits upcast to float32). Under gradient accumulation pass `num_items_in_batch`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kava.config import schema_enum
from kava.errors import KavaError

KV_LOSSES = schema_enum("kv_loss")
TEACHER_WEIGHTINGS = schema_enum("teacher_weighting")

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


def kv_loss(pred, target, mask, kind, *, alpha, beta, std=None):
    """Scalar loss between two `[B, T, H, D]` KV tensors of one layer over the valid tokens.

    mercator: alpha·(1 − cos) + beta·(log‖pred‖ − log‖target‖)² per token and head (direction
        plus relative scale; alpha and beta are used by this kind only).
    mse, smooth_l1: per element, averaged over valid tokens, heads and head_dim.
    std: if given (a fixed scale: the teacher's own K or V std at that layer, as KaVa/CODI
        normalise), both sides are divided by it first, so the loss is in units of the target's
        spread. Mercator is scale-free, so for it this changes nothing."""
    if kind not in KV_LOSSES:
        raise KavaError(f"unknown kv loss {kind!r}; choose one of {', '.join(KV_LOSSES)}")
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


def masked_cosine(pred, target, mask):
    """Mean cosine similarity per token and head over the valid tokens (0 when there are none;
    weigh batches by mask.sum() when averaging)."""
    p, s = _valid(pred, target, mask)
    return _mean(_cosine(p, s, _norms(p), _norms(s)))


class TeacherMixture(nn.Module):
    """How much each teacher's KV loss counts, per student layer.

    fixed: the given weights (default uniform), normalised to sum to 1, constant.
    learned: a softmax over trainable logits `[n_layers, n_teachers]`, starting at the given
        weights. Left alone, learned weights drift to whichever teacher is easiest to match;
        subtract a multiple of entropy() from the total loss to keep them spread.
    validation: one weight per teacher, the same in every layer, set from outside by
        set_weights (kava.distill.validation_weighting): ≥ 0, summing to 1, or all 0.

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
            w = w / w.sum()  # weights() reads these back as they are
        # softmax(log w) = w / Σw: one code path for fixed and learned.
        logits = w.log().expand(n_layers, n_teachers).clone()
        if mode == "learned":
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def weights(self):
        """`[n_layers, n_teachers]`, each row summing to 1 (validation: or all 0)."""
        if self.mode == "validation":
            # A softmax cannot give 0, nor all 0: the buffer holds log-weights, −inf for 0.
            return self.logits.exp()
        return self.logits.softmax(dim=-1)

    @torch.no_grad()
    def set_weights(self, weights):
        """validation: `[n_teachers]` weights (≥ 0, summing to 1 or all 0) for every layer."""
        self.logits.copy_(weights.to(self.logits).log().expand_as(self.logits))

    def forward(self, kv_losses):
        """kv_losses `[n_layers, n_teachers]` → Σ_t w·KV per layer, averaged over layers."""
        if kv_losses.shape != self.logits.shape:
            raise KavaError(f"teacher weights: kv losses have shape {tuple(kv_losses.shape)}, "
                            f"expected [n_layers, n_teachers] = {list(self.logits.shape)}")
        return (self.weights() * kv_losses).sum(dim=-1).mean()

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
    teacher = torch.cat([top_logp[mask].float(), tail_logp[mask].float().unsqueeze(-1)], dim=-1)
    student = with_tail(logits.log_softmax(dim=-1).gather(-1, top_ids[mask].long()))
    if temperature != 1.0:
        teacher = (teacher / temperature).log_softmax(dim=-1)
        student = (student / temperature).log_softmax(dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=-1)
    return temperature ** 2 * _mean(per_position)
