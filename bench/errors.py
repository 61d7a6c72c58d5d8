"""Errors that reach the user as one line and exit code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. The CLI prints it and exits with 2."""
