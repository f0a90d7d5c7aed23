"""The GSM8K answer grammar, in one place: how a number is written, the `#### N` final line a
dataset answer ends in (kava.data), and how a generated answer is read and graded
(kava.evaluate)."""

import re

from kava.errors import KavaError

# A number's integer part as GSM8K writes it: thousands commas only in groups of three.
_INTEGER = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
# A number anywhere in text: optional sign and `$`, optional decimals. The look-behind keeps
# `x2`, `3-4` (a range, not -4) and `.5` fragments out.
NUMBER = re.compile(rf"(?<![\w.])(-)?\$?(-)?({_INTEGER})(?:\.(\d+))?")
# A dataset answer's last line: `#### 1,234` (GSM8K writes thousands commas; `$` and decimals
# occur in other GSM8K-format data).
FINAL_LINE = re.compile(rf"####[ \t]*(-?\$?{_INTEGER}(?:\.\d+)?)[ \t]*\Z")
# A finished final-answer line in generated text: `#### <something with a digit>` and a newline.
ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


def _normalise(match):
    """Canonical text of a NUMBER match: no `$`, no commas, no trailing decimal zeros."""
    negative, negative_after_dollar, integer, decimals = match.groups()
    text = integer.replace(",", "").lstrip("0") or "0"
    decimals = (decimals or "").rstrip("0")
    if decimals:
        text += "." + decimals
    if (negative or negative_after_dollar) and text != "0":
        text = "-" + text
    return text


def extract_answer(text):
    """The final answer in `text`: the first number after the last `####`, else the last number
    anywhere. Normalised (`$1,234.00` -> `1234`, `-3` stays `-3`, `7.` -> `7`); None if there is
    no number."""
    marker = text.rfind("####")
    if marker >= 0:
        after = NUMBER.search(text, marker + 4)
        if after:
            return _normalise(after)
    numbers = list(NUMBER.finditer(text))
    return _normalise(numbers[-1]) if numbers else None


def is_correct(pred_text, reference_number):
    """Exact match of the answer extracted from `pred_text` with the reference, both normalised.
    The reference may be a number or a string such as "1,234"; one that is not a number is a
    KavaError, since grading against it would silently score zero."""
    reference = str(reference_number).strip()
    match = NUMBER.fullmatch(reference)
    if match is None:
        raise KavaError(f"reference answer {reference!r} is not a number")
    return extract_answer(pred_text) == _normalise(match)
