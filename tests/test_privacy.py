"""User-level differential privacy (`--dp central|local`, algorithms/privacy.py) on the tiny BERT.

The invariants: every client update the server aggregates (central) or a client uploads (local,
before its noise) lies within the clip bound C; the noise has the configured standard deviation;
the ε reported is the one dp-accounting gives directly for the same parameters; with σ = 0 and
C = ∞ a DP run is the non-private run exactly; methods outside the FedAvg family refuse --dp.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.algorithms import privacy as P
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.run import run

pytest.importorskip("dp_accounting", reason="the privacy accountant is an extra: pip install 'fedpeft[dp]'")

TIMING = {"fit_seconds", "compute_seconds", "train_seconds"}


def _direct_epsilon(sigma, delta, n, k, releases):
    """ε from dp-accounting's own API, written out here: RDP, replace-one, fixed-size sampling."""
    import dp_accounting as dp
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    gauss = dp.GaussianDpEvent(sigma / 2)  # std σC over the replace-one sensitivity 2C
    event = gauss if k == n else dp.SampledWithoutReplacementDpEvent(n, k, gauss)
    acc.compose(dp.SelfComposedDpEvent(event, releases))
    return acc.get_epsilon(delta)


def _capture(monkeypatch):
    """Record what the server aggregates after `receive` (with each update's reference) and what
    clients upload after `upload`."""
    seen = {"server": [], "client": []}
    receive, upload = P.Privacy.receive, P.Privacy.upload

    def spy_receive(self, state, rnd, replies, sent_of):
        out = receive(self, state, rnd, replies, sent_of)
        seen["server"] += [(rnd, cid, msg.tensors, sent_of(cid)) for cid, msg in out.items()]
        return out

    def spy_upload(self, tensors, sent, *, cid, rnd):
        out = upload(self, tensors, sent, cid=cid, rnd=rnd)
        seen["client"].append((rnd, cid, out, dict(sent)))
        return out

    monkeypatch.setattr(P.Privacy, "receive", spy_receive)
    monkeypatch.setattr(P.Privacy, "upload", spy_upload)
    return seen


# ------------------------------------------------------------------ the clip bound
def test_clip_update_bounds_the_norm_over_all_tensors_float_rounding_included():
    gen = torch.Generator().manual_seed(0)
    sent = {"a": torch.randn(50, 7, generator=gen) * 1e3, "b": torch.zeros(9)}  # large references round hard
    up = {"a": sent["a"] + torch.randn(50, 7, generator=gen), "b": torch.randn(9, generator=gen)}
    norm = P.update_norm(up, sent)
    for clip in (norm * 2, norm / 3, 1e-3, 1e-9):
        out, before = P.clip_update(up, sent, clip)
        assert before == pytest.approx(norm)
        assert P.update_norm(out, sent) <= clip
        assert all(out[k].dtype == up[k].dtype and out[k].shape == up[k].shape for k in up)
    same, _ = P.clip_update(up, sent, math.inf)
    assert all(same[k] is up[k] for k in up)  # within the bound: the tensors as they were


@pytest.mark.parametrize("method,extra", [
    ("fedit", dict(head_policy="shared")),
    ("ffa-lora", {}),
    ("fedsa-lora", {}),
    ("fedprox", {}),
    ("fedlease", dict(warmup_rounds=2, global_rounds=3, head_policy="shared")),
])
def test_clip_bound_holds_for_every_aggregated_update(method, extra, tiny_cfg, tiny_backbone, monkeypatch):
    """Central: every update the server aggregates (uploads minus what the client was sent, over all
    it uploaded, shared heads included) has norm ≤ C, and C is small enough here to clip them all."""
    seen = _capture(monkeypatch)
    clip = 1e-3
    result = run(tiny_cfg(method=method, dp="central", dp_noise=0.5, dp_clip=clip, dp_seed=1,
                          **{"global_rounds": 2, **extra}), backbone=tiny_backbone)
    assert seen["server"], "nothing was aggregated"
    for rnd, cid, tensors, sent in seen["server"]:
        assert tensors, (rnd, cid)
        assert P.update_norm(tensors, sent) <= clip, (rnd, cid)
    if extra.get("head_policy") == "shared":
        assert any(k.startswith("head.") for _, _, t, _ in seen["server"] for k in t)
    last = result.history.rounds[-1]
    assert last["dp_clipped"] == last["dp_updates"] > 0 and last["dp_norm_max"] > clip


