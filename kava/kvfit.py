"""How well a student's KV matches its teachers', measured away from training: the held-out
raw cosine through the trained projectors, the held-out fit of a ridge probe over a content-free
baseline, and the CKA layer maps.

Raw cosine says little alone: keys are dominated by their per-head mean, so a content-free
predictor (each head's mean K/V) already scores a high cosine. The probe's R² is measured over
exactly that baseline: 1 − SSE(probe) / SSE(per-channel train mean), on held-out tokens, where
the probe is a ridge map from the student's KV at a layer to the teacher's KV at the mapped
layer, fitted on train-split tokens. 0 means the student's KV holds no more linearly readable
teacher information than a constant; 1 means it determines the teacher's KV.
"""

import torch

from kava.batching import (align_teacher, collate, pad_id, right_pad, shared_key_space,
                           store_positions, student_example, teacher_inputs)
from kava.capture import decoder_layers, forward_kv, student_forward
from kava.errors import KavaError
from kava.layer_maps import cka_layer_map
from kava.losses import masked_cosine
from kava.projector import compared_pairs, ridge_solution


def _known_kv(known, students, width, device):
    """The students' KV per layer, `[B, width, H, D]` right-padded with zeros (padding is masked
    everywhere), from `known` (answer_nll's capture, one per student); None unless every one
    holds exactly the student's tokens (the probe's tokenisation, cut at max_length)."""
    if any(k is None or len(k["input_ids"]) < len(s["input_ids"])
           or not torch.equal(k["input_ids"][:len(s["input_ids"])], s["input_ids"])
           for k, s in zip(known, students)):
        return None

    def padded(layer, which):
        return right_pad([k["kv"][layer][which][:len(s["input_ids"])]
                     for k, s in zip(known, students)], 0.0, width).to(device)

    return [(padded(layer, 0), padded(layer, 1)) for layer in range(len(known[0]["kv"]))]


def aligned_batches(student, stores, layers, rows, tokenizer, max_length, batch_size, key_space,
                    time_alignment, known_kv=None):
    """(student KV per layer, batch) over `rows` in batches: the student's KV without gradients
    and each teacher's stored KV of `layers[teacher]` aligned to the student's tokens.
    known_kv: per row, the student's KV from a forward already run over it (answer_nll's
    capture), used where its tokens are the row's; a forward otherwise."""
    device = next(student.parameters()).device
    for start in range(0, len(rows), batch_size):
        students = [student_example(tokenizer, row, max_length)
                    for row in rows[start:start + batch_size]]
        positions = {name: store_positions(store, [s["id"] for s in students], name)
                     for name, store in stores.items()}
        teachers = teacher_inputs(stores, positions, range(len(students)), layers)
        batch = collate(students, teachers, pad_id(tokenizer), time_alignment).to(device)
        student_kv = known_kv and _known_kv(known_kv[start:start + batch_size], students,
                                            batch.input_ids.shape[1], device)
        if not student_kv:
            with torch.no_grad():
                student_kv = student_forward(student, batch, key_space).kv
        yield student_kv, batch


def _summary(per_layer):
    """{"overall", "per_teacher", "per_layer"} of per-layer scores, the shape eval_record takes."""
    per_teacher = {name: sum(values) / len(values) for name, values in per_layer.items()}
    return {"overall": sum(per_teacher.values()) / len(per_teacher), "per_teacher": per_teacher,
            "per_layer": per_layer}


class _Cosines:
    """Raw cosine sums per teacher and student layer, compared as in training (one side
    projected), weighted by valid tokens."""

    def __init__(self, student, projectors):
        self.projectors = projectors
        self.sums = {name: torch.zeros(len(decoder_layers(student)), dtype=torch.float64)
                     for name in projectors}
        self.counts = dict.fromkeys(projectors, 0)

    def add(self, student_kv, batch):
        for name, projector in self.projectors.items():
            targets = batch.teachers[name]
            n_valid = int(targets.mask.sum())
            pred, target = compared_pairs(projector, student_kv, targets.kv)
            for layer, (pair, target_pair) in enumerate(zip(pred, target)):
                if target_pair is None:  # a layer the map leaves out (minilm): no cosine
                    self.sums[name][layer] = float("nan")
                    continue
                (pk, pv), (tk, tv) = pair, target_pair
                cos = (masked_cosine(pk, tk, targets.mask) + masked_cosine(pv, tv, targets.mask)) / 2
                self.sums[name][layer] += float(cos) * n_valid
            self.counts[name] += n_valid

    def scores(self):
        return _summary({name: (self.sums[name] / max(self.counts[name], 1)).tolist()
                         for name in self.projectors})


class _ProbeTokens:
    """{teacher: {(student layer, 0 for K / 1 for V): (student `[N, Hs·Ds]`, teacher `[N, Ht·Dt]`)}}
    over the valid tokens of the batches added."""

    def __init__(self, layer_maps):
        self.layer_maps = layer_maps
        self.chunks = {name: {} for name in layer_maps}

    def add(self, student_kv, batch):
        for name, mapping in self.layer_maps.items():
            targets = batch.teachers[name]
            for layer, teacher_layer in enumerate(mapping):
                for which in (0, 1):
                    x = student_kv[layer][which][targets.mask].flatten(1).float().cpu()
                    y = targets.kv[teacher_layer][which][targets.mask].flatten(1).float().cpu()
                    self.chunks[name].setdefault((layer, which), []).append((x, y))

    def tensors(self):
        return {name: {key: (torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts]))
                       for key, parts in per_teacher.items()}
                for name, per_teacher in self.chunks.items()}


