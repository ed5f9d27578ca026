"""FedLEASE clustering: the Eq. 2 distance on B, the choice of M by silhouette (ties, small federations,
identical distances), canonical cluster ids, the spectral ablation and late clients
(docs/methods/fedlease.md#client-distance to #canonical-cluster-ids, #late-join)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from fedpeft.algorithms.fedlease.clustering import (
    ClusteringResult,
    assign_late_client,
    b_distance_matrix,
    canonical_labels,
    cluster_clients,
    linkage_matrix,
)
from fedpeft.errors import FedPeftError

KEYS = [f"layer.{layer}.{module}" for layer in range(2) for module in ("query", "value")]


def random_b(rng, n_clients, shape=(8, 2), keys=KEYS):
    return [{k: rng.normal(size=shape) for k in keys} for _ in range(n_clients)]


def grouped_b(groups, seed=0, shape=(16, 2), noise=0.05):
    """Per module, one random base direction per group; each client = scaled (base + small noise)."""
    rng = np.random.default_rng(seed)
    bases = {k: rng.normal(size=(max(groups) + 1, *shape)) for k in KEYS}
    return [
        {k: rng.uniform(0.5, 2.0) * (bases[k][g] + noise * rng.normal(size=shape)) for k in KEYS} for g in groups
    ]


def shuffled_groups(g, n=12, seed=0):
    """n clients in g equal groups, interleaved in a random order (so canonical ids are not trivial)."""
    return np.random.default_rng(seed).permutation(np.arange(n) % g).tolist()


def distance_from_uploads(uploads):
    """What the server does with warmup uploads {module: {"A": ..., "B": ...}}: Eq. 2 on B only."""
    return b_distance_matrix([{k: f["B"] for k, f in up.items()} for up in uploads])


def partition(labels):
    return sorted(sorted(i for i, x in enumerate(labels) if x == c) for c in set(labels))


# ------------------------------------------------------------------------ Eq. 2: the distance on B


def test_eq2_symmetric_zero_diagonal_in_range():
    rng = np.random.default_rng(1)
    clients = random_b(rng, 6)
    clients.append({k: -v for k, v in clients[0].items()})  # anti-correlated with client 0: d = 2
    clients.append({k: np.zeros_like(v) for k, v in clients[0].items()})  # zero B: d = 1 to everybody
    d = b_distance_matrix(clients)
    assert d.dtype == np.float64 and d.shape == (8, 8)
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    assert d.min() >= 0.0 and d.max() <= 2.0
    assert d[0, 6] == pytest.approx(2.0, abs=1e-12)
    np.testing.assert_allclose(d[7, :7], 1.0, atol=1e-12)


def test_eq2_invariant_to_positive_per_module_rescaling():
    rng = np.random.default_rng(2)
    clients = random_b(rng, 5)
    scaled = [{k: rng.uniform(0.01, 100.0) * v for k, v in c.items()} for c in clients]
    np.testing.assert_allclose(b_distance_matrix(scaled), b_distance_matrix(clients), atol=1e-12)
    flipped = [dict(c) for c in clients]
    flipped[0][KEYS[0]] = -flipped[0][KEYS[0]]  # a negative scale is not invariant
    assert not np.allclose(b_distance_matrix(flipped), b_distance_matrix(clients), atol=1e-6)


def test_eq2_ignores_a():
    rng = np.random.default_rng(3)
    uploads = [{k: {"A": rng.normal(size=(2, 8)), "B": rng.normal(size=(8, 2))} for k in KEYS} for _ in range(4)]
    d = distance_from_uploads(uploads)
    changed_a = [{k: {"A": 10 * rng.normal(size=(2, 8)), "B": f["B"]} for k, f in up.items()} for up in uploads]
    np.testing.assert_array_equal(distance_from_uploads(changed_a), d)
    changed_b = [{k: {"A": f["A"], "B": rng.normal(size=(8, 2))} for k, f in up.items()} for up in uploads]
    assert not np.allclose(distance_from_uploads(changed_b), d, atol=1e-6)


def test_eq2_hand_computation_two_layers_two_modules():
    e1 = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    e2 = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    q0, v0, q1, v1 = KEYS
    c0 = {q0: e1, v0: e1, q1: e1, v1: e1}
    c1 = {q0: 2 * e1, v0: -e1, q1: e2, v1: e1 + e2}  # cos with c0: 1, -1, 0, 1/sqrt2
    c2 = {q0: 0 * e1, v0: e1, q1: e1 + e2, v1: 3 * e2}  # zero B counts as cos 0
    r = 1 / math.sqrt(2)
    d01 = (0 + 2 + 1 + (1 - r)) / 4
    d02 = (1 + 0 + (1 - r) + 1) / 4
    d12 = (1 + 2 + (1 - r) + (1 - r)) / 4
    expected = np.array([[0, d01, d02], [d01, 0, d12], [d02, d12, 0]])
    np.testing.assert_allclose(b_distance_matrix([c0, c1, c2]), expected, atol=1e-12)


def test_eq2_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    clients = random_b(rng, 3)
    as_torch = [{k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in c.items()} for c in clients]
    as_f32 = [{k: v.astype(np.float32) for k, v in c.items()} for c in clients]
    np.testing.assert_allclose(b_distance_matrix(as_torch), b_distance_matrix(as_f32), atol=1e-12)


def test_eq2_permuting_clients_permutes_d():
    rng = np.random.default_rng(5)
    clients = random_b(rng, 7)
    perm = rng.permutation(7)
    d = b_distance_matrix(clients)
    np.testing.assert_allclose(b_distance_matrix([clients[p] for p in perm]), d[np.ix_(perm, perm)], atol=1e-12)


def test_eq2_bad_inputs_name_client_and_key():
    rng = np.random.default_rng(6)
    clients = random_b(rng, 3)
    missing = [dict(c) for c in clients]
    del missing[2][KEYS[1]]
    with pytest.raises(FedPeftError, match=r"Client 2 .*'layer\.0\.value'"):
        b_distance_matrix(missing)
    extra = [dict(c) for c in clients]
    extra[1]["layer.9.key"] = np.ones((8, 2))
    with pytest.raises(FedPeftError, match=r"Client 1 .*'layer\.9\.key'"):
        b_distance_matrix(extra)
    shape = [dict(c) for c in clients]
    shape[1][KEYS[3]] = np.ones((8, 3))
    with pytest.raises(FedPeftError, match=r"Client 1 .*'layer\.1\.value'.*shape"):
        b_distance_matrix(shape)
    nan = [dict(c) for c in clients]
    nan[2][KEYS[0]] = np.full((8, 2), np.nan)
    with pytest.raises(FedPeftError, match="Client 2"):
        b_distance_matrix(nan)
    with pytest.raises(FedPeftError):
        b_distance_matrix([])
    with pytest.raises(FedPeftError):
        b_distance_matrix([{}, {}])


# ------------------------------------------------------------------------ recovery, canonical ids


@pytest.mark.parametrize("g", [2, 3, 4])
def test_recovers_well_separated_groups_with_canonical_ids(g):
    truth = shuffled_groups(g)
    d = b_distance_matrix(grouped_b(truth, seed=g))
    res = cluster_clients(d, max_clusters=8)
    assert res.num_clusters == g
    assert adjusted_rand_score(truth, res.labels) == 1.0
    assert res.labels == canonical_labels(truth)
    assert res.labels[0] == 0
    firsts = [res.labels.index(c) for c in range(g)]
    assert firsts == sorted(firsts)  # ids increase with the first member
    assert sorted(res.silhouette) == list(range(2, 9))
    assert res.method == "hierarchical" and res.warnings == []
    assert res.clusters() == [[i for i, x in enumerate(res.labels) if x == c] for c in range(g)]


def test_canonical_labels():
    assert canonical_labels([2, 2, 0, 1, 0]) == [0, 0, 1, 2, 1]
    assert canonical_labels([5]) == [0]


def test_hierarchical_cut_gives_exactly_k_clusters_on_tied_heights():
    # Pairs {0,1} and {2,3} both merge at height 1, so no height cut has exactly 4 clusters (fcluster
    # "maxclust" with t=4 returns 3). Every candidate k must still be scored on a k-cluster partition.
    d = np.full((5, 5), 2.0)
    d[0, 1] = d[1, 0] = d[2, 3] = d[3, 2] = 1.0
    d[4, :] = d[:, 4] = 3.0
    np.fill_diagonal(d, 0.0)
    res = cluster_clients(d, max_clusters=4)
    assert sorted(res.silhouette) == [2, 3, 4]
    cuts = {2: [0, 0, 0, 0, 1], 3: [0, 0, 1, 1, 2], 4: [0, 0, 1, 2, 3]}  # k=4: by symmetry either pair may split
    for k, labels in cuts.items():
        assert res.silhouette[k] == pytest.approx(silhouette_score(d, labels, metric="precomputed"), abs=1e-12)
    assert abs(res.silhouette[4] - res.silhouette[3]) > 1e-3


# ------------------------------------------------------------------------ small federations


def test_single_client():
    res = cluster_clients(np.zeros((1, 1)))
    assert res.labels == [0] and res.num_clusters == 1 and res.silhouette == {}


@pytest.mark.parametrize("d01, m", [(0.7, 2), (0.5, 1), (0.3, 1), (0.0, 1)])
def test_two_clients_use_the_pair_threshold(d01, m):
    res = cluster_clients(np.array([[0.0, d01], [d01, 0.0]]))
    assert res.num_clusters == m
    assert res.labels == ([0, 1] if m == 2 else [0, 0])


def test_two_clients_threshold_is_a_parameter():
    d = np.array([[0.0, 0.3], [0.3, 0.0]])
    assert cluster_clients(d, pair_split_threshold=0.2).num_clusters == 2


def test_three_clients_evaluate_only_k2():
    d = np.array([[0.0, 0.1, 1.0], [0.1, 0.0, 1.0], [1.0, 1.0, 0.0]])
    res = cluster_clients(d, max_clusters=2)
    assert sorted(res.silhouette) == [2]
    assert res.labels == [0, 0, 1]


def test_max_clusters_above_n_minus_1_is_clamped_with_a_warning():
    d = b_distance_matrix(grouped_b([0, 1, 2, 3, 4], seed=7))
    with pytest.warns(UserWarning, match="max_clusters=10"):
        res = cluster_clients(d, max_clusters=10)
    assert sorted(res.silhouette) == [2, 3, 4]
    assert res.num_clusters <= 4
    assert len(res.warnings) == 1


def test_max_clusters_one_gives_one_cluster():
    d = b_distance_matrix(grouped_b([0, 0, 1, 1, 2, 2], seed=8))
    assert cluster_clients(d, max_clusters=3).num_clusters == 3  # the data do split ...
    res = cluster_clients(d, max_clusters=1)  # ... but M_max = 1 forbids it
    assert res.num_clusters == 1 and res.labels == [0] * 6 and res.silhouette == {}
    pair = np.array([[0.0, 1.5], [1.5, 0.0]])
    assert cluster_clients(pair, max_clusters=1).num_clusters == 1


def test_identical_b_matrices_give_one_cluster_with_a_warning():
    rng = np.random.default_rng(9)
    base = random_b(rng, 1)[0]
    d = b_distance_matrix([{k: s * v for k, v in base.items()} for s in (1.0, 2.0, 0.5, 3.0)])
    np.testing.assert_allclose(d, 0.0, atol=1e-12)
    with pytest.warns(UserWarning, match="silhouette is undefined"):
        res = cluster_clients(d, max_clusters=3)
    assert res.num_clusters == 1 and res.labels == [0, 0, 0, 0]
    assert res.warnings and "undefined" in res.warnings[-1]


# ------------------------------------------------------------------------ silhouette ties: the smaller k


def tie_matrix(r=2.0):
    """Clients {0, 1} at 1/4, client 2 at 1 from both, client 3 at 5/4 from {0, 1} and r from 2.

    Average linkage merges {0,1}, then {0,1,2}, then 3, so the cuts are k=3: {0,1},{2},{3} and
    k=2: {0,1,2},{3}. S(3) = (3/4 + 3/4 + 0 + 0)/4 = 3/8. For r = 2: s0 = s1 = 1 - (5/8)/(5/4) = 1/2,
    s2 = 1 - 1/2 = 1/2, s3 = 0, so S(2) = 3/8 as well (all exact in binary floating point).
    """
    d = np.array(
        [
            [0.0, 0.25, 1.0, 1.25],
            [0.25, 0.0, 1.0, 1.25],
            [1.0, 1.0, 0.0, r],
            [1.25, 1.25, r, 0.0],
        ]
    )
    return d


def test_tie_goes_to_smallest_k():
    d = tie_matrix()
    s2 = silhouette_score(d, [0, 0, 0, 1], metric="precomputed")
    s3 = silhouette_score(d, [0, 0, 1, 2], metric="precomputed")
    assert s2 == pytest.approx(0.375, abs=1e-12) and s3 == pytest.approx(0.375, abs=1e-12)
    res = cluster_clients(d, max_clusters=3)
    assert res.silhouette[2] == pytest.approx(res.silhouette[3], abs=1e-9)
    assert res.silhouette[2] == pytest.approx(s2, abs=1e-12)
    assert res.num_clusters == 2
    assert res.labels == [0, 0, 0, 1]


def test_tie_rule_is_sensitive():
    # Break the tie in favour of k = 3 (smaller r lowers s2 only): now M must be 3.
    res = cluster_clients(tie_matrix(r=1.9), max_clusters=3)
    assert res.silhouette[3] > res.silhouette[2] + 1e-3
    assert res.num_clusters == 3 and res.labels == [0, 0, 1, 2]


# ------------------------------------------------------------------------ determinism, upload order


def test_deterministic():
    truth = shuffled_groups(3, seed=11)
    d = b_distance_matrix(grouped_b(truth, seed=11, noise=0.6))  # noisy: a real test of tie-free determinism
    a, b = cluster_clients(d), cluster_clients(d.copy())
    assert a.labels == b.labels and a.silhouette == b.silhouette


@pytest.mark.parametrize("method", ["hierarchical", "spectral"])
def test_upload_order_does_not_change_any_clients_cluster(method):
    truth = shuffled_groups(4, seed=12)
    clients = grouped_b(truth, seed=12, noise=0.3)
    res = cluster_clients(b_distance_matrix(clients), method=method)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(clients))
        shuffled = cluster_clients(b_distance_matrix([clients[p] for p in perm]), method=method)
        assert shuffled.labels[0] == 0
        # upload slot s holds client perm[s]: same clients together, in the original numbering
        back = [None] * len(clients)
        for s, p in enumerate(perm):
            back[p] = shuffled.labels[s]
        assert partition(back) == partition(res.labels)
        assert shuffled.num_clusters == res.num_clusters


def test_permutation_of_a_generic_matrix():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(9, 3))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    res = cluster_clients(d, max_clusters=6)
    perm = rng.permutation(9)
    shuffled = cluster_clients(d[np.ix_(perm, perm)], max_clusters=6)
    assert partition([shuffled.labels[list(perm).index(i)] for i in range(9)]) == partition(res.labels)
    assert shuffled.silhouette == pytest.approx(res.silhouette, abs=1e-12)


# ------------------------------------------------------------------------ the spectral clustering ablation


@pytest.mark.parametrize("g", [2, 3, 4])
def test_spectral_equals_hierarchical_on_recovery_data(g):
    truth = shuffled_groups(g)
    d = b_distance_matrix(grouped_b(truth, seed=g))
    spectral = cluster_clients(d, method="spectral")
    hierarchical = cluster_clients(d, method="hierarchical")
    assert spectral.method == "spectral"
    assert spectral.labels == hierarchical.labels == canonical_labels(truth)
    assert spectral.num_clusters == g


# ------------------------------------------------------------------------ validation, linkage, late clients, json


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3)),
        np.zeros((0, 0)),
        np.zeros(4),
        np.array([[0.0, np.nan], [np.nan, 0.0]]),
        np.array([[0.0, np.inf], [np.inf, 0.0]]),
        np.array([[0.0, -0.2], [-0.2, 0.0]]),
    ],
)
def test_bad_distance_matrix_raises(bad):
    with pytest.raises(FedPeftError):
        cluster_clients(bad)


def test_bad_arguments_raise():
    d = tie_matrix()
    with pytest.raises(FedPeftError, match="kmeans"):
        cluster_clients(d, method="kmeans")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(FedPeftError, match="max_clusters"):
            cluster_clients(d, max_clusters=bad)
    with pytest.raises(FedPeftError):
        cluster_clients(d, pair_split_threshold=float("nan"))


def test_linkage_matrix_is_scipy_average_linkage():
    d = tie_matrix()
    z = linkage_matrix(d)
    assert z.shape == (3, 4)
    np.testing.assert_allclose(z[:, 2], [0.25, 1.0, (1.25 + 1.25 + 2.0) / 3], atol=1e-12)
    with pytest.raises(FedPeftError):
        linkage_matrix(np.zeros((1, 1)))


def test_assign_late_client():
    labels = [0, 0, 1, 1, 2]
    assert assign_late_client([0.1, 0.3, 0.9, 0.9, 0.5], labels) == 0
    assert assign_late_client([0.9, 0.9, 0.2, 0.6, 0.5], labels) == 1  # mean 0.4 beats the singleton at 0.5
    assert assign_late_client([0.9, 0.9, 0.2, 0.6, 0.3], labels) == 2
    assert assign_late_client([0.4, 0.6, 0.1, 0.9, 0.5], labels) == 0  # three-way tie at 0.5 -> smallest id
    assert assign_late_client(np.array([1.0, 0.2, 0.2, 1.0, 0.6]), labels) == 0  # 0.6 each: tie -> 0
    with pytest.raises(FedPeftError):
        assign_late_client([0.1, 0.2], labels)


def test_late_client_joins_its_group():
    truth = shuffled_groups(3, n=13, seed=14)
    clients = grouped_b(truth, seed=14)
    d = b_distance_matrix(clients)
    res = cluster_clients(d[:12, :12])
    assert assign_late_client(d[12, :12], res.labels) == res.labels[truth.index(truth[12])]


def test_result_json_is_plain():
    import json

    res = cluster_clients(tie_matrix(), max_clusters=3)
    assert isinstance(res, ClusteringResult)
    out = res.to_json()
    assert json.loads(json.dumps(out)) == out
    assert out["labels"] == [0, 0, 0, 1] and out["num_clusters"] == 2
    assert out["clusters"] == [[0, 1, 2], [3]]
    assert set(out["silhouette"]) == {"2", "3"}


def test_no_unexpected_warnings_on_clean_input():
    d = b_distance_matrix(grouped_b(shuffled_groups(4), seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cluster_clients(d)


def test_unit_rows_give_the_matrix_rows_of_every_joiner():
    """UnitRows (what _late_join compares joiners with): one joiner's row, and every joiner's row of a
    round from one product, each against the clustered clients and the joiners before it, equal the
    Eq. 2 matrix rows; a joiner with other modules is refused by name."""
    from fedpeft.algorithms.fedlease.clustering import UnitRows

    rng = np.random.default_rng(5)
    clients = [{"l0": rng.normal(size=(6, 2)), "l1": rng.normal(size=(4, 2))} for _ in range(9)]
    clients[6]["l0"] = np.zeros((6, 2))
    full = b_distance_matrix(clients)
    for i in range(3, 9):
        np.testing.assert_allclose(UnitRows(clients[:i]).late_rows([clients[i]])[0], full[i, :i], rtol=0, atol=1e-12)
    # all joiners' rows from one product: joiner t against the members and the joiners before it
    rows = UnitRows(clients[:3])
    late = rows.late_rows(clients[3:])
    for t, row in enumerate(late):
        np.testing.assert_allclose(row, full[3 + t, : 3 + t], rtol=0, atol=1e-12)
    with pytest.raises(FedPeftError, match="lacks B matrix 'l1'"):
        rows.late_rows([{"l0": rng.normal(size=(6, 2))}])


def test_float32_products_for_many_clients_agree_with_float64(monkeypatch):
    """Above GRAM_FLOAT32_ABOVE clients the Gram products are float32 (10^8 pairs at N = 10,000)."""
    from fedpeft.algorithms.fedlease import clustering as cl

    rng = np.random.default_rng(4)
    clients = [{"l0": rng.normal(size=(96, 4)), "l1": rng.normal(size=(96, 4))} for _ in range(40)]
    exact = cl.b_distance_matrix(clients)
    monkeypatch.setattr(cl, "GRAM_FLOAT32_ABOVE", 10)
    fast = cl.b_distance_matrix(clients)
    assert np.abs(fast - exact).max() < 1e-6 and not np.array_equal(fast, exact)


def _factored(rng, n, modules=2, r=2, d_out=6, d_in=5):
    return [{**{f"l{m}.B": rng.normal(size=(d_out, r)) for m in range(modules)},
             **{f"l{m}.A": rng.normal(size=(r, d_in)) for m in range(modules)}} for _ in range(n)]


def _products(clients):
    """The reference: each module's ΔW = B·A formed explicitly, compared by Eq. 2 as matrices."""
    mods = sorted({k[:-2] for k in clients[0]})
    return [{m: c[m + ".B"] @ c[m + ".A"] for m in mods} for c in clients]


