"""Loaded by Python at start-up when this folder is on PYTHONPATH: makes the `local` extra's modules unimportable,
so a test sees detaudit exactly as an endpoint-only install (`pip install detaudit`, no torch) would."""

import sys
from importlib.abc import MetaPathFinder

LOCAL_EXTRA = {"torch", "triton", "transformers", "safetensors", "tokenizers", "fastapi", "uvicorn"}


class _NoLocalExtra(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in LOCAL_EXTRA:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoLocalExtra())
