class InputError(ValueError):
    """Bad input from the user. The CLI prints its message as one line and exits non-zero."""
