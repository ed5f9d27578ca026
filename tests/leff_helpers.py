"""Shared by the LEFF test files: an algorithm bound to its runtime and federation, as an engine binds it."""


def bound(cfg, backbone):
    """(algorithm, clients) for `cfg` on `backbone`: the local engine's data cut and binding."""
    from fedpeft.run import bound as assemble

    return assemble(cfg, backbone)


def final_state(run_dir):
    """The server state a finished run checkpointed last."""
    import torch

    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["server_state"]
