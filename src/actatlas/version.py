"""The installed package's version (``0.0.0+local`` when running from a source tree without install)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("actatlas")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
