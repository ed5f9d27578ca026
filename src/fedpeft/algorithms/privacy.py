"""User-level differential privacy for the FedAvg family (`--dp central|local`): clipping, Gaussian
noise and the accountant. docs/privacy.md states the design and what it covers.

A client's *update* in a round is everything it uploads minus what it was sent (the global LoRA
factors it trained from, its cluster's expert and router, a shared head), taken as one vector. It is
clipped to L2 norm C (`--dp-clip`), and Gaussian noise of standard deviation σ·C (`--dp-noise`) is
added

- `central`: by the server, to each aggregation group's sum of clipped updates before it is divided
  (FedIT: the whole round; FedLEASE: each cluster). The server is trusted with the clipped updates;
  whatever it releases (the next broadcast, the checkpoint, the records) derives from the noisy sums.
- `local`: by the client, to its clipped update before the upload; the server sees only noisy uploads.

Weights (McMahan et al. 2018, DP-FedAvg, §2: each user's weight bounded by 1). The server keeps the
method's data-size weights p_i = n_i / Σ n_j over the group's replies, so a run with σ = 0 and C = ∞
is the non-private run exactly. Written as DP-FedAvg's bounded-weight sum, the group mean is
(Σ w_i·Δ̃_i + N(0, σ²C²)) / Σ w_i with w_i = n_i / max_j n_j ≤ 1: every client moves the sum by at
most C, the noise on the mean is σ·C·max_i p_i, and with equal n_i (every task-partition federation)
the weights are uniform. The sizes n_i are treated as public: the server learns them at discovery.

Accountant: RDP (Mironov 2017) from Google's `dp-accounting`, under the replace-one relation
(neighbouring federations differ in one client's examples, the number of clients and their sizes
fixed). Replacing a client moves a clipped sum by up to 2C, so each release is a Gaussian mechanism
with noise multiplier σ/2; the engine draws a fixed number K of the N clients each round, which is
sampling without replacement (Wang, Balle, Kasiviswanathan 2019), the event the library accounts for
under replace-one. Central: one release per round in which something was aggregated (a client
contributes to one group only). Local: no amplification (the server knows who sent what); ε is that
of the client that uploaded most often.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import statistics
from typing import Any, Callable, Mapping

import torch

from fedpeft.algorithms.messages import Message
from fedpeft.algorithms.tensors import weighted_mean
from fedpeft.errors import FedPeftError
from fedpeft.seeding import derive_seed

log = logging.getLogger("fedpeft")

INSTALL_HINT = "pip install 'fedpeft[dp]' (the dp-accounting package)"


# ------------------------------------------------------------ the accountant
def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise FedPeftError(f"--dp needs the privacy accountant: {INSTALL_HINT}") from None
    return dp_accounting


def dp_event(noise: float, *, clients: int, sampled: int, releases: int):
    """`releases` rounds, each adding noise of std σ·C (σ = `noise`) to sums of updates clipped to C
    over `sampled` of `clients` clients drawn without replacement: a `dp_accounting` DpEvent for the
    replace-one relation (sensitivity 2C, so the Gaussian's noise multiplier is σ/2)."""
    dp = _dp_accounting()
    gaussian = dp.GaussianDpEvent(noise / 2)
    one = gaussian if sampled >= clients else dp.SampledWithoutReplacementDpEvent(clients, sampled, gaussian)
    return dp.SelfComposedDpEvent(one, releases)


def _accountant():
    dp = _dp_accounting()
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=256)
def epsilon(noise: float, delta: float, *, clients: int, sampled: int, releases: int) -> float:
    """ε at `delta` after `releases` releases (RDP accountant of dp-accounting, replace-one)."""
    if releases <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    acc = _accountant()
    acc.compose(dp_event(noise, clients=clients, sampled=sampled, releases=releases))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, *, clients: int, sampled: int, releases: int) -> float:
    """The smallest σ (to 1e-4) whose ε after `releases` releases is at most `target_epsilon`."""
    from dp_accounting import mechanism_calibration as mc

    if releases <= 0:
        return 0.0
    sigma = mc.calibrate_dp_mechanism(
        _accountant, lambda s: dp_event(s, clients=clients, sampled=sampled, releases=releases),
        target_epsilon, delta, bracket_interval=mc.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4)
    while epsilon(sigma, delta, clients=clients, sampled=sampled, releases=releases) > target_epsilon:
        sigma += 1e-4  # Brent's bracket may end on the wrong side by at most tol
    return float(sigma)


