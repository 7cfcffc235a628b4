"""The project's scripts (train.py, test.py, demo.py, benchmarks/*.py) loaded as modules in tests:
they are files, not packages, and ``import test`` could find the standard library's package."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """The script at ``relative_path`` (from the repository root), executed as a fresh module."""
    path = ROOT / relative_path
    name = relative_path.replace("/", "_").removesuffix(".py") + "_script"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
