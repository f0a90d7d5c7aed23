"""Training batches: the student's tokens and answer labels, and each teacher's stored KV
aligned to the student's tokens.

One example, student side (`student_example`):

    text = prompt + answer              # as the student reads it (kava.prompts)
    input_ids, char_spans               # the student's own tokenizer, with character offsets
    labels = input_ids where the token ends past the prompt, else -100

A token that straddles the boundary (GSM8K's prompt ends in "Answer: " and BPE tokenizers
glue that space to the first answer word) holds answer characters, so it is labelled. Under
data.prompt_format chat the tokens after the answer (the template's end of turn) are labelled
too: the student learns to close its turn.

Teacher side (`align_teacher`): the teacher's stored tokens are mapped onto the student's by
`kava.align`: the identity when the stored input_ids equal the student's (same tokenizer),
character-span overlap otherwise, linear interpolation only when the store has no offsets
(or the config asks for it). The aligned KV is `[T_student, H_t, D_t]` in float32; student
tokens no teacher token covers are invalid and stay out of the KV loss.
"""

import hashlib
from dataclasses import dataclass, field

import torch

from kava.align import (boundary_alignment, causal_span_alignment, interpolate_alignment,
                        position_alignment, shared_spans, span_alignment)
from kava.config import schema_enum
from kava.errors import KavaError
from kava.kvstore import LOGIT_TENSORS

IGNORE_INDEX = -100  # what transformers' causal-LM loss skips
# Not settings: "position" is how a kv_target: shuffled arm reads another example's KV,
# "boundary" how kv_loss relation reads a teacher (only where both tokenisations end a token).
TIME_ALIGNMENTS = (*schema_enum("time_alignment"), "position", "boundary")