def test_delta_w_distance_equals_eq2_on_the_formed_products():
    """--clustering-matrices delta_w: the factor form (r × r products per pair) equals Eq. 2 on the
    explicit d_out × d_in products, zero ΔW (cosine 0) included; late rows equal the matrix rows."""
    from fedpeft.algorithms.fedlease.clustering import DeltaWRows, delta_w_distance_matrix

    rng = np.random.default_rng(6)
    clients = _factored(rng, 9)
    clients[4]["l1.B"] = np.zeros((6, 2))
    full = b_distance_matrix(_products(clients))
    np.testing.assert_allclose(delta_w_distance_matrix(clients), full, rtol=0, atol=1e-12)
    late = DeltaWRows(clients[:3]).late_rows(clients[3:])
    for t, row in enumerate(late):
        np.testing.assert_allclose(row, full[3 + t, : 3 + t], rtol=0, atol=1e-12)
    # not B alone: the same B with A's sign flipped is the opposite update
    flipped = [dict(clients[0]), {**clients[0], "l0.A": -clients[0]["l0.A"], "l1.A": -clients[0]["l1.A"]}]
    assert b_distance_matrix([{k: v for k, v in c.items() if k.endswith(".B")} for c in flipped])[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert delta_w_distance_matrix(flipped)[0, 1] == pytest.approx(2.0)


def test_delta_w_blocks_and_float32_agree(monkeypatch):
    """The pairwise products go in blocks of clients, and float32 above GRAM_FLOAT32_ABOVE clients."""
    from fedpeft.algorithms.fedlease import clustering as cl

    rng = np.random.default_rng(7)
    clients = _factored(rng, 40, d_out=48, d_in=40, r=4)
    exact = cl.delta_w_distance_matrix(clients)
    monkeypatch.setattr(cl, "DELTA_W_BLOCK", 7)
    np.testing.assert_allclose(cl.delta_w_distance_matrix(clients), exact, rtol=0, atol=1e-12)
    monkeypatch.setattr(cl, "GRAM_FLOAT32_ABOVE", 10)
    fast = cl.delta_w_distance_matrix(clients)
    assert np.abs(fast - exact).max() < 1e-5 and not np.array_equal(fast, exact)


def test_delta_w_bad_inputs_name_the_matrix():
    from fedpeft.algorithms.fedlease.clustering import DeltaWRows, delta_w_distance_matrix

    rng = np.random.default_rng(8)
    clients = _factored(rng, 3)
    with pytest.raises(FedPeftError, match="both factors of module 'l1'"):
        delta_w_distance_matrix([{k: v for k, v in c.items() if k != "l1.A"} for c in clients])
    bad = [dict(c) for c in clients]
    bad[2]["l0.A"] = np.full((2, 5), np.nan)
    with pytest.raises(FedPeftError, match="Client 2 has non-finite values in matrix 'l0.A'"):
        delta_w_distance_matrix(bad)
    bad[2]["l0.A"] = np.ones((3, 5))
    with pytest.raises(FedPeftError, match="Client 2 has matrix 'l0.A' of shape"):
        delta_w_distance_matrix(bad)
    with pytest.raises(FedPeftError, match="lacks"):
        DeltaWRows(clients[:2]).late_rows([{k: v for k, v in clients[2].items() if k != "l0.B"}])
