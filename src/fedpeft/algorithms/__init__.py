"""Federated methods, one file each; `get_algorithm` maps a method name to its class."""

from __future__ import annotations

from fedpeft.errors import FedPeftError


def algorithm_classes() -> dict:
    from fedpeft.algorithms.fedit import FedIT

    return {"fedit": FedIT}


def get_algorithm(cfg):
    classes = algorithm_classes()
    if cfg.method not in classes:
        raise FedPeftError(f"method {cfg.method!r} is not available yet in this version: use one of {', '.join(classes)}")
    return classes[cfg.method](cfg)
