"""What is trained and how it is scored: the student, one KV projector per teacher, the teacher
weights, and the loss

    total = ce_weight·CE + kv_weight·Σ_t w_t·KV_t + kd_weight·mean_t KD_t
            [− entropy_weight·H(w)] [+ l2_init_weight·‖θ−θ₀‖²]

KV_t is, per student layer, the mean of kava.losses.kv_loss over K and over V between the
student's KV and the teacher's aligned KV of the mapped layer, one side projected into the
other's space (kava.projector: student_to_teacher maps the student's KV onto the teacher's fixed
KV; teacher_to_student maps the teacher's onto the student's), on valid tokens only (real,
aligned student tokens). With kv_std_norm both sides are divided by the teacher's own K or V
standard deviation at that layer, measured once on the train store: a fixed scale, which the
projector cannot shrink. Σ_t w_t is kava.losses.TeacherMixture (per layer, then averaged over
the student layers train.kv_exclude_layers leaves in). The control arms of train.kv_target swap
the teacher's KV for other targets (kava.targets), read the same way.
With kv_loss relation (kava.losses.relation_loss) nothing is projected: the teacher's KV, read
at the token boundaries both tokenisations share, is compared through its relations. The loss is
chosen per teacher (train.teacher_kv_loss over train.kv_loss), so one arm can distil its parent
by MSE through the identity and a teacher of another shape by relation.

The CE baseline (kv_weight 0) still fits its projectors when `probe_projector` is on: the
student's KV enters that fit detached, so the student trains on CE alone. Then the training
KV cosine means the same for every arm.

KD_t compares the student's logits with teacher t's stored top-k logits, over every real token
but the last: kava.losses.kd_loss (KL) for a teacher with the student's tokenizer, uld_loss (ULD)
at the tokens whose text ends where a teacher token's does otherwise (train.kd_loss).

Under teacher_weighting validation, w_t is one weight per teacher that validation_weighting
sets every few steps from gradient alignment with the validation rows, and it weighs the KD
terms too (kd_weight·Σ_t w_t·KD_t): a teacher at 0 contributes nothing.
"""

import math

import torch
from torch import nn

from kava.capture import student_forward
from kava.config import teacher_kv_losses
from kava.errors import KavaError
from kava.losses import (TeacherMixture, kd_loss, kv_loss, masked_cosine, relation_width_error,
                          uld_loss)
from kava.projector import KVProjector, compared_pairs

def layer_scores(pred_kv, target_kv, mask, loss_cfg, kind, std=None):
    """KV loss `kind` (the teacher's kv_loss) and cosine of one teacher, per student layer: two
    `[n_layers]` tensors (loss with autograd, cosine detached), each the mean over K and V on the
    valid tokens. std: `[n_layers, 2]` fixed scales of K and V (used with kv_std_norm).

    A student layer without a target (None: the layer map leaves it out, as minilm does) scores
    loss 0 and cosine nan, and each mapped layer's loss counts n_layers / n_mapped, so the mean
    over layers (what TeacherMixture takes) is the mean over the mapped layers."""
    losses, cosines = [], []
    mapped = [t is not None for t in target_kv]
    for layer, (pred, target) in enumerate(zip(pred_kv, target_kv)):
        if target is None:
            losses.append(torch.zeros((), device=mask.device))
            cosines.append(torch.tensor(float("nan"), device=mask.device))
            continue
        (pk, pv), (tk, tv) = pred, target
        per_kv = []
        for which, (p, t) in enumerate(((pk, tk), (pv, tv))):
            scale = std[layer, which] if loss_cfg["kv_std_norm"] else None
            per_kv.append(kv_loss(p, t, mask, kind, alpha=loss_cfg["kv_alpha"],
                                  beta=loss_cfg["kv_beta"], std=scale,
                                  relation_heads=loss_cfg["relation_heads"],
                                  relation_temperature=loss_cfg["relation_temperature"]))
        losses.append((per_kv[0] + per_kv[1]) / 2)
        with torch.no_grad():
            cosines.append((masked_cosine(pk, tk, mask) + masked_cosine(pv, tv, mask)) / 2)
    return torch.stack(losses) * (len(mapped) / sum(mapped)), torch.stack(cosines)


