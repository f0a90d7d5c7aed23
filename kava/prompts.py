"""The text a model reads for a data row (`data.prompt_format`), decided here and nowhere else.

plain: every model reads the same text,

    prompt = "Question: {question}\\nAnswer: "     text = prompt + answer

chat: each model reads its own chat template's rendering (`tokenizer.apply_chat_template`) of
a user turn holding the question and an assistant turn holding the answer; its prompt is the
template's generation prompt for the user turn alone (add_generation_prompt), which must begin
the full rendering. Every teacher renders with its template for its KV and logits, the student
with its own for training and evaluation.

Character offsets: a token's character span is always counted on the row's *plain* text (the
`text` column of the prepared rows), so spans from two models compare whatever they rendered.
Under plain the rendering is that text. Under chat each rendering's question and answer are
moved onto the plain text's question and answer (`segments`, kava.align.shared_spans); the
characters a template adds (role markers, system prompt, end of turn) have no place there, and
a token made only of them gets the empty span (0, 0).
"""

from dataclasses import dataclass

from kava.errors import KavaError

PROMPT_TEMPLATE = "Question: {question}\nAnswer: "


@dataclass(frozen=True)
class Rendering:
    """One rendered row: `text`, and the [start, end) characters in it of the question and the
    answer (each without the surrounding whitespace a template may trim; for a generation
    prompt, the answer span is empty at the end)."""
    text: str
    question: tuple
    answer: tuple


def _span(text, content, before, model, what):
    """Where `content` (stripped) last occurs in text[:before]."""
    content = content.strip()
    start = text.rfind(content, 0, before)
    if start < 0:
        raise KavaError(f"model {model}: its chat template does not render the {what} verbatim, "
                        f"so its characters cannot be aligned with other models'")
    return start, start + len(content)


def _without_added_bos(tokenizer, text):
    """`text` less a leading BOS that the tokenizer adds by itself: every caller tokenises with
    the tokenizer's own special tokens, and a template that writes BOS would otherwise get two."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text


def render(tokenizer, question, answer, prompt_format, model):
    """The Rendering of one row for `model` (its name, for errors) in `prompt_format`; with
    answer None, the prompt a model generates the answer from."""
    if prompt_format == "plain":
        prompt = PROMPT_TEMPLATE.format(question=question)
        text = prompt + (answer or "")
    elif prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise KavaError(f"model {model}: data.prompt_format is chat, but its tokenizer has no "
                            f"chat template (use prompt_format plain)")
        messages = [{"role": "user", "content": question}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        text = _without_added_bos(tokenizer, tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=answer is None))
    else:
        raise KavaError(f"unknown data.prompt_format {prompt_format!r}; choose plain or chat")
    answer_span = (len(text), len(text)) if answer is None else _span(text, answer, len(text),
                                                                        model, "answer")
    return Rendering(text, _span(text, question, answer_span[0], model, "question"), answer_span)


def render_rows(rows, tokenizer, prompt_format, model):
    """Rows ({id, question, answer, ...}) as `model` reads them: each gains `prompt` (what it
    generates from), `text` (prompt and answer, as it trains and is distilled on) and `segments`:
    None under plain, whose text is the plain text; under chat [(start in text, start in the
    plain text, length)] of the question and the answer, which map its offsets onto the plain
    text (kava.align.shared_spans)."""
    rendered = []
    for row in rows:
        prompt = render(tokenizer, row["question"], None, prompt_format, model).text
        full = render(tokenizer, row["question"], row["answer"], prompt_format, model)
        if not full.text.startswith(prompt) or full.answer[0] < len(prompt):
            raise KavaError(f"model {model}: its chat template renders the assistant turn "
                            f"differently from its generation prompt (row {row['id']}), so "
                            f"training and evaluation would read different prompts")
        segments = None
        if prompt_format != "plain":
            plain = render(None, row["question"], row["answer"], "plain", model)
            segments = [(full.question[0], plain.question[0], full.question[1] - full.question[0]),
                        (full.answer[0], plain.answer[0], full.answer[1] - full.answer[0])]
        rendered.append({**row, "prompt": prompt, "text": full.text, "segments": segments})
    return rendered
