"""From a method name (fedpeft/methods.py) to its Algorithm class and instance."""

from __future__ import annotations

import importlib

from fedpeft.algorithms.base import Algorithm
from fedpeft.errors import FedPeftError
from fedpeft.methods import METHODS


def algorithm_class(method: str) -> type[Algorithm]:
    spec = METHODS.get(method)
    if spec is None:
        raise FedPeftError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    module, _, cls = spec.target.partition(":")
    return getattr(importlib.import_module(f"fedpeft.algorithms.{module}"), cls)


def get_algorithm(cfg) -> Algorithm:
    """The algorithm object for a (resolved) RunConfig; its runtime is not built yet."""
    return algorithm_class(cfg.method).create(cfg)
