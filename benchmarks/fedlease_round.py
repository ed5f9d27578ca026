"""FedLEASE cost against FedIT on the packaged MiniLM.

Prints, from one run:
  1. wall time of one training round (configure → every client fits → aggregate) for FedIT and for a
     FedLEASE Phase-2 round with M experts, medians over repeats, and their ratio;
  2. clustering time for 16 clients (Eq. 2 + average linkage + silhouette), MiniLM and RoBERTa-large
     B-matrix shapes;
  3. bytes up/down per client per round, counted on the real messages, against FedLEASE's closed
     form (docs/methods/fedlease.md#communication).

    python benchmarks/fedlease_round.py [--clients 8] [--samples 200] [--experts 4] [--repeats 3]

Real SST-2/MRPC from $FEDPEFT_DATA_DIR when set, else the bundled demo tasks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from fedpeft.algorithms.fedit import FedIT
from fedpeft.algorithms.fedlease.algorithm import FedLEASE
from fedpeft.algorithms.fedlease.clustering import b_distance_matrix, cluster_clients
from fedpeft.config import RunConfig
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients
from fedpeft.models.backbone import load_backbone


def one_round(alg, clients, state, rnd):
    t0 = time.perf_counter()
    ins = alg.configure(state, rnd, list(range(len(alg.federation))))
    replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
    state = alg.aggregate(state, rnd, replies)
    return time.perf_counter() - t0, ins, replies, state


def setup(method, cfg, backbone):
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = build_algorithm(cfg, backbone, infos)
    assert isinstance(alg, FedIT if method == "fedit" else FedLEASE)
    return alg, clients


def fedlease_phase2_state(alg, m):
    """A Phase-2 server state with M clusters assigned round-robin (clustering is timed separately)."""
    state = alg.init()
    cluster_of = {c.client_id: c.client_id % m for c in alg.federation}
    alg._start_phase2(state, cluster_of, {cid: state["lora"] for cid in cluster_of}, m)
    return state


def time_rounds(args, backbone, tasks, data_dir):
    common = dict(tasks=tasks, train_samples=args.samples, test_samples=16, local_epochs=1, batch_size=32,
                  max_length=128, data_dir=data_dir, quiet=True, warmup_rounds=0, global_rounds=2)
    fedit, fedit_clients = setup("fedit", RunConfig(method="fedit", **common), backbone)
    lease, lease_clients = setup("fedlease", RunConfig(method="fedlease", experts="clustered", **{
        **common, "warmup_rounds": 1, "global_rounds": 3}), backbone)
    s_fedit = fedit.init()
    s_lease = fedlease_phase2_state(lease, args.experts)
    t_fedit, t_lease = [], []
    # Warm-up passes; they also deliver the one-time head initialisation, so the timed rounds and
    # the byte counts below are steady-state rounds.
    s_fedit = one_round(fedit, fedit_clients, s_fedit, 1)[3]
    s_lease = one_round(lease, lease_clients, s_lease, 2)[3]
    _, ins_l, rep_l, _ = one_round(lease, lease_clients, s_lease, 2)
    _, ins_f, rep_f, _ = one_round(fedit, fedit_clients, s_fedit, 2)
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t_fedit.append(one_round(fedit, fedit_clients, s_fedit, 2)[0])
        t_lease.append(one_round(lease, lease_clients, s_lease, 2)[0])
    return t_fedit, t_lease, (ins_f, rep_f), (ins_l, rep_l), lease


def clustering_times(repeats=5):
    rows = []
    rng = np.random.default_rng(0)
    for name, modules, d_out, r in (("MiniLM (12 modules, 384×4)", 12, 384, 4),
                                    ("RoBERTa-large (48 modules, 1024×4)", 48, 1024, 4)):
        centres = [{f"m{k}": rng.normal(size=(d_out, r)) for k in range(modules)} for _ in range(4)]
        clients = [{k: v + 0.5 * rng.normal(size=v.shape) for k, v in centres[i // 4].items()} for i in range(16)]
        times, m = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = cluster_clients(b_distance_matrix(clients), max_clusters=8)
            times.append(time.perf_counter() - t0)
            m = res.num_clusters
        rows.append((name, statistics.median(times), m))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data_dir = os.environ.get("FEDPEFT_DATA_DIR")
    half = args.clients // 2
    tasks = ["sst2"] * half + ["mrpc"] * (args.clients - half) if data_dir else \
        ["demo-sentiment"] * half + ["demo-paraphrase"] * (args.clients - half)
    backbone = load_backbone("minilm")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MiniLM; {args.clients} clients "
          f"({', '.join(dict.fromkeys(tasks))}), {args.samples} examples each, 1 local epoch, batch 32\n")

    t_fedit, t_lease, (ins_f, rep_f), (ins_l, rep_l), lease = time_rounds(args, backbone, tasks, data_dir)
    mf, ml = statistics.median(t_fedit), statistics.median(t_lease)
    print("1. One training round (median of %d)" % args.repeats)
    print(f"   {'method':<28}{'seconds':>10}{'ratio':>8}")
    print(f"   {'FedIT (r=4)':<28}{mf:>10.2f}{1.0:>8.2f}")
    print(f"   {f'FedLEASE phase 2 (M={args.experts})':<28}{ml:>10.2f}{ml / mf:>8.2f}   (target ≤ 1.30)\n")

    print("2. Clustering 16 clients (Eq. 2 + average linkage + silhouette over k = 2..8), median of 5")
    for name, seconds, m in clustering_times():
        print(f"   {name:<38}{seconds * 1e3:>8.1f} ms   M = {m}   (target < 1 s)")

    # Bytes per client per Phase-2 round: counted vs the closed form (docs/methods/fedlease.md#communication).
    experts = {k[len('moe.'):]: v for k, v in ins_l[0].tensors.items() if ".expert." in k}
    routers = {k[len('moe.'):]: v for k, v in ins_l[0].tensors.items() if k.endswith(".router")}
    p_e = sum(v.numel() for k, v in experts.items() if ".expert.0." in k)
    p_r = sum(v.numel() for v in routers.values())
    up_cf, down_cf = 4 * (p_e + p_r), 4 * (args.experts * p_e + p_r)
    ups = {r.nbytes for r in rep_l.values()}
    downs = {i.nbytes for i in ins_l.values()}
    print("\n3. Bytes per client per round (float32, head local, routers averaged in the cluster)")
    print(f"   {'':<24}{'counted':>12}{'closed form':>14}")
    print(f"   {'FedLEASE up':<24}{max(ups):>12,}{up_cf:>14,}   {'equal' if ups == {up_cf} else 'DIFFERENT'}")
    print(f"   {'FedLEASE down':<24}{max(downs):>12,}{down_cf:>14,}   {'equal' if downs == {down_cf} else 'DIFFERENT'}")
    print(f"   {'FedIT up = down':<24}{max(r.nbytes for r in rep_f.values()):>12,}{4 * p_e:>14,}")
    print(f"   (P_E = {p_e:,} parameters per expert, P_R = {p_r:,} router parameters)")


if __name__ == "__main__":
    main()
