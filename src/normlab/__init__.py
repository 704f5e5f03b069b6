"""normlab: normalization methods for deep networks behind one API, tested against
their papers, with tools to put them into existing models."""

from normlab import convert, functional, init, nn, stats
from normlab.registry import create_norm, get_norm_spec, list_norms, register_norm

__version__ = "0.1.0"

__all__ = [
    "create_norm",
    "list_norms",
    "register_norm",
    "get_norm_spec",
    "nn",
    "functional",
    "stats",
    "convert",
    "init",
    "__version__",
]
