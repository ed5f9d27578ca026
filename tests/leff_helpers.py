"""Shared by the LEFF test files: an algorithm bound to its runtime and federation, as an engine binds it."""


def bound(cfg, backbone):
    """(algorithm, clients) for `cfg` on `backbone`: the local engine's data cut and binding."""
    from fedpeft.algorithms import get_algorithm
    from fedpeft.engines.common import prepare_clients

    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = get_algorithm(cfg)
    alg.bind(alg.build_runtime(backbone), infos)
    return alg, clients


def final_state(run_dir):
    """The server state a finished run checkpointed last."""
    import torch

    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["server_state"]
