"""Step selection on the validation rows (data.validation_size): every arm scores its answer NLL
on them every eval_every steps and keeps the weights of its best step, so each arm is judged at
its own best point (early stopping) rather than wherever a fixed step count leaves it.

The score is the evaluate stage's answer NLL (kava.evaluate.answer_nll, prompt split at the word
boundary), computed in the training's own precision (bf16 autocast where the run trains in bf16).
It only ranks one arm's steps against each other, and every arm is ranked the same way; the test
NLL, which compares arms, stays fp32. In bf16 a scoring takes about 0.6 of its fp32 time on this
CPU and moved the mean by at most 0.0052 nats over the default run's 24 scorings (12 jobs, steps
15 and 30) and 0.020 over the ablation's 54 (ce_low_lr, the highest NLLs), while an arm's
scorings at steps 15 and 30 differ by 0.145 nats or more (every arm and seed of both): every job
chose the step it chose in fp32.

teacher_weighting validation takes the gradient of the training answer CE on the same rows
(validation_batches), the reference each teacher's loss gradient is compared with.
"""

import math

import numpy as np
import torch

from kava.batching import IGNORE_INDEX, collate, pad_id, student_example
from kava.errors import KavaError
from kava.evaluate import answer_nll, at_word_boundary


def validation_nll(model, tokenizer, rows, batch_size, autocast):
    """Mean answer NLL (nats/token, the mean of the per-example means, as eval's "nll") of
    `model` on `rows` ({prompt, answer}) under `autocast`, the training's precision. Leaves the
    model in the mode it was found in."""
    if not rows:
        raise KavaError("no validation rows to score: data.validation_size is 0")
    was_training = model.training
    prompts, answers = zip(*(at_word_boundary(row["prompt"], row["answer"]) for row in rows))
    try:
        with autocast:
            return float(np.mean(answer_nll(model, tokenizer, list(prompts), list(answers),
                                            batch_size)))
    finally:
        model.train(was_training)


def validation_batches(tokenizer, rows, max_length, batch_size):
    """(batches, answer tokens in all) of the validation rows as the student trains on rows:
    its tokens and answer-CE labels (rows rendered by kava.prompts, as the train rows are),
    `batch_size` rows a batch and no teacher."""
    if not rows:
        raise KavaError("teacher_weighting validation weighs the teachers on the validation "
                        "rows, but there are none: data.validation_size is 0")
    examples = [student_example(tokenizer, row, max_length) for row in rows]
    # No teacher to align: the time alignment mode is never read.
    batches = [collate(examples[i:i + batch_size], {}, pad_id(tokenizer), "auto")
               for i in range(0, len(examples), batch_size)]
    return batches, sum(int(e["labels"][1:].ne(IGNORE_INDEX).sum()) for e in examples)


class BestStep:
    """The validation curve and the weights of its lowest point.

    record(step, nll, model) after each scoring; a step is best only when strictly lower than
    every earlier one (a tie keeps the earlier, shorter-trained step), and a non-finite NLL is
    never best. The best weights are a CPU copy of the state_dict, so later steps cannot move
    them."""

    def __init__(self):
        self.curve = []
        self.best_step, self.best_nll, self.best_weights = None, math.inf, None

    def record(self, step, nll, model):
        """Add (step, nll); returns whether this step is the new best."""
        self.curve.append((step, nll))
        if not nll < self.best_nll:
            return False
        self.best_step, self.best_nll = step, nll
        self.best_weights = {name: tensor.detach().to("cpu", copy=True)
                             for name, tensor in model.state_dict().items()}
        return True

    def summary(self):
        """For train.json, the report and a checkpoint: the curve and the chosen step."""
        return {"validation": [{"step": step, "nll": nll} for step, nll in self.curve],
                "best_step": self.best_step, "best_nll": self.best_nll if self.curve else None}

    def restore(self, summary, best_weights):
        """The state of a summary() and its best weights, as a resumed run continues it."""
        self.curve = [(point["step"], point["nll"]) for point in summary["validation"]]
        self.best_step, self.best_weights = summary["best_step"], best_weights
        self.best_nll = math.inf if summary["best_nll"] is None else summary["best_nll"]
