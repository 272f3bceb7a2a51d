"""medusa-cache: dump a backbone's post-norm hidden states once, then train Medusa heads from the cache."""

__version__ = "0.1.0"
