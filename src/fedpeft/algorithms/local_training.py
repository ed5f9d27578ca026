"""What a client does with the runtime model, for every method: one local run, its report, scoring."""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.algorithms.messages import Client
from fedpeft.seeding import derive_seed


def train(cfg, model, client: Client, params: list[torch.nn.Parameter], *, tag: str, rnd: int,
          epochs: int | None = None, **kwargs):
    """One local run over `params` with the run's optimiser settings and the seed of (tag, client,
    round), for `epochs` (default: --local-epochs). Grads are on for exactly these parameters during
    the run and off after it. `kwargs` go to `training.train_local` (FedProx's extra loss,
    FedLEASE's warmup optimiser state)."""
    from fedpeft.training import train_local

    params = list(params)
    for p in params:
        p.requires_grad_(True)
    kwargs.setdefault("constant_lr", cfg.constant_lr)
    try:
        stats = train_local(
            model, client.train, params, epochs=epochs or cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
            seed=derive_seed(cfg.seed, tag, client.cid, rnd), weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, precision=cfg.precision, regression=client.regression, **kwargs)
    finally:
        for p in params:
            p.requires_grad_(False)
    # A client never keeps (nor sends) a diverged model: the fit fails, the engine restores the
    # client's store to before the round, and the client misses this round. This also covers what
    # no server check sees, such as FedLEASE's warmup LoRA between its uploads.
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise FloatingPointError(f"client {client.cid}: local training ({tag}, round {rnd}) diverged to NaN/Inf "
                                 f"parameters (train loss {stats.loss:.4g}); a lower --lr may help")
    return stats


def fit_report(client: Client, stats) -> dict[str, Any]:
    """The plain values every fit reply carries: n_i and what the local run measured."""
    return {"num_examples": len(client.train), "train_loss": stats.loss, "train_seconds": stats.seconds,
            "compute_seconds": stats.compute_seconds, "real_tokens": stats.real_tokens,
            "padded_tokens": stats.padded_tokens}


def score(cfg, model, client: Client) -> dict[str, Any]:
    """The client's test metrics with the state the model holds: the task's metrics and the mean
    loss; for a generation task, generated text scored against the references, and the target loss.
    A classification or regression task also returns its per-example outcome under
    `fedpeft.metrics.EXAMPLES` (the engine takes it out of the record)."""
    if client.is_generation:
        from fedpeft.generation import GenerationSettings, generate, score_generation
        from fedpeft.training import lm_mean_loss

        hyps = generate(model, client.test, GenerationSettings.from_config(cfg), cfg.precision)
        metrics = score_generation(client.info.task, hyps, client.test.references)
        metrics["loss"] = lm_mean_loss(model, client.test, batch_size=cfg.eval_batch_size, precision=cfg.precision)
        return metrics
    from fedpeft.metrics import EXAMPLES, compute_metrics, example_outcome
    from fedpeft.training import predict

    preds, loss = predict(model, client.test, batch_size=cfg.eval_batch_size, precision=cfg.precision,
                          regression=client.regression)
    metrics = compute_metrics(client.info.task, preds, client.test.labels)
    metrics["loss"] = loss
    metrics[EXAMPLES] = example_outcome(client.info.task, preds, client.test.labels)
    return metrics
