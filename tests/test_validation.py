"""Step selection on validation rows: the scorer is eval's answer NLL in the training's precision,
the tracker keeps the lowest step's weights."""

import math

import numpy as np
import pytest
import torch

from kava.errors import KavaError
from kava.evaluate import answer_nll, at_word_boundary
from kava.models import load_model, load_tokenizer
from kava.validation import BestStep, validation_nll

ROWS = [{"prompt": "Question: Tom has 3 apples and buys 4. How many?\nAnswer: ",
         "answer": "3+4 = <<3+4=7>>7\n#### 7"},
        {"prompt": "Question: 12 eggs cost $3.\nAnswer: ", "answer": "#### 3"},
        {"prompt": "Question: 2*5?\nAnswer: ", "answer": "2*5 = <<2*5=10>>10\n#### 10"}]


@pytest.fixture(scope="module")
def student(tiny_card):
    card = tiny_card("llama")
    return load_model(card, dtype=torch.float32), load_tokenizer(card["dir"])


def test_validation_nll_is_eval_answer_nll_in_the_training_precision(student):
    model, tokenizer = student
    prompts, answers = zip(*(at_word_boundary(r["prompt"], r["answer"]) for r in ROWS))
    scores = {}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            expected = np.mean(answer_nll(model, tokenizer, list(prompts), list(answers), 2))
        model.train()
        scores[precision] = validation_nll(model, tokenizer, ROWS, 2, autocast)
        assert scores[precision] == expected and model.training
    # The autocast is applied: bf16 rounding moves the score, a little.
    assert scores["bf16"] != scores["fp32"]
    assert scores["bf16"] == pytest.approx(scores["fp32"], abs=0.05)
    model.eval()
    validation_nll(model, tokenizer, ROWS, 2, torch.autocast("cpu", enabled=False))
    assert not model.training
    with pytest.raises(KavaError, match="no validation rows to score: data.validation_size is 0"):
        validation_nll(model, tokenizer, [], 2, torch.autocast("cpu", enabled=False))


def test_best_step_keeps_the_lowest_steps_weights(student):
    model, _ = student
    tracker = BestStep()
    weight = next(model.parameters())
    original = weight.detach().clone()
    for step, nll in ((10, 2.0), (20, 1.5), (30, 1.5), (40, math.nan), (50, 1.7)):
        with torch.no_grad():
            weight.fill_(step)
        tracker.record(step, nll, model)
    with torch.no_grad():
        weight.copy_(original)
    # 20, not the tie at 30, the NaN at 40 or the last step.
    assert tracker.best_step == 20 and tracker.best_nll == 1.5
    name = next(name for name, p in model.named_parameters() if p is weight)
    assert torch.all(tracker.best_weights[name] == 20)
    summary = tracker.summary()
    assert summary["best_step"] == 20 and [p["step"] for p in summary["validation"]] == [10, 20, 30,
                                                                                     40, 50]
    assert BestStep().summary() == {"validation": [], "best_step": None, "best_nll": None}
