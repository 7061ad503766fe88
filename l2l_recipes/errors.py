"""The one exception type that reaches users as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (name, option, data, file); the message says how to fix it."""
    quiet = False  # True: another process prints the same message (rank 0 under torchrun); exit without it