@pytest.mark.parametrize("method,extra", [("fedit", dict(head_policy="shared")),
                                          ("fedlease", dict(warmup_rounds=2, global_rounds=3))])
def test_local_clip_bound_holds_for_every_upload(method, extra, tiny_cfg, tiny_backbone, monkeypatch):
    """Local (σ = 0 to see the clipped update itself): every upload is within C of what the client was
    sent; FedLEASE's warmup upload is measured from the common initialisation."""
    seen = _capture(monkeypatch)
    clip = 1e-3
    run(tiny_cfg(method=method, dp="local", dp_noise=0.0, dp_clip=clip, **{"global_rounds": 2, **extra}),
        backbone=tiny_backbone)
    uploads = [u for u in seen["client"] if u[2]]
    assert len(uploads) >= 4
    for rnd, cid, tensors, sent in uploads:
        assert P.update_norm(tensors, sent) <= clip, (rnd, cid)


# ------------------------------------------------------------------ the noise
def _privacy(**overrides):
    cfg = RunConfig(**{"method": "fedit", "tasks": ["demo-sentiment"] * 4, "dp": "central", "dp_noise": 1.3,
                       "dp_clip": 0.7, "dp_seed": 5, **overrides})
    p = P.Privacy(cfg)
    p.bind(4)
    return p


def test_central_noise_has_the_configured_std():
    """The mean of a group gets N(0, (σ·C·max_i p_i)²) per element: σC on the bounded-weight sum."""
    p = _privacy()
    n = 200_000
    states = [{"x": torch.zeros(n)} for _ in range(3)]
    weights = [10, 30, 20]  # p_max = 30 / 60
    state = {}
    out = p.mean(state, 1, states, weights, "g")["x"].double()
    expected = 1.3 * 0.7 * 30 / 60
    # the sample std of n normals has relative standard error 1/sqrt(2n) = 0.16 %: 5 of them
    assert out.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * n))
    assert abs(out.mean().item()) < 5 * expected / math.sqrt(n)
    assert state["dp"]["releases"] == 1
    p.mean(state, 1, states, weights, "other group")  # same round: still one release
    assert state["dp"]["releases"] == 1


def test_local_noise_has_the_configured_std():
    p = _privacy(dp="local")
    n = 200_000
    sent = {"x": torch.full((n,), 3.0)}
    out = p.upload({"x": sent["x"].clone()}, sent, cid=0, rnd=1)["x"].double() - 3.0
    assert out.std().item() == pytest.approx(1.3 * 0.7, rel=5 / math.sqrt(2 * n))
    assert abs(out.mean().item()) < 5 * 1.3 * 0.7 / math.sqrt(n)


def test_noise_is_fresh_without_a_seed_and_repeatable_with_one():
    states, w = [{"x": torch.zeros(100)}], [1]
    seeded = [_privacy().mean({}, 1, states, w, "g")["x"] for _ in range(2)]
    assert torch.equal(*seeded)
    fresh = [_privacy(dp_seed=None).mean({}, 1, states, w, "g")["x"] for _ in range(2)]
    assert not torch.equal(*fresh)


# ------------------------------------------------------------------ the accountant
@pytest.mark.parametrize("sigma,n,k,releases", [(1.0, 16, 16, 1), (1.0, 16, 16, 20), (2.5, 100, 10, 50),
                                                (0.8, 16, 8, 5)])
def test_epsilon_matches_dp_accounting_directly(sigma, n, k, releases):
    assert P.epsilon(sigma, 1e-5, clients=n, sampled=k, releases=releases) == pytest.approx(
        _direct_epsilon(sigma, 1e-5, n, k, releases), rel=1e-12)


def test_full_participation_epsilon_is_the_gaussian_rdp_bound():
    """q = 1: T Gaussian releases of noise multiplier z = σ/2 have RDP T·α/(2z²) at order α; the
    library converts that to ε, which cannot exceed the classic conversion min_α RDP + log(1/δ)/(α−1)."""
    sigma, T, delta = 4.0, 10, 1e-5
    z = sigma / 2
    classic = min(T * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in [1 + x / 100 for x in range(1, 10000)])
    eps = P.epsilon(sigma, delta, clients=8, sampled=8, releases=T)
    assert eps <= classic and eps > 0.8 * classic


