"""Step selection on validation rows: the scorer is eval's answer NLL, the tracker keeps the
lowest step's weights."""

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


def test_validation_nll_is_eval_answer_nll_and_keeps_the_mode(student):
    model, tokenizer = student
    model.train()
    prompts, answers = zip(*(at_word_boundary(r["prompt"], r["answer"]) for r in ROWS))
    expected = np.mean(answer_nll(model, tokenizer, list(prompts), list(answers), 1))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score = validation_nll(model, tokenizer, ROWS, batch_size=2)
    assert score == pytest.approx(expected, rel=1e-5) and model.training
    model.eval()
    validation_nll(model, tokenizer, ROWS, batch_size=2)
    assert not model.training
    with pytest.raises(KavaError, match="no validation rows to score: data.validation_size is 0"):
        validation_nll(model, tokenizer, [], batch_size=2)


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
