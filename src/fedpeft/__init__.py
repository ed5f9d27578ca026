"""fedpeft: federated, parameter-efficient fine-tuning of language models.

Heavy imports (torch, transformers, peft) are lazy: `import fedpeft` stays fast.
"""

from fedpeft.errors import FedPeftError

__version__ = "0.1.0"
__all__ = ["FedPeftError", "__version__"]
