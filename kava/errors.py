"""The one error type a user should ever see from kava."""


class KavaError(Exception):
    """Bad input or a failed precondition. The message is one line and names the culprit
    (file, key, row, model); stages print it and exit non-zero, without a traceback."""
