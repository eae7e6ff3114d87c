"""detaudit: audit LLM nondeterminism at temperature 0.

Public entry points are re-exported here; everything else may move between releases.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("detaudit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
