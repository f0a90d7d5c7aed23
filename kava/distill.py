"""What is trained and how it is scored: the student, one KV projector per teacher, the teacher
weights, and the loss

    total = ce_weight·CE + kv_weight·Σ_t w_t·KV_t  [− entropy_weight·H(w)]

KV_t is, per student layer, the mean of kava.losses.kv_loss over K and over V between the
student's KV and the teacher's aligned, projected KV, on valid tokens only (real, aligned
student tokens); Σ_t w_t is kava.losses.TeacherWeights (per layer, then averaged over layers).

The CE baseline (kv_weight 0) still fits its projectors when `probe_projector` is on: the
student's KV enters that fit detached, so the student trains on CE alone, while the projector
learns the best map from teacher KV to this student's KV. Then "KV cosine" means the same
thing for every arm: how well a trained projector predicts the student's KV from the teacher's.
"""

import torch
from torch import nn

from kava.align import cka_layer_map, explicit_layer_map, ratio_layer_map
from kava.batching import (align_teacher, collate, store_positions, student_example,
                           teacher_inputs)
from kava.capture import KEY_SPACES, decoder_layers, forward_kv, pre_rope_hooks
from kava.errors import KavaError
from kava.losses import TeacherWeights, kv_loss, masked_cosine, masked_std
from kava.projector import KVProjector

LAYER_MAPS = ("ratio", "explicit", "cka")


def layer_map(mode, n_student, n_teacher, teacher, stored_layers, explicit=None, cka=None):
    """The teacher layer each student layer learns from, checked against what the teacher's KV
    store holds (precompute may have stored only some layers)."""
    if mode == "ratio":
        mapping = ratio_layer_map(n_student, n_teacher)
    elif mode == "explicit":
        if teacher not in (explicit or {}):
            raise KavaError(f"train.layer_map is explicit but train.explicit_layer_map has no "
                            f"entry for teacher {teacher}")
        mapping = explicit_layer_map(explicit[teacher], n_student, n_teacher, teacher)
    elif mode == "cka":
        if teacher not in (cka or {}):
            raise KavaError(f"train.layer_map is cka but no CKA layer map was given for "
                            f"teacher {teacher}")
        mapping = explicit_layer_map(cka[teacher]["layer_map"], n_student, n_teacher, teacher)
    else:
        raise KavaError(f"unknown layer map {mode!r}; choose one of {', '.join(LAYER_MAPS)}")
    stored = set(stored_layers)
    for student_layer, teacher_layer in enumerate(mapping):
        if teacher_layer not in stored:
            raise KavaError(f"student layer {student_layer} maps to teacher {teacher} layer "
                            f"{teacher_layer}, which its KV store does not hold (stored layers: "
                            f"{sorted(stored)}); precompute it or change the layer map")
    return mapping


def student_forward(model, batch, key_space="pre_rope", ce_items=None):
    """One student forward: the model's outputs (with the answer CE when batch.labels is set)
    and its K, V per layer, `[B, T, H, D]`, in the store's key space, with autograd.

    ce_items: answer tokens of the whole (accumulated, all-GPU) batch: the CE is this
    micro-batch's summed token loss divided by it, so micro-batches weigh by tokens."""
    if key_space not in KEY_SPACES:
        raise KavaError(f"key_space '{key_space}' is not one of {', '.join(KEY_SPACES)}")
    layers = range(len(decoder_layers(model)))
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if ce_items is not None:
        kwargs.update(labels=batch.labels, num_items_in_batch=max(int(ce_items), 1))
    else:
        kwargs["logits_to_keep"] = 1  # no CE: skip the LM head over the whole sequence
    if key_space == "pre_rope":
        with pre_rope_hooks(model, layers) as captured:
            outputs = model(**kwargs, use_cache=False)
        return outputs, [(captured[i]["k"], captured[i]["v"]) for i in layers]
    from transformers import DynamicCache

    # Post-RoPE keys are what the attention caches; a config-less DynamicCache keeps every
    # layer at full length (the model's own cache would truncate sliding-window layers).
    cache = DynamicCache()
    outputs = model(**kwargs, use_cache=True, past_key_values=cache)
    return outputs, [(cache.layers[i].keys.transpose(1, 2), cache.layers[i].values.transpose(1, 2))
                     for i in layers]