class Distiller(nn.Module):
    """Student + projectors + teacher weights in one module, so that DDP sees every trained
    parameter. forward(batch) returns the micro-batch's share of the step's loss and its
    statistics (detached; summed over micro-batches and GPUs they give the step's values).

    teacher_std: `[n_teachers, n_student_layers, 2]` standard deviation of each teacher's K and
    V at the layer each student layer maps to (kava.distill.teacher_kv_std)."""

    def __init__(self, student, projectors, teacher_mixture, teacher_std, loss_cfg, key_space):
        super().__init__()
        self.student = student
        self.projectors = nn.ModuleDict(projectors)
        self.teacher_mixture = teacher_mixture
        self.register_buffer("teacher_std", teacher_std)
        self.loss_cfg = dict(loss_cfg)
        self.kv_losses = teacher_kv_losses(loss_cfg, list(projectors))
        self.key_space = key_space
        # The student layers whose KV terms count (teacher_std has a row per student layer).
        self.kv_layers = kv_layers(loss_cfg["kv_exclude_layers"], teacher_std.shape[1])
        # The L2-to-init control pulls toward these; a resumed run rebuilds them from the card.
        self.init_params = ([p.detach().clone() for p in student.parameters()]
                            if loss_cfg["l2_init_weight"] else None)

    @property
    def teachers(self):
        return list(self.projectors)

    def forward(self, batch, ce_items, kv_items, n_micro, kd_items=None):
        """ce_items: answer tokens of the whole step; kv_items: {teacher: valid tokens of the
        whole step}; n_micro: micro-batches this process runs in the step; kd_items: {KD
        teacher: distilled positions of the whole step}."""
        cfg = self.loss_cfg
        outputs = student_forward(self.student, batch, self.key_space, ce_items,
                                  kd_masks(batch, kd_items))
        student_kv = outputs.kv
        kv_on_student = cfg["kv_weight"] > 0
        if not kv_on_student:
            student_kv = [(k.detach(), v.detach()) for k, v in student_kv]
        kv_losses, cosines = [], []
        for t, name in enumerate(self.teachers):
            targets = batch.teachers[name]
            pred, target = compared_pairs(self.projectors[name], student_kv, targets.kv)
            share = targets.mask.sum() / max(int(kv_items[name]), 1)
            losses, cos = layer_scores(pred, target, targets.mask, cfg, self.kv_losses[name],
                                       self.teacher_std[t])
            kv_losses.append(losses * share)
            cosines.append(cos * share)
        kv_matrix = torch.stack(kv_losses, dim=1)  # [n_layers, n_teachers]
        kv_term = self.teacher_mixture(kv_matrix, self.kv_layers)
        kv_coefficient = cfg["kv_weight"] if kv_on_student else float(cfg["probe_projector"])
        kd_term = self.kd_term(outputs.logits, batch, kd_items or {})
        loss = (cfg["ce_weight"] * outputs.ce + kv_coefficient * kv_term
                + cfg["kd_weight"] * kd_term)
        if (cfg["teacher_entropy_weight"]
                and isinstance(self.teacher_mixture.logits, nn.Parameter)):
            loss = loss - cfg["teacher_entropy_weight"] * self.teacher_mixture.entropy() / n_micro
        l2 = torch.zeros((), device=loss.device)
        if self.init_params is not None:
            l2 = sum((p - p0).square().sum()
                     for p, p0 in zip(self.student.parameters(), self.init_params))
            loss = loss + cfg["l2_init_weight"] * l2 / n_micro
        stats = {"ce": outputs.ce.detach(), "kv": kv_matrix.detach(), "kd": kd_term.detach(),
                 "cos": torch.stack(cosines, dim=1), "l2": l2.detach() / n_micro,
                 "tokens": batch.attention_mask.sum().to(kv_matrix.dtype)}
        return loss, stats

    def kd_terms(self, logits, batch, kd_items):
        """{KD teacher: this micro-batch's share of its step KD}, each by its teacher's kind."""
        terms, temperature = {}, self.loss_cfg["kd_temperature"]
        for name, items in kd_items.items():
            targets, stored = batch.teachers[name], batch.teachers[name].logits
            share = targets.kd_mask.sum() / max(int(items), 1)
            if targets.kd_kind == "uld":
                term = uld_loss(logits, stored["top_logp"], stored["tail_logp"], targets.kd_mask,
                                temperature)
            else:
                term = kd_loss(logits, stored["top_ids"], stored["top_logp"], stored["tail_logp"],
                               targets.kd_mask, temperature)
            terms[name] = share * term
        return terms

    def kd_term(self, logits, batch, kd_items):
        """The KD teachers' terms of this micro-batch combined (0 without any): their mean, or
        under teacher_weighting validation their sum weighted by each teacher's weight, so a
        teacher switched off distils neither its KV nor its logits."""
        terms = self.kd_terms(logits, batch, kd_items)
        if not terms:
            return torch.zeros((), device=batch.input_ids.device)
        if self.teacher_mixture.mode == "validation":
            weights = self.teacher_mixture.weights()[0]
            return sum(weights[self.teachers.index(name)] * term for name, term in terms.items())
        return torch.stack(list(terms.values())).mean()

    def objective(self, ce, kv_matrix, l2, kd=0.0):
        """The logged loss of a step from its summed statistics: what the student minimises."""
        cfg = self.loss_cfg
        with torch.no_grad():
            total = (cfg["ce_weight"] * ce
                     + cfg["kv_weight"] * self.teacher_mixture(kv_matrix, self.kv_layers)
                     + cfg["kd_weight"] * kd + cfg["l2_init_weight"] * l2)
            if (cfg["teacher_entropy_weight"]
                    and isinstance(self.teacher_mixture.logits, nn.Parameter)):
                total = total - cfg["teacher_entropy_weight"] * self.teacher_mixture.entropy()
        return float(total)


