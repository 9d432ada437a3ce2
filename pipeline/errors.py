"""Errors a user can cause. The runner prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the command line, the config or the inputs, with a message that says what to do."""
