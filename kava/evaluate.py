"""Honest GSM8K evaluation: answer extraction, greedy generation, teacher-forced answer NLL, and
a trained student's held-out KV match (the statistics over these are kava.stats's).

Everything here is deterministic given its inputs (greedy decoding, seeded bootstrap), so two
evaluations of the same model on the same rows agree to the token.
"""

import hashlib
import json
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from kava.answers import ANSWER_LINE, extract_answer, is_correct
from kava.batching import eos_ids, pad_id
from kava.capture import capturing_kv, decoder_layers, head_logits
from kava.errors import KavaError
from kava.kvstore import KVStore, open_teacher_store

def grade(predictions, references):
    """Per-example correctness of generated texts against reference numbers."""
    if not predictions:
        raise KavaError("no predictions to grade: the predictions list is empty")
    if len(predictions) != len(references):
        raise KavaError(f"{len(predictions)} predictions but {len(references)} references")
    return [is_correct(pred, ref) for pred, ref in zip(predictions, references)]


def _left_pad(seqs, pad, device):
    """Left-padded ids, attention mask and position ids. Positions count real tokens only, so a
    padded row sees the same positions (and RoPE phases) as the row alone."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _batches(lengths, batch_size):
    """Indices grouped into batches of similar length (longest first, so memory trouble shows at
    once and the progress bar's ETA errs high). Callers restore the original order."""
    if batch_size < 1:
        raise KavaError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def at_word_boundary(prompt, answer):
    """(prompt, answer) with the prompt's trailing whitespace moved to the answer.

    A template such as "...\nAnswer: " ends in a space that BPE tokenizers glue to the next
    word (" Natalia" is one token). Tokenised alone, that prompt ends in a lone " " token that
    no model saw before an answer in training, so generation and the answer NLL would start
    off-distribution. Split at the word boundary instead, prompt and answer tokenise as they
    do inside the joined text."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + answer


def _cut_at_stop(text, stop):
    """`text` up to the first occurrence of any stop string."""
    return text[:min((text.find(s) for s in stop if s in text), default=len(text))]


class AnswerLineStop(StoppingCriteria):
    """Finish a sequence once its continuation holds a complete `#### <number>` line. GSM8K
    answers end there; without this a base model keeps writing the next question until
    max_new_tokens, which is most of the evaluation time on CPU. Per-sequence, so a batch stops
    each row exactly where that row alone would.

    Such a line is complete only at a token holding a newline, so each step decodes the newest
    token alone and the continuation only of the rows whose newest token holds one: decoding
    every continuation at every step cost time quadratic in its length."""

    def __init__(self, tokenizer, prompt_width):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        newest = self.tokenizer.batch_decode(input_ids[:, -1:], skip_special_tokens=True)
        done = [("\n" in token and ANSWER_LINE.search(self.tokenizer.decode(
                    input_ids[row, self.prompt_width:], skip_special_tokens=True)) is not None)
                for row, token in enumerate(newest)]
        return torch.tensor(done, device=input_ids.device)


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, stop):
    """Greedy continuations of `prompts` (text only, special tokens skipped), in prompt order.

    Batches are left-padded so every row's next token sits in the last column; the tokenizer is
    only used to encode/decode, its padding settings are never touched. A row stops at eos, at a
    finished `#### <number>` line, at any of the `stop` strings (which are cut off the text, e.g.
    "\nQuestion:" when a base model starts the next question), or after max_new_tokens. Puts the
    model in eval mode.

    The stop strings go to transformers' own StopStringCriteria (generate's `stop_strings`). It
    matches a stop string ending in the newest token, which may begin in the prompt; a prompt
    that ends in the start of a stop string would stop there, which kava's prompts (ending in
    "Answer:", at_word_boundary) cannot."""
    if not prompts:
        raise KavaError("no prompts to generate from: the prompt list is empty")
    model.eval()
    pad, eos = pad_id(tokenizer, model), eos_ids(tokenizer, model)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    texts = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="ex") as progress:
        for batch in _batches([len(e) for e in encoded], batch_size):
            ids, mask, _ = _left_pad([encoded[i] for i in batch], pad, model.device)
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=pad, eos_token_id=eos or None,
                stop_strings=list(stop) or None, tokenizer=tokenizer,
                stopping_criteria=StoppingCriteriaList([AnswerLineStop(tokenizer, ids.shape[1])]))
            for row, i in enumerate(batch):
                new = out[row, ids.shape[1]:].tolist()
                # Cut at the first eos: after it the row holds pads, which need not be special.
                end = min((new.index(e) for e in eos if e in new), default=len(new))
                texts[i] = _cut_at_stop(tokenizer.decode(new[:end], skip_special_tokens=True),
                                        stop)
            progress.update(len(batch))
    return texts


@torch.inference_mode()
def answer_nll(model, tokenizer, prompts, answers, batch_size, key_space=None):
    """Per example, the mean negative log-likelihood (nats/token) of the reference answer given
    the prompt, teacher-forced.

    With `key_space` (kava.capture's), also each example's K and V at every layer from the same
    forward: returns (nlls, [{"input_ids": `[T]`, "kv": [(k, v) `[T, H, D]` per layer]}]), prompt
    then answer tokens, pads dropped. The held-out KV probe reads them (kava.kvfit) instead of
    running the student over the same test rows a second time.

    Boundary: prompt and answer are tokenised separately (the prompt with the tokenizer's special
    tokens, e.g. BOS; the answer without) and the ids concatenated. The scored tokens are then
    exactly `tokenizer(answer, add_special_tokens=False)`, whatever the prompt ends with; tokenising
    `prompt + answer` jointly could merge a token across the boundary and make "the answer tokens"
    ill-defined.

    Rows are left-padded, so every answer ends in the last column. The LM head runs only on the
    positions that predict an answer token: with a 262k vocabulary the full logits would
    dominate memory, and at any vocabulary the head costs as much as a small model's body.
    Pads and prompt tokens never enter the mean."""
    if len(prompts) != len(answers):
        raise KavaError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise KavaError("no examples to score: the prompt list is empty")
    model.eval()
    pad = pad_id(tokenizer, model)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    for row, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if not p or not a:
            empty = "prompt" if not p else "answer"
            raise KavaError(f"row {row}: empty {empty} after tokenisation")
    nlls = [None] * len(prompts)
    captured = [None] * len(prompts)
    layers = range(len(decoder_layers(model)))
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    with tqdm(total=len(prompts), desc="answer nll", unit="ex") as progress:
        for batch in _batches(lengths, batch_size):
            ids, mask, positions = _left_pad([prompt_ids[i] + answer_ids[i] for i in batch],
                                             pad, model.device)
            answer_lengths = [len(answer_ids[i]) for i in batch]
            longest = max(answer_lengths)
            with (capturing_kv(model, layers, key_space) if key_space
                  else nullcontext(({}, None))) as (forward_args, kv):
                hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     **forward_args).last_hidden_state
            for row, i in enumerate(batch if key_space else ()):
                # Left-padded: the example is the last `width` columns. Kept in host memory:
                # every test row's KV at once may not fit beside the model on an accelerator.
                width = lengths[i]
                captured[i] = {"input_ids": ids[row, -width:].cpu(),
                               "kv": [(kv[layer][0][row, -width:].cpu(),
                                       kv[layer][1][row, -width:].cpu()) for layer in layers]}
            targets = ids[:, -longest:]
            first_answer_column = longest - torch.tensor(answer_lengths, device=ids.device)
            is_answer = torch.arange(longest, device=ids.device) >= first_answer_column[:, None]
            # The hidden state at column t predicts the token at t + 1: the head runs on the
            # answer tokens' predictors only (the last longest + 1 columns but the final one,
            # then each row's own answer), never on prompts or pads.
            logits = head_logits(model, hidden[:, -longest - 1:-1][is_answer]).float()
            token_nll = F.cross_entropy(logits, targets[is_answer], reduction="none")
            for i, row_nll in zip(batch, token_nll.split(answer_lengths)):
                nlls[i] = row_nll.mean().item()
            progress.update(len(batch))
    return (nlls, captured) if key_space else nlls


def tokenizer_fingerprint(tokenizer):
    """sha256 of what decides how text becomes tokens: a fast tokenizer's full definition
    (vocabulary, merges, normalizer, pre-tokenizer, added tokens), else a slow one's vocabulary.
    Truncation and padding are left out: they are runtime settings, and a tokenizer saved after
    use (as training saves the student's) carries the last ones it was called with."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:
        definition = {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()}
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def eval_record(ids, predictions, references, nlls, kv=None, tokenizer=None):
    """The JSON record of one evaluated model, the shape kava.report reads:

        {"n": int, "accuracy": float, "nll": float,
         "kv_cosine": None | {"overall": float, "per_teacher": {teacher: float},
                              "per_layer": {teacher: [float per student layer]}},
         "kv_r2": None | the same shape (held-out ridge-probe R², kava.kvfit),
         "tokenizer": None | str,
         "per_example": {"id": [...], "correct": [bool], "nll": [float], "prediction": [str],
                         "extracted": [str | None], "reference": [str]}}

    `ids` identify the examples (row ids of the test split) so that arms can be paired. NLLs
    cover every id; predictions (and so correct, prediction, extracted, reference) the first
    len(predictions) ids, the ones generated.
    `tokenizer` identifies the model's tokenisation (tokenizer_fingerprint): NLL is per token,
    so two models' NLLs compare only when their tokenizers are equal."""
    correct = grade(predictions, references)
    if not len(ids) == len(nlls) >= len(correct):
        raise KavaError(f"{len(ids)} ids, {len(predictions)} predictions and {len(nlls)} NLLs "
                        f"do not match (predictions may cover only the first ids)")
    if len(set(ids)) != len(ids):
        raise KavaError("example ids repeat: each evaluated row needs a unique id")
    for name, scores in (kv or {}).items():
        if set(scores) != {"overall", "per_teacher", "per_layer"}:
            raise KavaError(f"kv {name} keys {sorted(scores)}, expected overall, per_layer, "
                            f"per_teacher")
    kv = kv or {}
    return {"n": len(ids), "accuracy": float(np.mean(correct)), "nll": float(np.mean(nlls)),
            "kv_cosine": kv.get("cosine"), "kv_r2": kv.get("r2"), "tokenizer": tokenizer,
            "per_example": {"id": list(ids), "correct": correct, "nll": [float(x) for x in nlls],
                            "prediction": list(predictions),
                            "extracted": [extract_answer(p) for p in predictions],
                            "reference": [str(r) for r in references]}}


def teacher_stores(manifests, teachers, train_info):
    """{teacher: KVStore} of `manifests` for `teachers`, each checked against the key space
    training used and, for a teacher the student learned from, against the weights its KV came
    from (a store of other weights or another key space is refused, naming the manifest)."""
    stores = {}
    for path in manifests:
        name = KVStore(path).manifest["teacher"]["name"]
        if name in teachers:
            trained = train_info["teachers"].get(name)
            weights = trained["identity"]["teacher"]["weights_sha256"] if trained else None
            stores[name] = open_teacher_store(path, name, weights, key_space=train_info["key_space"])
    missing = [name for name in teachers if name not in stores]
    if missing:
        raise KavaError(f"no KV manifest of teacher {missing[0]} among {list(manifests)} (the "
                        f"held-out KV fit reads {', '.join(teachers)})")
    return stores


def heldout_kv(student, tokenizer, projectors, train_info, probe_maps, train_manifests,
               test_manifests, train_rows, test_rows, max_length, batch_size, probe_ridge,
               test_kv=None):
    """A trained student's held-out KV match on the test split: "cosine", the raw cosine
    through its projectors as training compared them (kava.kvfit.kv_cosine), for the teachers it
    learned from; and "r2", the R² of a ridge probe fitted on the train split over the
    per-head-mean baseline (kava.kvfit.kv_probe_r2), for every teacher in `probe_maps`
    (probe_layer_maps). Each {"overall", "per_teacher", "per_layer"}.

    projectors: {teacher: KVProjector} as trained; train_info: the run's train.json (key space,
    time alignment, layer maps); test_kv: the student's own K, V on the test rows where already
    computed (answer_nll with the key space), read instead of a second forward."""
    from kava.kvfit import heldout_scores

    device = next(student.parameters()).device
    test_stores = teacher_stores(test_manifests, list(probe_maps), train_info)
    train_stores = teacher_stores(train_manifests, list(probe_maps), train_info)
    projectors = {name: projector.to(device).eval() for name, projector in projectors.items()}
    if train_info["config"]["kv_target"] == "self":
        # Trained against its own initial KV (student layers, identity projector): held out it
        # is compared with each teacher's KV at the probe's layers, as a kv arm is.
        for name, projector in projectors.items():
            projector.layer_map = list(probe_maps[name])
    # A kv_target: shuffled arm read other examples' KV in training; held out, every arm is measured
    # against each example's own teacher KV.
    return heldout_scores(student, tokenizer, projectors, train_stores, test_stores, probe_maps,
                          train_rows, test_rows, max_length, batch_size, probe_ridge,
                          key_space=train_info["key_space"],
                          time_alignment=train_info["config"]["time_alignment"], test_kv=test_kv)


def prediction_lines(record, questions):
    """One dict per example for predictions.jsonl, in the record's order, for a person to read:
    id, question, the generated text, the answer extracted from it, the reference, whether
    they match, and the answer NLL."""
    examples = record["per_example"]
    if len(questions) != len(examples["id"]):
        raise KavaError(f"{len(questions)} questions for {len(examples['id'])} evaluated examples")
    return [{"id": example_id, "question": question, "generated": generated,
             "extracted": extracted, "reference": reference, "correct": correct,
             "answer_nll": nll}
            for example_id, question, generated, extracted, reference, correct, nll in zip(
                examples["id"], questions, examples["prediction"], examples["extracted"],
                examples["reference"], examples["correct"], examples["nll"])]