def kd_masks(batch, kd_items):
    """The positions whose student logits the KD teachers of `kd_items` distil."""
    return [batch.teachers[name].kd_mask for name in kd_items or {}]


def kv_layers(exclude, n_layers):
    """The student layers (indices) whose KV terms the loss averages: all but
    train.kv_exclude_layers, which must name layers the student has and leave one."""
    beyond = [layer for layer in exclude if layer >= n_layers]
    if beyond:
        raise KavaError(f"train.kv_exclude_layers names layer {beyond[0]}, but the student has "
                        f"{n_layers} layers (0-{n_layers - 1})")
    kept = [layer for layer in range(n_layers) if layer not in exclude]
    if not kept:
        raise KavaError(f"train.kv_exclude_layers excludes all {n_layers} student layers: no KV "
                        f"loss is left (set kv_weight 0 for a CE-only arm)")
    return kept


def build_projectors(layer_maps, teacher_shapes, student_shape, cfg):
    """One KVProjector per teacher (dict, in teacher order). projector auto: the identity where
    the teacher's KV has the student's shape, else a ridge-fitted dense map; for a teacher of
    kv_loss relation (kava.config.teacher_kv_losses) none at all (any shapes, relation_heads dividing both joined widths), and a
    projector setting other than auto is refused: a map would only add parameters the loss
    is invariant to, or let student and map co-adapt."""
    projectors, losses = {}, teacher_kv_losses(cfg, list(layer_maps))
    for name in layer_maps:
        kind = cfg["projector"]
        if losses[name] == "relation":
            if kind != "auto":
                raise KavaError(f"train.projector {kind} with kv_loss relation: the relation loss "
                                f"compares KV without a projector; set projector auto")
            reason = relation_width_error(cfg["relation_heads"], {
                "the student": math.prod(student_shape),
                f"teacher {name}": math.prod(teacher_shapes[name])})
            if reason:
                raise KavaError(reason)
            kind = "none"
        elif kind == "auto":
            kind = "identity" if tuple(teacher_shapes[name]) == tuple(student_shape) else "ridge"
        projectors[name] = KVProjector(layer_maps[name], teacher_shapes[name], student_shape, kind,
                                       cfg["projector_hidden"], cfg["projector_direction"])
        if cfg["freeze_projector"]:
            projectors[name].requires_grad_(False)
    return projectors


