"""Errors meant for users: the CLI prints their message without a traceback and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (unknown model, layer or class, empty folder, bad config)."""
