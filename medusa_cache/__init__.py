"""medusa-cache: dump a backbone's post-norm hidden states once, then train Medusa heads from the cache."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medusa-cache")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.7.0"
