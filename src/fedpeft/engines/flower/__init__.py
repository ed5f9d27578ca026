"""The Flower engine: the same Algorithm objects on Flower's Simulation Engine (`--engine flower-sim`)
or across machines (SuperLink + SuperNodes running the fedpeft ServerApp / ClientApp, see fedpeft/flower_app.py).

Flower is an optional extra (`pip install fedpeft[flower]`); nothing here is imported by
`import fedpeft`. Flower's (and Ray's) telemetry stays off unless the user set the variables.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning on CPU


def require_flower() -> None:
    """Raise a FedPeftError saying how to install Flower when it is missing."""
    import importlib.util

    from fedpeft.errors import FedPeftError

    if importlib.util.find_spec("flwr") is None:
        raise FedPeftError('the Flower engine needs Flower: pip install "fedpeft[flower]" '
                           '(or "flwr[simulation]>=1.41,<1.43")')
