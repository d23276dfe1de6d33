"""domainfm: continual pretraining of general vision backbones on a domain's own data.

The core (this package) knows no domain; plugins found through the ``domainfm.plugins``
entry-point group bring data, labels and evaluators. Heavy libraries (torch, lightning,
mlflow, timm) are imported inside the functions that need them so that the CLI answers
``--help`` at once.
"""

__version__ = "0.1.0"

from domainfm.errors import DomainFMError  # noqa: E402  (light: no third-party import)

__all__ = ["DomainFMError", "__version__"]
