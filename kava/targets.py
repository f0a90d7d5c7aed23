"""The KV targets of the control arms (train.kv_target self and token_mean), served as stores.

A control replaces what the KV loss pulls toward and nothing else: its targets are read like a
teacher's store (`example(i)`: input_ids, char_spans, K and V per layer), so batching, time
alignment, the projector, kv_std_norm (the std of these targets) and the loss run unchanged.

self: the student's own KV before training, each student layer against itself (identity layer
    map; equal shapes, so projector auto is the identity): anchoring without a teacher. Computed
    once at setup in fp32 over the train examples and held in memory, which suits the few-row
    regime these controls are for.
token_mean: at each teacher token, the teacher's mean K and V of that token id over its whole
    train store, per stored layer: content-free (one vector per token id, blind to the example
    and the position) but not wrong content, unlike shuffled. Pre-RoPE, a layer-0 K/V depends on
    the token only, so there the mean is the teacher's own.
"""

import torch

from kava.batching import collate
from kava.capture import student_forward


class TargetStore:
    """A store-like view of a control's KV targets: `example(i)` for i < len(self); manifest
    and path stay the teacher store's (what the run's checkpoints and records identify)."""

    def __init__(self, teacher_store, n_examples, example, layers, kv_shape, logits):
        self.manifest, self.path = teacher_store.manifest, teacher_store.path
        self.layers, self.kv_shape, self.logits = list(layers), tuple(kv_shape), logits
        self._n, self._example = n_examples, example

    def __len__(self):
        return self._n

    def example(self, i):
        return self._example(i)


@torch.no_grad()
def initial_student_kv(student, students, key_space, pad_id, batch_size):
    """[{id, input_ids, char_spans, k {layer: [T, H, D]}, v {...}}] per student example: the
    KV of `student` (as it is now, before training) in the stores' key space, fp32."""
    targets = []
    for start in range(0, len(students), batch_size):
        chunk = students[start:start + batch_size]
        # Right-padded and masked: a real token's KV does not depend on the padding after it.
        kv = student_forward(student, collate(chunk, {}, pad_id, "auto"), key_space).kv
        for b, s in enumerate(chunk):
            n = len(s["input_ids"])
            targets.append({"id": s["id"], "input_ids": s["input_ids"],
                            "char_spans": s["char_spans"],
                            "k": {layer: k[b, :n].float() for layer, (k, _) in enumerate(kv)},
                            "v": {layer: v[b, :n].float() for layer, (_, v) in enumerate(kv)}})
    return targets


def self_targets(teacher_stores, student, students, key_space, pad_id, batch_size):
    """kv_target self: {teacher: TargetStore of the student's own initial KV}, example i being
    students[i]; computed once, shared by every teacher the arm names."""
    kv = initial_student_kv(student, students, key_space, pad_id, batch_size)
    return {name: TargetStore(store, len(kv), kv.__getitem__, range(len(kv[0]["k"])),
                              kv[0]["k"][0].shape[1:], None)
            for name, store in teacher_stores.items()}


@torch.no_grad()
def token_mean_kv(store, layers):
    """(sorted token ids [U], {layer: (mean K, mean V) each [U, H, D] fp32}): the mean of each
    token id's K and V over every example of `store`, accumulated in float64."""
    ids = [store.example(i)["input_ids"] for i in range(len(store))]
    vocab = torch.unique(torch.cat(ids))
    counts = torch.zeros(len(vocab), dtype=torch.float64)
    sums = {(layer, kind): torch.zeros(len(vocab), *store.kv_shape, dtype=torch.float64)
            for layer in layers for kind in "kv"}
    for i in range(len(store)):
        example = store.example(i)
        rows = torch.searchsorted(vocab, example["input_ids"])
        counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
        for (layer, kind), total in sums.items():
            total.index_add_(0, rows, example[kind][layer].double())
    means = {key: (total / counts.view(-1, 1, 1)).float() for key, total in sums.items()}
    return vocab, {layer: (means[layer, "k"], means[layer, "v"]) for layer in layers}


def token_mean_targets(teacher_store, layers):
    """kv_target token_mean: a TargetStore over the teacher's own examples (its tokens, spans
    and any stored logits) whose K and V of `layers` are the token-id means of token_mean_kv."""
    vocab, means = token_mean_kv(teacher_store, layers)

    def example(i):
        stored = teacher_store.example(i)
        rows = torch.searchsorted(vocab, stored["input_ids"])
        return {**stored, "k": {layer: k[rows] for layer, (k, _) in means.items()},
                "v": {layer: v[rows] for layer, (_, v) in means.items()}}

    return TargetStore(teacher_store, len(teacher_store), example, layers,
                       teacher_store.kv_shape, teacher_store.logits)