def student_example(tokenizer, row, max_length):
    """Tokenise one data row (`id`, `prompt`, `text`, and `segments` if kava.prompts rendered
    it in another format than plain) for the student: ids, character spans on the row's plain
    text (kava.prompts), and labels on the answer tokens. Truncated to max_length tokens."""
    if not row["text"].startswith(row["prompt"]):
        raise KavaError(f"row {row['id']}: text does not start with its prompt")
    try:
        encoded = tokenizer(row["text"], return_offsets_mapping=True, truncation=True,
                            max_length=max_length)
    except NotImplementedError:
        raise KavaError("the student's tokenizer gives no character offsets (a slow tokenizer); "
                        "training needs a fast one") from None
    input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    spans = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    answer = (spans[:, 1] > len(row["prompt"])) & (spans[:, 1] > spans[:, 0])
    labels = torch.where(answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if row.get("segments"):
        spans = shared_spans(spans, row["segments"])
    return {"id": row["id"], "input_ids": input_ids, "char_spans": spans, "labels": labels}


def time_alignment(student, teacher, mode):
    """How student tokens read one teacher's stored tokens, for one example: the identity for the
    same tokens; else character spans (auto: overlap; causal: only teacher tokens that have not
    read past the student token), interpolation when the store has no offsets or the config asks
    for it; position: token i reads token i (a kv_target: shuffled arm, whose teacher text
    differs); boundary: only the student tokens that end where a teacher token ends, reading that
    token (kv_loss relation, whose relation matrices must index the same text on both sides).

    Returns (weights `[T_s, T_t]` or None for the identity, valid `[T_s]` bool)."""
    if mode not in TIME_ALIGNMENTS:
        raise KavaError(f"unknown time alignment {mode!r}; choose one of "
                        f"{', '.join(TIME_ALIGNMENTS)}")
    n_student, n_teacher = len(student["input_ids"]), len(teacher["input_ids"])
    if mode == "position":
        return position_alignment(n_student, n_teacher)
    if mode != "interpolate" and torch.equal(student["input_ids"], teacher["input_ids"].long()):
        return None, torch.ones(n_student, dtype=torch.bool)
    if mode == "boundary":
        if teacher.get("char_spans") is None:
            raise KavaError("kv_loss relation compares a teacher of another tokenizer at the "
                            "token boundaries both share, but its store holds no character "
                            "offsets")
        return boundary_alignment(student["char_spans"], teacher["char_spans"])
    if mode != "interpolate" and teacher.get("char_spans") is not None:
        spans = causal_span_alignment if mode == "causal" else span_alignment
        return spans(student["char_spans"], teacher["char_spans"])
    return interpolate_alignment(n_student, n_teacher)


def align_teacher(student, teacher, layers, mode, kv_shape=None):
    """One teacher example's stored K and V of `layers`, on the student's tokens.

    Returns ({layer: (K, V)} each `[T_s, H_t, D_t]` float32, valid `[T_s]` bool). teacher None
    (the teacher's store skipped this example as too long) gives zeros of `kv_shape`, all
    invalid: the example still trains on CE and on the other teachers."""
    n_student = len(student["input_ids"])
    if teacher is None:
        zeros = torch.zeros(n_student, *kv_shape)
        return ({layer: (zeros, zeros) for layer in layers},
                torch.zeros(n_student, dtype=torch.bool))
    weights, valid = time_alignment(student, teacher, mode)
    aligned = {}
    for layer in layers:
        k, v = teacher["k"][layer].float(), teacher["v"][layer].float()
        if weights is not None:
            k = torch.einsum("st,thd->shd", weights, k)
            v = torch.einsum("st,thd->shd", weights, v)
        aligned[layer] = (k, v)
    return aligned, valid


@dataclass
class TeacherTargets:
    """One teacher's aligned KV for a padded batch: kv {teacher layer: (K, V)} `[B, T, H, D]`
    and mask `[B, T]` (True: a real student token that the teacher covers). For a KD teacher
    also its stored top-k logits on the student's positions (kd_pairs), `logits` {top_ids,
    top_logp: [B, T, k], tail_logp: [B, T]}, `kd_mask` [B, T]: the positions distilled, and
    `kd_kind`: the KD loss they are distilled with (kava.losses.kd_kind)."""
    kv: dict
    mask: torch.Tensor
    logits: dict = None
    kd_mask: torch.Tensor = None
    kd_kind: str = None

    def to(self, device):
        return TeacherTargets({layer: (k.to(device), v.to(device))
                               for layer, (k, v) in self.kv.items()}, self.mask.to(device),
                              self.logits and {n: t.to(device) for n, t in self.logits.items()},
                              None if self.kd_mask is None else self.kd_mask.to(device),
                              self.kd_kind)


@dataclass
class Batch:
    """A right-padded micro-batch: student inputs and labels, and per teacher its targets."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    teachers: dict = field(default_factory=dict)

    def to(self, device):
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device),
                     {name: targets.to(device) for name, targets in self.teachers.items()})


def eos_ids(tokenizer, model=None):
    """The end-of-sequence ids: the model's generation config's (one or several), else the
    tokenizer's; [] if neither has one."""
    eos = None if model is None else model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def pad_id(tokenizer, model=None):
    """The id that fills padded positions, for every batch kava builds: the model's generation
    pad token, else the tokenizer's, else the first eos (what most causal LMs pad with), else 0.
    Padded positions are masked everywhere (attention, labels, KV losses, NLL), so any valid id
    will do; with `model`, generation pads as the model's own generate would."""
    pad = None if model is None else model.generation_config.pad_token_id
    for candidate in (pad, tokenizer.pad_token_id, *eos_ids(tokenizer, model)):
        if candidate is not None:
            return candidate
    return 0


def right_pad(rows, value, length):
    """`rows` (tensors of different lengths along dim 0) stacked into one `[B, length, ...]`
    tensor, each row at the start and `value` after it."""
    out = torch.full((len(rows), length, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def collate(students, teachers, pad_id, mode, kd_teachers=None):
    """students: student_example dicts; teachers: {name: (examples from that teacher's store,
    one per student example, in order, None where the store lacks it; teacher layers to keep;
    the store's (heads, head_dim))}; mode: the time alignment of every teacher, or {teacher:
    its time alignment} (an arm whose teachers have different kv_loss); kd_teachers: {name: KD kind} of those whose stored logits
    are collated too (checked at setup to be of the student's own examples)."""
    length = max(len(s["input_ids"]) for s in students)
    ids = [s["input_ids"] for s in students]
    batch = Batch(
        input_ids=right_pad(ids, pad_id, length),
        attention_mask=right_pad([torch.ones_like(i) for i in ids], 0, length),
        labels=right_pad([s["labels"] for s in students], IGNORE_INDEX, length),
    )
    for name, (examples, layers, kv_shape) in teachers.items():
        teacher_mode = mode[name] if isinstance(mode, dict) else mode
        aligned = [align_teacher(s, t, layers, teacher_mode, kv_shape)
                   for s, t in zip(students, examples)]
        kv = {layer: tuple(right_pad([a[layer][i] for a, _ in aligned], 0.0, length)
                           for i in (0, 1))
              for layer in layers}
        batch.teachers[name] = TeacherTargets(
            kv, right_pad([valid for _, valid in aligned], False, length))
        if kd_teachers and name in kd_teachers:
            targets = batch.teachers[name]
            targets.kd_kind = kd_teachers[name]
            targets.logits, targets.kd_mask = _stored_logits(examples, students, length,
                                                             targets.kd_kind)
    return batch


def kd_pairs(student, teacher, kind):
    """Which stored teacher position each student position's next-token distribution is
    distilled from, for one example: (teacher index `[T_s]` long, distilled `[T_s]` bool).
    Never a student's last token, whose next token is past the text.

    kl: position t on both sides (its tokens are the student's, checked at setup). uld: the
    teacher token the causal time alignment (kava.align.causal_span_alignment, the last teacher
    token ending inside the student token) picks, kept only where it ends on the same character
    as the student token: both have then read exactly the same text and predict what follows."""
    n = len(student["input_ids"])
    if kind == "kl":
        return torch.arange(n), torch.arange(n) < n - 1
    weights, valid = causal_span_alignment(student["char_spans"], teacher["char_spans"])
    index = weights.argmax(dim=1)
    same_end = teacher["char_spans"][index, 1].long() == student["char_spans"][:, 1]
    return index, valid & same_end & (torch.arange(n) < n - 1)


def _stored_logits(examples, students, length, kind):
    """A KD teacher's stored top-k logits on the student's positions (kd_pairs), right-padded to
    `length`, and the positions to distil; an example the store skipped gives zeros, none
    distilled."""
    stored = next((t for t in examples if t is not None), None)
    pairs = [kd_pairs(s, t, kind) if t is not None else
             (torch.zeros(len(s["input_ids"]), dtype=torch.long),
              torch.zeros(len(s["input_ids"]), dtype=torch.bool))
             for t, s in zip(examples, students)]
    logits = {}
    for name in LOGIT_TENSORS:
        like = stored[name] if stored is not None else torch.zeros(0, 1)
        rows = [t[name][index] if t is not None else
                torch.zeros(len(s["input_ids"]), *like.shape[1:], dtype=like.dtype)
                for t, s, (index, _) in zip(examples, students, pairs)]
        logits[name] = right_pad(rows, 0, length)
    return logits, right_pad([mask for _, mask in pairs], False, length)


def _epoch_seed(seed, epoch):
    # torch's CPU generator keeps only the low 32 bits of its seed: hash (seed, epoch) into them.
    digest = hashlib.sha256(f"kava-example-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def example_order(n_examples, seed, start, count):
    """Positions start..start+count-1 of the seed's endless example stream: epoch e is a
    permutation drawn from its own generator, so the order depends on the seed alone (never
    on the arm), and any position can be found again after a restart without replaying."""
    if n_examples < 1:
        raise KavaError("no training examples")
    order = []
    position = start
    while len(order) < count:
        epoch, offset = divmod(position, n_examples)
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        permutation = torch.randperm(n_examples, generator=generator)
        take = permutation[offset:offset + count - len(order)].tolist()
        order.extend(take)
        position += len(take)
    return order


def shared_key_space(stores):
    """The key space of the teachers' stores ({teacher: KVStore}), which must be one: a student
    compares its keys with every teacher's in the same space."""
    key_spaces = sorted({store.manifest["key_space"] for store in stores.values()})
    if len(key_spaces) != 1:
        raise KavaError(f"the teachers' KV stores mix key spaces {key_spaces}; precompute them "
                        f"all with the same key_space")
    return key_spaces[0]


def store_positions(store, ids, teacher):
    """Where each example id sits in a teacher's KV store; None for an example the store left
    out as too long (listed in its manifest's skipped_ids). Any other missing id means the data
    and the shards differ."""
    skipped = set(store.manifest.get("skipped_ids", ()))
    positions = []
    for example_id in ids:
        if example_id in skipped:
            positions.append(None)
            continue
        try:
            positions.append(store.index_of(example_id))
        except (KeyError, KavaError):
            raise KavaError(f"example {example_id} is not in the KV store of teacher {teacher} "
                            f"({store.path}); the data and the shards differ (rerun precompute)"
                            ) from None
    return positions


def teacher_inputs(stores, positions, chunk, layers):
    """collate's `teachers` argument for the examples `chunk` (indices into positions)."""
    return {name: ([None if positions[name][i] is None else store.example(positions[name][i])
                    for i in chunk], layers[name], tuple(store.kv_shape))
            for name, store in stores.items()}