def test_calibrated_noise_meets_the_target_epsilon():
    sigma = P.calibrate_noise(4.0, 1e-5, clients=16, sampled=16, releases=10)
    assert P.epsilon(sigma, 1e-5, clients=16, sampled=16, releases=10) <= 4.0
    assert P.epsilon(sigma - 1e-3, 1e-5, clients=16, sampled=16, releases=10) > 4.0


def test_reported_epsilon_per_round_matches_the_library(tiny_cfg, tiny_backbone):
    """FedIT releases every round; FedLEASE first at the warmup upload (round W), then every round.
    The history's ε after round r is the library's for that many releases at q = 1."""
    fedit = run(tiny_cfg(dp="central", dp_noise=2.0, dp_clip=0.5, global_rounds=2), backbone=tiny_backbone)
    for entry in fedit.history.rounds[1:]:
        assert entry["dp_releases"] == entry["round"]
        assert entry["dp_epsilon"] == pytest.approx(_direct_epsilon(2.0, 1e-5, 4, 4, entry["round"]), rel=1e-12)
    lease = run(tiny_cfg(method="fedlease", dp="central", dp_noise=2.0, dp_clip=0.5, warmup_rounds=2,
                         global_rounds=3, output_dir=str(fedit.run_dir) + "-lease"), backbone=tiny_backbone)
    eps = {e["round"]: e["dp_epsilon"] for e in lease.history.rounds[1:]}
    assert eps[1] == 0.0
    assert eps[2] == pytest.approx(_direct_epsilon(2.0, 1e-5, 4, 4, 1), rel=1e-12)
    assert eps[3] == pytest.approx(_direct_epsilon(2.0, 1e-5, 4, 4, 2), rel=1e-12)
    summary = (lease.run_dir / "summary.md").read_text()
    assert f"({eps[3]:.4g}, 1e-05)-DP after round 3" in summary
    assert "DP (central) ε = " in (lease.run_dir / "training_log.txt").read_text()


def test_target_epsilon_sets_sigma_for_the_planned_rounds(tiny_cfg, tiny_backbone):
    result = run(tiny_cfg(dp="local", dp_epsilon=30.0, dp_clip=0.5, global_rounds=2), backbone=tiny_backbone)
    last = result.history.rounds[-1]
    assert last["dp_uploads_max"] == 2
    assert last["dp_epsilon"] == pytest.approx(30.0, rel=1e-3) and last["dp_epsilon"] <= 30.0
    assert last["dp_noise"] == pytest.approx(P.calibrate_noise(30.0, 1e-5, clients=1, sampled=1, releases=2))


# ------------------------------------------------------------------ σ = 0, C = ∞ is the plain run
def _records(result):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in sorted(result.history.records, key=lambda r: (r["round"], r["client"]))]


