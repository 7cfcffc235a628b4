"""Shared helpers. Importing this package configures Jittor's environment first (utils.runtime)."""
from . import runtime  # noqa: F401  (side effect: environment for `import jittor`)
