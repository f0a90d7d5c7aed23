"""kava.evaluate: answer extraction, grading, batched greedy generation, teacher-forced NLL,
the evaluation record and input errors, on a tiny random Llama with a real byte-level BPE
tokenizer. (The bootstrap CIs moved to kava.stats: tests/test_stats.py.)"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kava.answers import extract_answer, is_correct
from kava.errors import KavaError
from kava.evaluate import (answer_nll, at_word_boundary, eval_record,
                           generate_answers, grade, prediction_lines, tokenizer_fingerprint)
from kava.models import load_model, load_tokenizer

GSM8K_TRAIN = "/work/shared/data/gsm8k/train.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and a byte-level BPE trained on 200 GSM8K rows, saved and reloaded
    from disk so the real loading code runs."""
    with open(GSM8K_TRAIN) as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        (r["question"] + "\n" + r["answer"] for r in rows),
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:",
           "Question: 12 eggs cost $3.\nAnswer:",
           "Q: 1+1?\nA:",
           "Question: A train travels 60 miles per hour for 2 hours. How far does it go?\nAnswer:",
           "Hi"]


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("It costs $5.00", "5"),
    ("-3", "-3"),
    ("The answer is 7.", "7"),
    ("no number here", None),
    ("3 boxes of 4 is 12 apples, 12 - 2 = 10\n#### 12", "12"),
    ("#### 12\nThen 99 more words 100", "12"),
    ("#### -5.50 dollars", "-5.5"),
    ("$-2 or -$3", "-3"),
    ("pages 3-4", "4"),
    ("version x2 has 1,000,000 users", "1000000"),
    ("#### none, so 8", "8"),
    ("####", None),
    ("0.50", "0.5"),
    ("007", "7"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_normalises_both_sides():
    assert is_correct("so #### $1,234.00", "1234")
    assert is_correct("The answer is 1234.", 1234)
    assert is_correct("#### 5", 5.0)
    assert not is_correct("#### 5", "-5")
    assert not is_correct("nothing", "5")
    with pytest.raises(KavaError, match="'five' is not a number"):
        is_correct("#### 5", "five")


def test_grade_accuracy_on_hand_made_predictions():
    predictions = ["#### 18", "The answer is 3.", "#### 70,000", "I think 5 then #### 6", "no idea"]
    references = ["18", "3", "70000", "5", "0"]
    correct = grade(predictions, references)
    assert correct == [True, True, True, False, False]
    assert np.mean(correct) == pytest.approx(0.6)


def test_grade_rejects_empty_and_mismatched():
    with pytest.raises(KavaError, match="predictions list is empty"):
        grade([], [])
    with pytest.raises(KavaError, match="2 predictions but 1 references"):
        grade(["1", "2"], ["1"])


def test_load_tokenizer_names_folder_without_tokenizer(tmp_path, model_dir):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(KavaError, match=f"model folder {bare}: no usable tokenizer"):
        load_tokenizer(bare)


def _greedy_alone(model, tokenizer, prompt, max_new_tokens):
    """Reference: one prompt, no padding, argmax by hand with a full forward per step."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(input_ids=ids).logits[0, -1].argmax().item()
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_left_padded_generation_equals_unbatched(model, tokenizer):
    batched = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, stop=())
    alone = [_greedy_alone(model, tokenizer, p, 12) for p in PROMPTS]
    assert batched == alone
    assert sum(len(t) for t in batched) > 20  # real continuations, not trivially equal empties
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is untouched


def test_generation_split_smaller_than_batch(model, tokenizer):
    texts = generate_answers(model, tokenizer, PROMPTS[:2], max_new_tokens=4, batch_size=16,
                             stop=())
    assert texts == [_greedy_alone(model, tokenizer, p, 4) for p in PROMPTS[:2]]


def _bigram(model, tokenizer, prompt, script):
    """A real Llama wired as a bigram machine (attention and MLP outputs zeroed, one basis vector
    per token) that writes `script` greedily after `prompt`."""
    script = tokenizer(script, add_special_tokens=False)["input_ids"]
    chain = [tokenizer(prompt)["input_ids"][-1]] + script
    assert len(set(chain)) == len(chain) <= model.config.hidden_size
    bigram = AutoModelForCausalLM.from_config(model.config)
    with torch.no_grad():
        for layer in bigram.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        bigram.model.embed_tokens.weight.zero_()
        bigram.lm_head.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            bigram.model.embed_tokens.weight[token, k] = 1.0
            bigram.lm_head.weight[following, k] = 10.0
    return bigram, len(script)


def test_generation_stops_after_answer_line(model, tokenizer):
    """The bigram machine writes `#### 42\nQuestion...`: the row ends after the answer line."""
    prompt = "Q: 6*7?\nA:"
    bigram, n = _bigram(model, tokenizer, prompt, "#### 42\nQuestion")
    assert _greedy_alone(bigram, tokenizer, prompt, n) == "#### 42\nQuestion"
    assert generate_answers(bigram, tokenizer, [prompt], n, 1, stop=()) == ["#### 42\n"]


def test_generation_stops_at_a_stop_string_and_cuts_it(model, tokenizer):
    """A base model that answers without `####` and goes on with the next question: the stop
    string ends the row and is cut off, so the last number is the answer, not the next question's."""
    prompt = "Q: 6*7? ="
    bigram, n = _bigram(model, tokenizer, prompt, " 42\nQuestion: 5")
    assert _greedy_alone(bigram, tokenizer, prompt, n) == " 42\nQuestion: 5"
    assert extract_answer(generate_answers(bigram, tokenizer, [prompt], n, 1, stop=())[0]) == "5"
    stopped = generate_answers(bigram, tokenizer, [prompt, PROMPTS[0]], n, 2, stop=["\nQuestion:"])
    assert stopped[0] == " 42" and extract_answer(stopped[0]) == "42"
    assert stopped[1] == generate_answers(bigram, tokenizer, [PROMPTS[0]], n, 1,
                                          stop=["\nQuestion:"])[0]


def test_word_boundary_split_scores_the_tokens_of_the_joined_text(tokenizer):
    """Moving the template's trailing space to the answer makes prompt + answer tokenise as the
    joined text does, so the NLL scores the tokens a model trained on the text would see."""
    with open(GSM8K_TRAIN) as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    for row in rows:
        prompt = f"Question: {row['question']}\nAnswer: "
        head, answer = at_word_boundary(prompt, row["answer"])
        assert head + answer == prompt + row["answer"] and not head.endswith(" ")
        assert (tokenizer(head)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"]
                == tokenizer(prompt + row["answer"])["input_ids"])
    # The naive split ends the prompt in a lone space token the joined text never has.
    naive = tokenizer(prompt)["input_ids"] + tokenizer(row["answer"], add_special_tokens=False)[
        "input_ids"]
    assert naive != tokenizer(prompt + row["answer"])["input_ids"]


ANSWERS = [" 3 + 4 = <<3+4=7>>7\n#### 7", " Each egg costs 3/12 = $0.25\n#### 0.25", " 2",
           " 60 * 2 = <<60*2=120>>120 miles\n#### 120", " there"]


def _nll_alone(model, tokenizer, prompt, answer):
    """Reference: one unpadded forward, log-softmax by hand at the answer positions."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    # The token at position t is predicted by the logits at t - 1.
    start = len(prompt_ids)
    return -np.mean([logprobs[start + j - 1, tok].item() for j, tok in enumerate(answer_ids)])


def test_answer_nll_matches_hand_computation(model, tokenizer):
    batched = answer_nll(model, tokenizer, PROMPTS, ANSWERS, batch_size=3)
    alone = [_nll_alone(model, tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    # A random model over a 400-token vocabulary sits near log(400) nats per token.
    assert all(4.0 < x < 8.0 for x in batched)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_batching_is_exact_across_families(tiny_card, architecture):
    """Left padding must not change a row's result in any family, including gemma3's sliding
    window (8 tokens here, shorter than most prompts)."""
    card = tiny_card(architecture)
    model, tokenizer = load_model(card), load_tokenizer(card["dir"])
    assert generate_answers(model, tokenizer, PROMPTS, 8, 3, stop=()) == [
        _greedy_alone(model, tokenizer, p, 8) for p in PROMPTS]
    alone = [_nll_alone(model, tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    np.testing.assert_allclose(answer_nll(model, tokenizer, PROMPTS, ANSWERS, 3), alone,
                               rtol=0, atol=1e-5)


def test_answer_nll_split_smaller_than_batch(model, tokenizer):
    nll = answer_nll(model, tokenizer, PROMPTS[:2], ANSWERS[:2], batch_size=64)
    np.testing.assert_allclose(nll, [_nll_alone(model, tokenizer, p, a)
                                     for p, a in zip(PROMPTS[:2], ANSWERS[:2])], atol=1e-5)


def test_answer_nll_rejects_bad_rows(model, tokenizer):
    with pytest.raises(KavaError, match="2 prompts but 1 answers"):
        answer_nll(model, tokenizer, PROMPTS[:2], ANSWERS[:1], batch_size=2)
    with pytest.raises(KavaError, match="row 1: empty answer"):
        answer_nll(model, tokenizer, PROMPTS[:2], [" 7", ""], batch_size=2)


def _kv_scores(overall):
    return {"overall": overall, "per_teacher": {"llama": overall},
            "per_layer": {"llama": [overall, overall]}}


def test_eval_record_shape():
    record = eval_record([10, 11, 12], ["#### 1", "#### 2", "3"], ["1", "5", "3"], [1.0, 2.0, 3.0])
    assert record["n"] == 3 and record["accuracy"] == pytest.approx(2 / 3) and record["nll"] == 2.0
    assert record["per_example"]["correct"] == [True, False, True]
    assert record["kv_cosine"] is None and record["kv_r2"] is None and record["tokenizer"] is None
    json.dumps(record)  # the stage writes it as JSON
    with pytest.raises(KavaError, match="ids repeat"):
        eval_record([1, 1], ["1", "2"], ["1", "2"], [0.1, 0.2])
    with pytest.raises(KavaError, match="2 ids, 3 predictions and 3 NLLs do not match"):
        eval_record([1, 2], ["1", "2", "3"], ["1", "2", "3"], [0.1, 0.2, 0.3])
    with pytest.raises(KavaError, match="3 ids, 2 predictions and 2 NLLs do not match"):
        eval_record([1, 2, 3], ["1", "2"], ["1", "2"], [0.1, 0.2])


def test_eval_record_keeps_the_held_out_kv_cosine_and_r2_apart():
    cosine, r2 = _kv_scores(0.8), _kv_scores(0.25)
    record = eval_record(["a", "b"], ["#### 1", "#### 2"], ["1", "2"], [0.5, 1.5],
                         kv={"cosine": cosine, "r2": r2}, tokenizer="sha")
    assert record["kv_cosine"] == cosine and record["kv_r2"] == r2 and record["tokenizer"] == "sha"
    assert json.loads(json.dumps(record))["kv_r2"]["per_layer"] == {"llama": [0.25, 0.25]}
    with pytest.raises(KavaError, match=r"kv r2 keys \['overall', 'per_teacher'\], expected "
                                        r"overall, per_layer, per_teacher"):
        eval_record(["a"], ["#### 1"], ["1"], [0.5],
                    kv={"cosine": cosine, "r2": {"overall": 0.1, "per_teacher": {}}})


def test_eval_record_generated_for_the_first_examples_only():
    """eval.generate_examples: NLL covers every example, accuracy the generated first ones."""
    record = eval_record(["a", "b", "c", "d"], ["#### 1", "#### 0"], ["1", "2"],
                         [1.0, 2.0, 3.0, 6.0])
    assert record["n"] == 4 and record["nll"] == 3.0 and record["accuracy"] == 0.5
    assert record["per_example"]["id"] == ["a", "b", "c", "d"]
    assert record["per_example"]["correct"] == [True, False]
    assert record["per_example"]["reference"] == ["1", "2"]


def test_prediction_lines_are_readable_and_consistent():
    record = eval_record(["a", "b", "c"], ["so #### 1,000", "", "I think 7."], ["1000", "5", "7"],
                         [1.0, 2.0, 3.0])
    lines = prediction_lines(record, ["q1", "q2", "q3"])
    assert [line["extracted"] for line in lines] == ["1000", None, "7"]
    assert [line["correct"] for line in lines] == [True, False, True]  # an empty generation is wrong
    assert lines[1] == {"id": "b", "question": "q2", "generated": "", "extracted": None,
                        "reference": "5", "correct": False, "answer_nll": 2.0}
    with pytest.raises(KavaError, match="2 questions for 3 evaluated examples"):
        prediction_lines(record, ["q1", "q2"])


def test_tokenizer_fingerprint_ignores_runtime_settings(tokenizer, model_dir, tmp_path, tiny_card):
    before = tokenizer_fingerprint(tokenizer)
    used = load_tokenizer(model_dir)
    used("a long enough text", truncation=True, max_length=3)  # what training does to it
    used.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == before
    assert tokenizer_fingerprint(load_tokenizer(tiny_card("llama")["dir"])) != before
