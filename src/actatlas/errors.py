"""Errors meant for users, by kind. The CLI prints their message on one line and exits 2.

Library messages name settings by their Python names (``per_image``, ``icon_size``); the CLI
translates those names to its flags (``--per-image``) when it prints them (see
``actatlas.cli.common.flag_names``), so the library never speaks of command-line flags.
"""


class UserError(Exception):
    """A problem with the user's input or environment (the base of every actatlas error kind)."""


class ConfigError(UserError, ValueError):
    """An invalid setting: out of range, wrong type, or settings that contradict each other."""


class DataError(UserError):
    """Images or data that cannot be used: a missing folder, no readable image, a bad list file."""


class ModelError(UserError):
    """A model, its weights, labels or a layer that cannot be loaded or resolved."""


class OutputPathError(UserError):
    """An output path that cannot be written: a file in the way, no permission, a read-only file system."""


class RunStateError(UserError):
    """A run directory in the wrong state: a stage not run yet, an unfinished collect, no atlas."""


class RunLockedError(RunStateError):
    """Another process is writing into the run directory."""


ActatlasError = UserError  # the common base, under the name a library user may look for

__all__ = ["UserError", "ActatlasError", "ConfigError", "DataError", "ModelError", "RunStateError",
           "RunLockedError", "OutputPathError"]