def _server_state(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["server_state"]
    state.pop("dp", None)
    return state


def _assert_same_state(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if not (isinstance(k, str) and k.endswith("seconds")):  # timings, not state
                _assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("method,extra", [("fedit", dict(head_policy="shared")),
                                          ("fedsa-lora", {}),
                                          ("fedlease", dict(warmup_rounds=2, global_rounds=3, head_policy="shared"))])
@pytest.mark.parametrize("mode", ["central", "local"])
def test_zero_noise_and_infinite_clip_reproduce_the_plain_run(method, extra, mode, tiny_cfg, tiny_backbone, tmp_path):
    base = {"method": method, "global_rounds": 2, **extra}
    plain = run(tiny_cfg(**base, output_dir=str(tmp_path / "plain")), backbone=tiny_backbone)
    private = run(tiny_cfg(**base, dp=mode, dp_noise=0.0, dp_clip=math.inf, output_dir=str(tmp_path / "dp")),
                  backbone=tiny_backbone)
    assert _records(private) == _records(plain)
    _assert_same_state(_server_state(private.run_dir), _server_state(plain.run_dir))
    assert private.history.rounds[-1]["dp_epsilon"] == math.inf


# ------------------------------------------------------------------ who may use it
@pytest.mark.parametrize("method", ["ifca", "feddpa", "leff", "fedlora", "fedbitfit", "slora", "fedavg-full"])
def test_methods_outside_the_fedavg_family_refuse_dp(method):
    with pytest.raises(FedPeftError, match=f"--dp central: {method} is not in the FedAvg family"):
        RunConfig(method=method, tasks=["sst2"], dp="central", dp_noise=1.0)


@pytest.mark.parametrize("bad,match", [
    (dict(dp="central"), "exactly one of --dp-noise"),
    (dict(dp="central", dp_noise=1.0, dp_epsilon=2.0), "exactly one of --dp-noise"),
    (dict(dp="local", dp_noise=1.0, dp_clip=math.inf), "--dp-clip inf bounds nothing"),
    (dict(dp_noise=1.0), "no effect without --dp"),
    (dict(dp="central", dp_noise=1.0, dp_delta=0.0), "--dp-delta must be in"),
    (dict(dp="central", dp_noise=-1.0), "--dp-noise must be 0 or more"),
])
def test_bad_dp_settings_are_refused(bad, match):
    with pytest.raises(FedPeftError, match=match):
        RunConfig(method="fedit", tasks=["sst2"], **bad)


def test_cli_refuses_dp_for_ifca_with_one_line(capsys):
    from fedpeft.cli import main

    assert main(["run", "--method", "ifca", "--tasks", "sst2", "--dp", "central", "--dp-noise", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error: --dp central: ifca is not in the FedAvg family") and err.count("\n") == 1


def test_run_help_groups_the_privacy_and_tracking_flags(capsys):
    from fedpeft.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    out = out[out.index("options:"):]  # past the usage line, which names every flag too
    privacy = out.index("\ndifferential privacy:")
    tracking = out.index("\nexperiment tracking:")
    for flag in ("--dp {off,central,local}", "--dp-clip", "--dp-noise", "--dp-epsilon", "--dp-delta", "--dp-seed"):
        assert privacy < out.index(flag) < tracking, flag
    for flag in ("--tracking {none,tensorboard,mlflow}", "--tracking-uri", "--tracking-experiment"):
        assert tracking < out.index(flag) < out.index("\noutput:"), flag


def test_sample_size_is_the_engines_rule():
    """What the accountant assumes (RunConfig.sample_size) is the number of clients the engine draws."""
    from fedpeft.engines.participation import participants

    for n in (1, 4, 16, 1000):
        for f in (0.05, 0.3, 0.5, 1.0):
            cfg = RunConfig(method="fedit", tasks=["sst2"], participation=f)
            assert cfg.sample_size(n) == len(participants(cfg, n, 3)) == max(1, min(n, -(-int(f * 100) * n // 100)))


@pytest.mark.flower
def test_local_noise_drawn_on_flower_clients_gives_the_in_process_numbers(tmp_path):
    """--dp local adds its noise inside the client's fit: on flower-sim (Ray workers) with a --dp-seed
    the run's metrics and ε are the local engine's."""
    pytest.importorskip("flwr", reason="Flower is an extra: pip install 'fedpeft[flower]'")
    from test_flower import _settings, assert_same_metrics

    over = dict(global_rounds=2, dp="local", dp_noise=0.3, dp_clip=0.05, dp_seed=3, head_policy="shared")
    local = run(RunConfig(**_settings(**over), output_dir=str(tmp_path / "local")))
    sim = run(RunConfig(**_settings(**over), engine="flower-sim", client_cpus=1.0, output_dir=str(tmp_path / "sim")))
    assert_same_metrics(local.run_dir, sim.run_dir)
    assert [r.get("dp_epsilon") for r in sim.history.rounds] == [r.get("dp_epsilon") for r in local.history.rounds]


def test_partial_participation_is_accounted_as_sampling_without_replacement(tiny_cfg, tiny_backbone):
    """K of N clients drawn each round: central ε is the library's SampledWithoutReplacement(N, K) event."""
    result = run(tiny_cfg(dp="central", dp_noise=2.0, dp_clip=0.5, global_rounds=2, clients_per_round=2),
                 backbone=tiny_backbone)
    for entry in result.history.rounds[1:]:
        assert entry["dp_updates"] == 2
        assert entry["dp_epsilon"] == pytest.approx(_direct_epsilon(2.0, 1e-5, 4, 2, entry["round"]), rel=1e-12)
    assert result.history.rounds[-1]["dp_epsilon"] < _direct_epsilon(2.0, 1e-5, 4, 4, 2)