def layer_scores(student_kv, projected, mask, loss_cfg):
    """KV loss and cosine of one teacher, per student layer: two `[n_layers]` tensors (loss with
    autograd, cosine detached), each the mean over K and V on the valid tokens."""
    losses, cosines = [], []
    for (sk, sv), (pk, pv) in zip(student_kv, projected):
        per_kv = []
        for s, p in ((sk, pk), (sv, pv)):
            std = masked_std(p, mask) if loss_cfg["kv_std_norm"] else None
            per_kv.append(kv_loss(s, p, mask, loss_cfg["kv_loss"], alpha=loss_cfg["kv_alpha"],
                                  beta=loss_cfg["kv_beta"], std=std))
        losses.append((per_kv[0] + per_kv[1]) / 2)
        with torch.no_grad():
            cosines.append((masked_cosine(sk, pk, mask) + masked_cosine(sv, pv, mask)) / 2)
    return torch.stack(losses), torch.stack(cosines)


class Distiller(nn.Module):
    """Student + projectors + teacher weights in one module, so that DDP sees every trained
    parameter. forward(batch) returns the micro-batch's share of the step's loss and its
    statistics (detached; summed over micro-batches and GPUs they give the step's values)."""

    def __init__(self, student, projectors, teacher_weights, loss_cfg, key_space="pre_rope"):
        super().__init__()
        self.student = student
        self.projectors = nn.ModuleDict(projectors)
        self.teacher_weights = teacher_weights
        self.loss_cfg = dict(loss_cfg)
        self.key_space = key_space

    @property
    def teachers(self):
        return list(self.projectors)

    def forward(self, batch, ce_items, kv_items, n_micro):
        """ce_items: answer tokens of the whole step; kv_items: {teacher: valid tokens of the
        whole step}; n_micro: micro-batches this process runs in the step."""
        cfg = self.loss_cfg
        outputs, student_kv = student_forward(self.student, batch, self.key_space, ce_items)
        kv_on_student = cfg["kv_weight"] > 0
        if not kv_on_student:
            student_kv = [(k.detach(), v.detach()) for k, v in student_kv]
        kv_losses, cosines = [], []
        for name in self.teachers:
            targets = batch.teachers[name]
            projected = self.projectors[name](targets.kv)
            share = targets.mask.sum() / max(int(kv_items[name]), 1)
            losses, cos = layer_scores(student_kv, projected, targets.mask, cfg)
            kv_losses.append(losses * share)
            cosines.append(cos * share)
        kv_matrix = torch.stack(kv_losses, dim=1)  # [n_layers, n_teachers]
        kv_term = self.teacher_weights(kv_matrix)
        kv_coefficient = cfg["kv_weight"] if kv_on_student else float(cfg["probe_projector"])
        loss = cfg["ce_weight"] * outputs.loss + kv_coefficient * kv_term
        if cfg["teacher_entropy_weight"] and isinstance(self.teacher_weights.logits, nn.Parameter):
            loss = loss - cfg["teacher_entropy_weight"] * self.teacher_weights.entropy() / n_micro
        stats = {"ce": outputs.loss.detach(), "kv": kv_matrix.detach(),
                 "cos": torch.stack(cosines, dim=1),
                 "tokens": batch.attention_mask.sum().to(kv_matrix.dtype)}
        return loss, stats

    def objective(self, ce, kv_matrix):
        """The logged loss of a step from its summed statistics: what the student minimises."""
        cfg = self.loss_cfg
        with torch.no_grad():
            total = cfg["ce_weight"] * ce + cfg["kv_weight"] * self.teacher_weights(kv_matrix)
            if (cfg["teacher_entropy_weight"]
                    and isinstance(self.teacher_weights.logits, nn.Parameter)):
                total = total - cfg["teacher_entropy_weight"] * self.teacher_weights.entropy()
        return float(total)


def build_projectors(layer_maps, teacher_shapes, student_shape, kind, hidden):
    """One KVProjector per teacher (dict, in teacher order)."""
    return {name: KVProjector(layer_maps[name], teacher_shapes[name], student_shape, kind, hidden)
            for name in layer_maps}


