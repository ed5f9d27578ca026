"""Which clients train in a round, and which are scored: the same draw on every engine.

Round r's sample is ceil(f·N) clients (or exactly K with --clients-per-round), drawn uniformly
without replacement from a generator seeded by (run seed, "participation", r): every engine, and a
resumed run, draws the same clients. Under full participation every client trains every round.

Scoring: every `eval_every`-th round (and always the last) scores all clients, or with
`eval_clients = sampled` only the round's sample; the last round always scores every client.
"""

from __future__ import annotations


import numpy as np

from fedpeft.seeding import derive_seed


def sample_size(cfg, n: int) -> int:
    return cfg.sample_size(n)


def participants(cfg, n: int, rnd: int) -> list[int]:
    """The sorted client ids that train in round `rnd`."""
    k = sample_size(cfg, n)
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(cfg.seed, "participation", rnd))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def scored(cfg, n: int, rnd: int, rounds: int, sampled: list[int]) -> list[int]:
    """The client ids scored after round `rnd` (none in a round that is not scored)."""
    if rnd >= rounds:
        return list(range(n))
    if rnd % cfg.eval_every:
        return []
    return list(range(n)) if cfg.eval_clients == "all" else list(sampled)