def _collect(accumulators, student, stores, layers, rows, tokenizer, max_length, batch_size,
             key_space, time_alignment, known_kv=None):
    """One pass over `rows` (aligned_batches), every batch given to each accumulator."""
    for student_kv, batch in aligned_batches(student, stores, layers, rows, tokenizer, max_length,
                                             batch_size, key_space, time_alignment, known_kv):
        for accumulator in accumulators:
            accumulator.add(student_kv, batch)
    return accumulators


@torch.no_grad()
def kv_cosine(student, projectors, stores, rows, tokenizer, max_length, batch_size, key_space,
              time_alignment):
    """Raw held-out KV cosine of a trained student and its projectors on `rows` (e.g. the test
    split) against the teachers' stored KV, compared as in training (one side projected): mean
    over valid tokens, heads, and K and V.

    stores: {teacher: KVStore}. Returns {"overall", "per_teacher": {t: float},
    "per_layer": {t: [float per student layer]}}, the shape kava.evaluate.eval_record takes."""
    layers = {name: sorted(set(projector.layer_map) - {None})
              for name, projector in projectors.items()}
    cosines, = _collect([_Cosines(student, projectors)], student,
                        {n: stores[n] for n in projectors}, layers, rows, tokenizer, max_length,
                        batch_size, key_space, time_alignment)
    return cosines.scores()


def _probe_r2(fit, held_out, layer_maps, ridge):
    """Held-out R² per teacher and student layer (the mean of K and V) of ridge probes fitted
    on `fit` and scored on `held_out` (_ProbeTokens.tensors)."""
    per_layer = {}
    for name, mapping in layer_maps.items():
        scores = []
        for layer in range(len(mapping)):
            r2 = []
            for which in (0, 1):
                (x, y), (x_test, y_test) = fit[name][(layer, which)], held_out[name][(layer, which)]
                if len(x) < 2 or len(x_test) < 1:
                    raise KavaError(f"kv probe of teacher {name}: too few aligned tokens "
                                    f"({len(x)} train, {len(x_test)} test)")
                weight, bias = ridge_solution(x, y, ridge)
                sse = (y_test - x_test @ weight.T - bias).double().square().sum()
                baseline = (y_test - y.mean(0)).double().square().sum()
                r2.append(float(1 - sse / baseline.clamp_min(1e-30)))
            scores.append(sum(r2) / 2)
        per_layer[name] = scores
    return _summary(per_layer)


def _probe_fit(student, tokenizer, train_stores, layer_maps, train_rows, *args):
    layers = {name: sorted(set(m)) for name, m in layer_maps.items()}
    probe, = _collect([_ProbeTokens(layer_maps)], student, train_stores, layers, train_rows,
                      tokenizer, *args)
    return probe.tensors()


@torch.no_grad()
def kv_probe_r2(student, tokenizer, train_stores, test_stores, layer_maps, train_rows, test_rows,
                max_length, batch_size, ridge, key_space, time_alignment):
    """Held-out R² of a ridge probe from the student's KV to each teacher's (module docstring),
    per teacher and student layer, the mean of K and V. layer_maps: {teacher: [teacher layer per
    student layer]}. Returns {"overall", "per_teacher", "per_layer"} like kv_cosine."""
    args = (max_length, batch_size, key_space, time_alignment)
    fit = _probe_fit(student, tokenizer, train_stores, layer_maps, train_rows, *args)
    layers = {name: sorted(set(m)) for name, m in layer_maps.items()}
    held_out, = _collect([_ProbeTokens(layer_maps)], student, test_stores, layers, test_rows,
                         tokenizer, *args)
    return _probe_r2(fit, held_out.tensors(), layer_maps, ridge)


@torch.no_grad()
def heldout_scores(student, tokenizer, projectors, train_stores, test_stores, layer_maps,
                   train_rows, test_rows, max_length, batch_size, ridge, key_space,
                   time_alignment, test_kv=None):
    """{"cosine": kv_cosine on the projectors' teachers, "r2": kv_probe_r2 on every teacher of
    `layer_maps`}, with one pass of the student over the test rows for both (the evaluation's
    held-out KV fit; two passes were a sizeable part of an evaluation's time), or none where
    `test_kv` (aligned_batches' known_kv) already holds the student's KV of a row."""
    args = (max_length, batch_size, key_space, time_alignment)
    fit = _probe_fit(student, tokenizer, train_stores, layer_maps, train_rows, *args)
    layers = {name: sorted((set(layer_maps[name]) | set(projectors[name].layer_map
                                                        if name in projectors else ())) - {None})
              for name in layer_maps}
    cosines, held_out = _collect([_Cosines(student, projectors), _ProbeTokens(layer_maps)],
                                 student, test_stores, layers, test_rows, tokenizer, *args,
                                 known_kv=test_kv)
    return {"cosine": cosines.scores(),
            "r2": _probe_r2(fit, held_out.tensors(), layer_maps, ridge)}


@torch.no_grad()
def cka_layer_maps(student, tokenizer, stores, rows, max_length, time_alignment):
    """Per teacher, the stored teacher layer whose K has the highest linear CKA with each
    student layer's K (in the stores' key space, heads flattened), over the aligned tokens of
    `rows`.

    Returns {teacher: {"layer_map": [...], "teacher_layers": [...], "scores": [[...]]}}."""
    layers = range(len(decoder_layers(student)))
    device = next(student.parameters()).device
    students = [student_example(tokenizer, row, max_length) for row in rows]
    student_feats = {i: [] for i in layers}
    key_space = shared_key_space(stores)
    for s in students:
        ids = s["input_ids"][None].to(device)
        kv = forward_kv(student, ids, torch.ones_like(ids), layers, key_space)
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