def teacher_weights(n_layers, teachers, mode, weights):
    """TeacherWeights from the config: `weights` is null (uniform) or {teacher: weight}."""
    if weights is not None:
        missing = [t for t in teachers if t not in weights]
        if missing:
            raise KavaError(f"train.teacher_weights has no weight for teacher(s) "
                            f"{', '.join(missing)}")
        weights = [float(weights[t]) for t in teachers]
    return TeacherWeights(n_layers, len(teachers), mode, weights)


@torch.no_grad()
def kv_cosine(student, projectors, stores, rows, tokenizer, max_length, batch_size,
              key_space="pre_rope", time_alignment="auto"):
    """Held-out KV cosine of a trained student and its projectors on `rows` (e.g. the test
    split) against the teachers' stored KV: mean over valid tokens, heads, and K and V.

    stores: {teacher: KVStore}. Returns {"overall", "per_teacher": {t: float},
    "per_layer": {t: [float per student layer]}}, the shape kava.evaluate.eval_record takes."""
    device = next(student.parameters()).device
    sums = {name: torch.zeros(len(decoder_layers(student)), dtype=torch.float64)
            for name in projectors}
    counts = dict.fromkeys(projectors, 0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    layers = {name: sorted(set(projector.layer_map)) for name, projector in projectors.items()}
    for start in range(0, len(rows), batch_size):
        students = [student_example(tokenizer, row, max_length)
                    for row in rows[start:start + batch_size]]
        positions = {name: store_positions(stores[name], [s["id"] for s in students], name)
                     for name in projectors}
        teachers = teacher_inputs({name: stores[name] for name in projectors}, positions,
                                  range(len(students)), layers)
        batch = collate(students, teachers, pad_id, time_alignment).to(device)
        _, student_kv = student_forward(student, batch, key_space)
        for name, projector in projectors.items():
            targets = batch.teachers[name]
            n_valid = int(targets.mask.sum())
            projected = projector(targets.kv)
            for layer, ((sk, sv), (pk, pv)) in enumerate(zip(student_kv, projected)):
                cos = (masked_cosine(sk, pk, targets.mask) + masked_cosine(sv, pv, targets.mask)) / 2
                sums[name][layer] += float(cos) * n_valid
            counts[name] += n_valid
    per_layer = {name: (sums[name] / max(counts[name], 1)).tolist() for name in projectors}
    per_teacher = {name: sum(values) / len(values) for name, values in per_layer.items()}
    return {"overall": sum(per_teacher.values()) / len(per_teacher), "per_teacher": per_teacher,
            "per_layer": per_layer}


@torch.no_grad()
def cka_layer_maps(student, tokenizer, stores, rows, max_length, time_alignment="auto"):
    """Per teacher, the stored teacher layer whose K has the highest linear CKA with each
    student layer's K (in the stores' key space, heads flattened), over the aligned tokens of
    `rows`.

    Returns {teacher: {"layer_map": [...], "teacher_layers": [...], "scores": [[...]]}}."""
    layers = range(len(decoder_layers(student)))
    device = next(student.parameters()).device
    students = [student_example(tokenizer, row, max_length) for row in rows]
    student_feats = {i: [] for i in layers}
    key_spaces = sorted({store.manifest["key_space"] for store in stores.values()})
    if len(key_spaces) != 1:
        raise KavaError(f"the teachers' KV stores mix key spaces {key_spaces}")
    for s in students:
        ids = s["input_ids"][None].to(device)
        kv = forward_kv(student, ids, torch.ones_like(ids), layers, key_spaces[0])
        for i in layers:
            student_feats[i].append(kv[i][0][0].flatten(1).float().cpu())
    maps = {}
    for name, store in stores.items():
        stored = sorted(store.layers)
        s_feats = {i: [] for i in layers}
        t_feats = {layer: [] for layer in stored}
        positions = store_positions(store, [s["id"] for s in students], name)
        for index, s in enumerate(students):
            if positions[index] is None:
                continue
            aligned, valid = align_teacher(s, store.example(positions[index]), stored,
                                           time_alignment)
            for i in layers:
                s_feats[i].append(student_feats[i][index][valid])
            for layer in stored:
                t_feats[layer].append(aligned[layer][0][valid].flatten(1))
        picks, scores = cka_layer_map([torch.cat(s_feats[i]) for i in layers],
                                      [torch.cat(t_feats[layer]) for layer in stored])
        maps[name] = {"layer_map": [stored[p] for p in picks], "teacher_layers": stored,
                      "scores": scores.tolist()}
    return maps
