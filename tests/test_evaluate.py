"""kava.evaluate: answer extraction, grading, batched greedy generation, teacher-forced NLL,
bootstrap CIs and input errors, on a tiny random Llama with a real byte-level BPE tokenizer."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kava.errors import KavaError
from kava.evaluate import (answer_nll, at_word_boundary, bootstrap_ci, eval_record,
                           extract_answer, gap_recovered, generate_answers, grade, is_correct,
                           paired_bootstrap_ci, prediction_lines, tokenizer_fingerprint)
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
    batched = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    alone = [_greedy_alone(model, tokenizer, p, 12) for p in PROMPTS]
    assert batched == alone
    assert sum(len(t) for t in batched) > 20  # real continuations, not trivially equal empties
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is untouched


def test_generation_split_smaller_than_batch(model, tokenizer):
    texts = generate_answers(model, tokenizer, PROMPTS[:2], max_new_tokens=4, batch_size=16)
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
    assert generate_answers(bigram, tokenizer, [prompt], n, 1) == ["#### 42\n"]


def test_generation_stops_at_a_stop_string_and_cuts_it(model, tokenizer):
    """A base model that answers without `####` and goes on with the next question: the stop
    string ends the row and is cut off, so the last number is the answer, not the next question's."""
    prompt = "Q: 6*7? ="
    bigram, n = _bigram(model, tokenizer, prompt, " 42\nQuestion: 5")
    assert _greedy_alone(bigram, tokenizer, prompt, n) == " 42\nQuestion: 5"
    assert extract_answer(generate_answers(bigram, tokenizer, [prompt], n, 1)[0]) == "5"
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
    assert generate_answers(model, tokenizer, PROMPTS, 8, 3) == [
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


def test_paired_bootstrap_covers_known_difference():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1, 400)  # per-example difficulty, cancels in the pairing
    a = shared + 0.3 + rng.normal(0, 0.5, 400)
    b = shared + rng.normal(0, 0.5, 400)
    result = paired_bootstrap_ci(a, b, n_boot=4000)
    lo, hi = result["ci"]
    assert result["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert lo < 0.3 < hi and lo > 0
    assert result["significant"] and result["p_value"] < 0.01
    assert paired_bootstrap_ci(a, b, n_boot=4000) == result  # deterministic given seed
    assert paired_bootstrap_ci(a, b, n_boot=4000, seed=1)["ci"] != result["ci"]


def test_paired_bootstrap_zero_difference_includes_zero():
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 1, 300)
    a, b = shared + rng.normal(0, 0.5, 300), shared + rng.normal(0, 0.5, 300)
    result = paired_bootstrap_ci(a, b, n_boot=4000)
    lo, hi = result["ci"]
    assert lo < 0 < hi
    assert not result["significant"] and result["p_value"] > 0.05


def test_bootstrap_groups_resample_whole_examples():
    """Three seeds that nearly replicate each other carry about one seed's information: pooled
    with groups = example id the CI is as wide as one seed's, not sqrt(3) narrower."""
    rng = np.random.default_rng(3)
    effect = rng.normal(0.1, 1, 200)
    seeds = [effect + rng.normal(0, 0.01, 200) for _ in range(3)]
    pooled, ids = np.concatenate(seeds), np.tile(np.arange(200), 3)
    width = lambda r: r["ci"][1] - r["ci"][0]  # noqa: E731
    one_seed = bootstrap_ci(seeds[0], n_boot=4000)
    grouped = bootstrap_ci(pooled, groups=ids, n_boot=4000)
    ungrouped = bootstrap_ci(pooled, n_boot=4000)
    assert grouped["mean"] == pytest.approx(pooled.mean())
    assert width(grouped) == pytest.approx(width(one_seed), rel=0.15)
    assert width(ungrouped) < 0.7 * width(grouped)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(KavaError, match="differ in length: 3 vs 2"):
        paired_bootstrap_ci([1, 2, 3], [1, 2])
    with pytest.raises(KavaError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(KavaError, match="2 group ids for 3 values"):
        bootstrap_ci([1, 2, 3], groups=[0, 1])


def test_gap_recovered():
    assert gap_recovered(2.0, 1.5, 1.0) == pytest.approx(0.5)
    assert gap_recovered(2.0, 2.5, 1.0) == pytest.approx(-0.5)
    assert gap_recovered(2.0, 1.5, 2.0) is None  # teacher no better than init: nothing to recover
    assert gap_recovered(2.0, 1.5, 3.0) is None


def test_eval_record_shape():
    record = eval_record([10, 11, 12], ["#### 1", "#### 2", "3"], ["1", "5", "3"], [1.0, 2.0, 3.0])
    assert record["n"] == 3 and record["accuracy"] == pytest.approx(2 / 3) and record["nll"] == 2.0
    assert record["per_example"]["correct"] == [True, False, True]
    assert record["kv_cosine"] is None
    json.dumps(record)  # the stage writes it as JSON
    with pytest.raises(KavaError, match="ids repeat"):
        eval_record([1, 1], ["1", "2"], ["1", "2"], [0.1, 0.2])
    with pytest.raises(KavaError, match="2 ids, 3 predictions and 3 NLLs differ"):
        eval_record([1, 2], ["1", "2", "3"], ["1", "2", "3"], [0.1, 0.2, 0.3])


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
