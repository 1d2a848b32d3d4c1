"""reflectevo: small language models that learn from their own reflections (ReflectEvo, arXiv 2505.16475).

Importing the package is cheap on purpose: nothing here pulls in torch, transformers or datasets.
Heavy dependencies are imported inside the functions that need them.
"""

__version__ = "0.1.0"

from reflectevo.errors import (
    CodeExecutionNotAllowed,
    DataError,
    ReflectEvoError,
    SandboxError,
    UnknownTaskError,
)

__all__ = [
    "CodeExecutionNotAllowed",
    "DataError",
    "ReflectEvoError",
    "SandboxError",
    "UnknownTaskError",
    "__version__",
]