@torch.no_grad()
def teacher_kv_std(store, layers, max_examples):
    """{layer: (std of K, std of V)} of a teacher's stored KV over the tokens of its first
    `max_examples` examples: the fixed scale kv_std_norm divides by."""
    sums = {layer: torch.zeros(2, 3, dtype=torch.float64) for layer in layers}
    for i in range(min(len(store), max_examples)):
        example = store.example(i)
        for layer in layers:
            for which, x in enumerate((example["k"][layer], example["v"][layer])):
                x = x.double()
                sums[layer][which] += torch.stack([torch.tensor(float(x.numel())), x.sum(),
                                                   x.square().sum()])
    stds = {}
    for layer, (k, v) in sums.items():
        stds[layer] = tuple(float(((s[2] / s[0]) - (s[1] / s[0]) ** 2).clamp_min(1e-12).sqrt())
                            for s in (k, v))
    return stds


@torch.no_grad()
def fit_ridge_projectors(distiller, batches, ridge):
    """Fit every ridge projector in closed form on the KV pairs of `batches` (train micro-batches
    from the initial student), in the projector's direction, before training starts."""
    ridge_teachers = [name for name, p in distiller.projectors.items() if p.kind == "ridge"]
    if not ridge_teachers:
        return
    pairs = {name: {} for name in ridge_teachers}
    for batch in batches:
        student_kv = student_forward(distiller.student, batch, distiller.key_space).kv
        for name in ridge_teachers:
            projector, targets = distiller.projectors[name], batch.teachers[name]
            mask = targets.mask
            for layer, teacher_layer in enumerate(projector.layer_map):
                if teacher_layer is None:
                    continue
                for which in (0, 1):
                    s, t = student_kv[layer][which][mask], targets.kv[teacher_layer][which][mask]
                    x, y = (t, s) if projector.direction == "teacher_to_student" else (s, t)
                    pairs[name].setdefault((layer, which), []).append((x.float(), y.float()))
    for name in ridge_teachers:
        for (layer, which), chunks in pairs[name].items():
            x = torch.cat([c[0] for c in chunks])
            y = torch.cat([c[1] for c in chunks])
            if len(x) < 2:
                raise KavaError(f"ridge projector of teacher {name}: fewer than 2 aligned train "
                                f"tokens to fit it on")
            distiller.projectors[name].set_ridge(layer, "kv"[which], x, y, ridge)


def build_teacher_mixture(n_layers, teachers, mode, weights):
    """TeacherMixture from the config: `weights` is null (uniform) or {teacher: weight}."""
    if weights is not None:
        missing = [t for t in teachers if t not in weights]
        if missing:
            raise KavaError(f"train.teacher_weights has no weight for teacher(s) "
                            f"{', '.join(missing)}")
        weights = [float(weights[t]) for t in teachers]
    return TeacherMixture(n_layers, len(teachers), mode, weights)


def loss_terms(distiller, batch, ce_items, kv_items, kd_items=None):
    """{term: loss with autograd} of one micro-batch, each its share of the step's term and not
    yet weighted: "ce", "kv/<teacher>" for every teacher (whether or not the arm trains on it)
    and "kd/<teacher>" for each KD teacher in `kd_items`."""
    outputs = student_forward(distiller.student, batch, distiller.key_space, ce_items,
                              kd_masks(batch, kd_items))
    student_kv = outputs.kv
    terms = {"ce": outputs.ce}
    for t, name in enumerate(distiller.teachers):
        targets = batch.teachers[name]
        pred, target = compared_pairs(distiller.projectors[name], student_kv, targets.kv)
        share = targets.mask.sum() / max(int(kv_items[name]), 1)
        losses, _ = layer_scores(pred, target, targets.mask, distiller.loss_cfg,
                                 distiller.kv_losses[name], distiller.teacher_std[t])
        terms[f"kv/{name}"] = losses[distiller.kv_layers].mean() * share
    for name, term in distiller.kd_terms(outputs.logits, batch, kd_items or {}).items():
        terms[f"kd/{name}"] = term
    return terms