def planned_releases(cfg) -> int:
    """Rounds in which the server aggregates uploads: every round, or for FedLEASE the warmup upload
    (its Eq. 3 experts) and each round after it. Under local DP, the most uploads one client makes."""
    return cfg.phase2_rounds + 1 if cfg.has_warmup else cfg.global_rounds


# ------------------------------------------------------------ clipping and noise
def update_norm(tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the update over all uploaded tensors, in float64."""
    total = 0.0
    for key, t in tensors.items():
        total += float(((t.to(torch.float64) - sent[key].to(torch.float64)) ** 2).sum())
    return math.sqrt(total)


def clip_update(tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """(sent + the update scaled to norm ≤ `clip`, the norm before clipping). Tensors within the bound
    are returned as they are; clipped ones keep their dtype, and the factor is shrunk until the stored
    tensors satisfy the bound, float rounding included."""
    missing = [k for k in tensors if k not in sent]
    if missing:
        raise RuntimeError(f"no reference for uploaded tensor {missing[0]}: cannot form the update")
    norm = update_norm(tensors, sent)
    if norm <= clip:
        return dict(tensors), norm
    factor = clip / norm
    for _ in range(50):
        out = {k: (sent[k].to(torch.float64) + (t.to(torch.float64) - sent[k].to(torch.float64)) * factor).to(t.dtype)
               for k, t in tensors.items()}
        if update_norm(out, sent) <= clip:
            return out, norm
        factor *= 1 - 1e-6
    return {k: sent[k].clone() for k in tensors}, norm  # rounding alone exceeds the bound: send nothing


def _generator(seed: int | None, *parts: object) -> torch.Generator:
    """The noise source: from the OS's randomness, or from `--dp-seed` to reproduce an experiment."""
    value = secrets.randbits(63) if seed is None else derive_seed(seed, "dp-noise", *parts)
    return torch.Generator().manual_seed(value)


def add_noise(tensors: Mapping[str, torch.Tensor], std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Each element plus N(0, std²), drawn in float64, stored in the tensor's dtype."""
    return {k: (t.to(torch.float64) + torch.randn(t.shape, generator=gen, dtype=torch.float64) * std).to(t.dtype)
            for k, t in tensors.items()}


# ------------------------------------------------------------ the run's privacy
class Privacy:
    """The DP steps of one algorithm instance; with `--dp off` each is the identity.

    Server: `receive` (central: clip each reply's update; local: count the uploads), `mean` (the
    method's weighted mean; central: plus the noise of its group's sum), `report` (ε so far, for the
    round's history entry and log line). Client: `upload` (local: clip and noise before sending).
    What the server needs between rounds (releases and uploads counted) lives in `state["dp"]`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mode = getattr(cfg, "dp", "off")
        self.clients: int | None = None

    @property
    def on(self) -> bool:
        return self.mode != "off"

    @property
    def central(self) -> bool:
        return self.mode == "central"

    @property
    def local(self) -> bool:
        return self.mode == "local"

    @property
    def clip(self) -> float:
        return float(self.cfg.dp_clip)

    def bind(self, clients: int) -> None:
        self.clients = clients
        if self.on:
            _dp_accounting()  # a missing package fails before round 1, not at its end

    @property
    def sampled(self) -> int:
        return self.cfg.sample_size(self.clients)

    @property
    def noise(self) -> float:
        """σ: --dp-noise, or calibrated once to --dp-epsilon for the run's planned releases."""
        if self.cfg.dp_noise is not None:
            return float(self.cfg.dp_noise)
        clients, sampled = (self.clients, self.sampled) if self.central else (1, 1)
        return calibrate_noise(float(self.cfg.dp_epsilon), float(self.cfg.dp_delta), clients=clients,
                               sampled=sampled, releases=planned_releases(self.cfg))

    # ------------------------------------------------------------ server
    def receive(self, state: dict[str, Any], rnd: int, replies: Mapping[int, Message],
                sent_of: Callable[[int], Mapping[str, torch.Tensor]]) -> dict[int, Message]:
        """The replies the server aggregates. Central: each update clipped against what the client was
        sent (`sent_of(client)`, names as in the reply); local: counted as uploads, left as they are."""
        if not self.on or not replies:
            return dict(replies)
        dp = state.setdefault("dp", {"releases": 0, "uploads": {}})
        if self.local:
            for cid in replies:
                dp["uploads"][cid] = dp["uploads"].get(cid, 0) + 1
            return dict(replies)
        out, norms = {}, []
        for cid, reply in replies.items():
            tensors, norm = clip_update(reply.tensors, sent_of(cid), self.clip)
            out[cid] = Message(tensors, reply.config)
            norms.append(norm)
        seen = dp.get("norms") if dp.get("norms_round") == rnd else None
        dp["norms"], dp["norms_round"] = (seen or []) + norms, rnd
        return out

    def mean(self, state: dict[str, Any], rnd: int, states: list[Mapping[str, torch.Tensor]],
             weights: list[float], group: Any, average=weighted_mean) -> dict[str, torch.Tensor]:
        """The weighted mean of one aggregation group; central: plus N(0, (σ·C·max_i p_i)²) per element,
        the noise σC of the group's bounded-weight sum divided with it (module docstring). `average`
        is the method's own (FedIT's `--aggregation`); under --dp it is the weighted mean (config.py
        refuses a robust aggregation with --dp: the accountant's sensitivity is the mean's)."""
        out = average(states, weights)
        if not self.central:
            return out
        dp = state.setdefault("dp", {"releases": 0, "uploads": {}})
        if dp.get("released_round") != rnd:
            dp["releases"] += 1
            dp["released_round"] = rnd
        sigma = self.noise
        if sigma == 0:
            return out
        std = sigma * self.clip * max(weights) / sum(weights)
        return add_noise(out, std, _generator(self.cfg.dp_seed, "central", rnd, repr(group)))

    def spent(self, state: dict[str, Any]) -> float:
        """ε at δ spent so far."""
        dp = state.get("dp", {"releases": 0, "uploads": {}})
        if self.central:
            return epsilon(self.noise, float(self.cfg.dp_delta), clients=self.clients, sampled=self.sampled,
                           releases=dp["releases"])
        most = max(dp["uploads"].values(), default=0)
        return epsilon(self.noise, float(self.cfg.dp_delta), clients=1, sampled=1, releases=most)

    def report(self, state: dict[str, Any], rnd: int) -> dict[str, Any]:
        """The round's DP values for its history entry, and the log line saying them."""
        if not self.on:
            return {}
        dp = state.get("dp", {"releases": 0, "uploads": {}})
        eps, sigma = self.spent(state), self.noise
        info: dict[str, Any] = {"dp_epsilon": eps, "dp_delta": float(self.cfg.dp_delta), "dp_noise": sigma,
                                "dp_clip": self.clip, "dp_mode": self.mode}
        if self.central:
            info["dp_releases"] = dp["releases"]
        else:
            info["dp_uploads_max"] = max(dp["uploads"].values(), default=0)
        norms = dp.get("norms") if dp.get("norms_round") == rnd else None
        detail = ""
        if norms:
            clipped = sum(n > self.clip for n in norms)
            info.update(dp_updates=len(norms), dp_clipped=clipped, dp_norm_median=statistics.median(norms),
                        dp_norm_max=max(norms))
            detail = f"; {clipped} of {len(norms)} updates clipped (median norm {statistics.median(norms):.3g})"
        log.info("round %d: DP (%s) ε = %.4g at δ = %g, σ = %.4g, C = %g%s", rnd, self.mode, eps,
                 self.cfg.dp_delta, sigma, self.clip, detail)
        return info

    # ------------------------------------------------------------ client
    def upload(self, tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], *,
               cid: int, rnd: int) -> dict[str, torch.Tensor]:
        """What a client uploads. Local: sent + its update clipped to C + N(0, σ²C²) per element."""
        if not self.local or not tensors:
            return dict(tensors)
        clipped, _ = clip_update(tensors, sent, self.clip)
        sigma = self.noise
        if sigma == 0:
            return clipped
        return add_noise(clipped, sigma * self.clip, _generator(self.cfg.dp_seed, "local", cid, rnd))
