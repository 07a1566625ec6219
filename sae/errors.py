class InputError(ValueError):
    """Bad input from the user. The CLI prints its message as one line and exits non-zero."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries append hints and tracebacks below it), or the
    exception's type name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