def student_gradients(distiller, batches, terms_of):
    """{name: gradient w.r.t. the student's trainable parameters, flattened and summed over
    `batches`} of each loss terms_of(batch) returns ({name: loss}). Gradients only: nothing is
    accumulated into .grad, no state changes."""
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    total = {}
    for batch in batches:
        for name, loss in terms_of(batch).items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                              for p, g in zip(params, grads)])
            total[name] = flat if name not in total else total[name] + flat
    return total


def answer_ce_gradient(distiller, batches, ce_items):
    """The student's gradient (flattened) of the mean answer CE over `batches`, whose answer
    tokens number `ce_items` in all."""
    return student_gradients(distiller, batches, lambda batch: {"ce": student_forward(
        distiller.student, batch, distiller.key_space, ce_items).ce})["ce"]


def gradient_cosine(gradient, reference):
    """Cosine between two flattened gradients (0 when either is zero)."""
    return float(gradient @ reference / (gradient.norm() * reference.norm()).clamp_min(1e-30))


def gradient_agreement(distiller, batch, ce_items, kv_items, held_out, held_out_ce_items):
    """{term: cosine} between the student's gradient of each loss term on `batch` ("ce", and
    "kv/<teacher>" for every teacher, whether or not the arm trains on it) and the gradient of
    the answer CE on `held_out` examples that training never sees. A term whose gradient points
    along the held-out CE gradient (cosine > 0) helps generalisation at this point; one near 0
    or below does not. Gradients only: nothing is accumulated into .grad, no state changes."""
    reference = answer_ce_gradient(distiller, [held_out], held_out_ce_items)
    gradients = student_gradients(distiller, [batch], lambda b: loss_terms(distiller, b,
                                                                          ce_items, kv_items))
    return {term: gradient_cosine(grad, reference) for term, grad in gradients.items()}


def validation_weights(gradients, reference):
    """(weights, cosines), two `[n_teachers]` tensors, from each teacher's loss gradient and
    the validation answer-CE gradient: weight = max(0, cosine) ÷ the largest such, so the
    best-aligned teacher counts as much as it would alone and another counts by its alignment
    relative to that one's. Normalising to sum to 1 instead (as fixed weights are) let a weaker
    but positively aligned teacher shrink the best one's term (README, "Teachers of another
    shape"). A run whose other teachers are switched off trains exactly as the one teacher alone would. A
    teacher whose term points away from the validation gradient gets 0 until it aligns again;
    when none points along it, all get 0 and the arm trains on CE alone until one does."""
    cosines = torch.tensor([gradient_cosine(grad, reference) for grad in gradients])
    positive = cosines.clamp_min(0)
    best = positive.max()
    return (positive / best if best > 0 else positive), cosines


def validation_weighting(distiller, batches, ce_items, kv_items, kd_items, validation_batches,
                         validation_ce_items):
    """teacher_weighting validation (after the gradient-alignment selection of auxiliary tasks,
    Du et al. 2018, arXiv 1812.02224, with validation rows as the main task): set each
    teacher's weight from how its loss term on the step's micro-batches `batches` (kv_weight·KV
    + kd_weight·KD, the part its weight scales) aligns with the answer CE on the validation
    rows. Returns {teacher: {"cosine", "weight"}}."""
    cfg = distiller.loss_cfg

    def teacher_terms(batch):
        terms = loss_terms(distiller, batch, ce_items, kv_items, kd_items)
        return {name: cfg["kv_weight"] * terms[f"kv/{name}"]
                + cfg["kd_weight"] * terms.get(f"kd/{name}", 0.0) for name in distiller.teachers}

    reference = answer_ce_gradient(distiller, validation_batches, validation_ce_items)
    gradients = student_gradients(distiller, batches, teacher_terms)
    weights, cosines = validation_weights([gradients[name] for name in distiller.teachers],
                                          reference)
    distiller.teacher_mixture.set_weights(weights)
    return {name: {"cosine": float(c), "weight": float(w)}
            for name, c, w in zip(distiller.teachers, cosines, weights)}
