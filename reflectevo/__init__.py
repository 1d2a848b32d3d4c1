"""reflectevo: small language models that learn from their own reflections (ReflectEvo, arXiv 2505.16475).

Importing the package is cheap on purpose: nothing here pulls in torch, transformers or datasets.
Heavy dependencies are imported inside the functions that need them.
"""

__version__ = "0.1.0"

from reflectevo.errors import (  # noqa: E402  (re-exported for users)
    CodeExecutionNotAllowed,
    DataError,
    ReflectEvoError,
    SandboxError,
    UnknownTaskError,
)

__all__ = [
    "__version__",
    "CodeExecutionNotAllowed",
    "DataError",
    "ReflectEvoError",
    "SandboxError",
    "UnknownTaskError",
]
