"""FedLEASE client clustering: Eq. 2 distance on the LoRA B matrices, and the choice of M by silhouette
(docs/methods/fedlease.md#client-distance, #choosing-m-by-silhouette).

Pure numpy/scipy/scikit-learn. Tensors may be torch tensors or numpy arrays; torch is never imported.
scikit-learn is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from fedpeft.errors import FedPeftError

METHODS = ("hierarchical", "spectral")
TIE_TOL = 1e-9  # silhouette scores this close count as equal; the smaller k (fewer experts) wins
IDENTICAL_TOL = 1e-12  # all off-diagonal distances at or below this: silhouette undefined, M = 1; also
#                        the tie tolerance of a late client's mean distances


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Eq. 2
# ---------------------------------------------------------------------------------------------


# Above this many clients the per-module Gram matrices (N² · numel multiply-adds each, 10^8 pairs at
# N = 10,000) are multiplied in float32 and summed in float64: about 4× faster on CPUs with wide
# float32 units, and the distances agree with the float64 ones to ~1e-6 (tests/test_clustering.py).
GRAM_FLOAT32_ABOVE = 2048


def _checked_stack(clients: Sequence[Mapping[str, Any]], key: str, shape=None, what: str = "B matrix") -> np.ndarray:
    """Every client's matrix `key` in float64, stacked [N, *shape]; a client whose matrix has another shape
    (than `shape`, else client 0's) or non-finite values is refused by index and key."""
    mats = [_as_float64(client[key]) for client in clients]
    shape = (mats[0].shape if mats else ()) if shape is None else shape
    for i, m in enumerate(mats):
        if m.shape != shape:
            raise FedPeftError(f"Client {i} has {what} '{key}' of shape {m.shape}, but client 0's has shape {shape}.")
        if not np.all(np.isfinite(m)):
            raise FedPeftError(f"Client {i} has non-finite values in {what} '{key}'.")
    return np.stack(mats) if mats else np.zeros((0, *shape))


def _check_late_keys(keys: Sequence[str], b: Mapping[str, Any], what: str = "B matrix") -> None:
    if set(b) != set(keys):
        key = sorted(set(b) ^ set(keys))[0]
        where = "lacks" if key in keys else "has an unexpected"
        raise FedPeftError(f"The late client {where} {what} '{key}' compared with the clustered clients' modules.")


def _joiner_rows(d_members: np.ndarray, d_joiners: np.ndarray) -> list[np.ndarray]:
    """Joiner t's distances to the n held clients (column t of d_members [n, k]) and then to joiners
    0..t−1 (column t of d_joiners [k, k]), the late-join rule's order."""
    return [np.concatenate([d_members[:, t], d_joiners[:t, t]]) for t in range(d_joiners.shape[0])]


def _unit_rows(b_by_client: Sequence[Mapping[str, Any]], key: str, first_shape=None) -> np.ndarray:
    """vec B^l of every client for module `key`, each scaled to unit norm (zero-norm rows stay 0)."""
    x = _checked_stack(b_by_client, key, first_shape)
    x = x.reshape(len(x), -1)  # [N, numel]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # zero-norm rows stay 0: cosine 0


def _check_keys(b_by_client: Sequence[Mapping[str, Any]]) -> list[str]:
    if len(b_by_client) == 0:
        raise FedPeftError("Eq. 2 needs the B matrices of at least one client, but none were given.")
    keys = sorted(b_by_client[0])  # fixed summation order, whatever the dicts' insertion order
    if not keys:
        raise FedPeftError("Client 0 uploaded no B matrices, so the Eq. 2 distance is undefined.")
    for i, client in enumerate(b_by_client[1:], start=1):
        if set(client) != set(keys):
            key = sorted(set(client) ^ set(keys))[0]
            where = "lacks" if key in b_by_client[0] else "has an unexpected"
            raise FedPeftError(f"Client {i} {where} B matrix '{key}' compared with client 0's modules.")
    return keys


class UnitRows:
    """vec B^l / ||vec B^l|| of the clustered clients, one float64 matrix per module, stacked once, so that
    the Eq. 2 rows of a round's late joiners come from one product per module (`late_rows`).

    `_late_join` compares every late client of a round with every clustered client, the joiners before it
    included: re-stacking all members for each joiner (the first row of Eq. 2's matrix each time) made that
    O(joiners × members) matrix conversions, 340 s of server work per round at 10,000 clients with 10 %
    sampled (benchmarks/scale.py); one matrix-vector product per joiner still read every member's rows,
    18 s a round."""

    def __init__(self, b_by_client: Sequence[Mapping[str, Any]]):
        self.keys = _check_keys(b_by_client)
        self.n = len(b_by_client)
        self.shapes = {k: _as_float64(b_by_client[0][k]).shape for k in self.keys}
        self.rows = {k: _unit_rows(b_by_client, k, self.shapes[k]) for k in self.keys}

    def _unit(self, b: Mapping[str, Any]) -> dict[str, np.ndarray]:
        _check_late_keys(self.keys, b)
        return {k: _unit_rows([b], k, self.shapes[k])[0] for k in self.keys}

    def late_rows(self, joiners: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """For joiner t of `joiners` (in order), d(joiner t, i) for the n clients held and then for joiners
        0..t−1: each joiner counts as a member for the joiners after it, as the late-join rule says, from
        one product per module for all of them (the members are read once, not once per joiner)."""
        units = [self._unit(b) for b in joiners]
        k = len(units)
        cos_members = np.zeros((self.n, k))
        cos_joiners = np.zeros((k, k))
        for key in self.keys:
            u = np.stack([x[key] for x in units]) if k else np.zeros((0, self.rows[key].shape[1]))
            cos_members += self.rows[key] @ u.T
            cos_joiners += u @ u.T
        return _joiner_rows(np.clip(1.0 - cos_members / len(self.keys), 0.0, 2.0),
                            np.clip(1.0 - cos_joiners / len(self.keys), 0.0, 2.0))


def b_distance_matrix(b_by_client: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """D[i, j] = mean over modules l of (1 - cos(vec B_i^l, vec B_j^l)), in float64 (Eq. 2); for more
    than GRAM_FLOAT32_ABOVE clients the products are float32, the sums float64.

    `b_by_client[i]` maps a module key (e.g. "layer.3.query") to client i's B matrix. Every client
    must have the same keys and shapes. A zero-norm B has cosine 0 with everything (distance 1).
    """
    keys = _check_keys(b_by_client)
    n = len(b_by_client)
    cos_sum = np.zeros((n, n))
    for key in keys:
        x = _unit_rows(b_by_client, key)
        if n > GRAM_FLOAT32_ABOVE:
            x = x.astype(np.float32)
        cos_sum += x @ x.T

    d = 1.0 - cos_sum / len(keys)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)  # rounding can leave a cosine a hair outside [-1, 1]


# ---------------------------------------------------------------------------------------------
# Eq. 2 on ΔW = B·A (--clustering-matrices delta_w)
# ---------------------------------------------------------------------------------------------

DELTA_W_BLOCK = 256  # clients per block of the pairwise products: (256·r) × (N·r) floats at a time


class DeltaWRows:
    """Eq. 2 with ΔW^l = B^l A^l in place of B^l (the mean over modules of 1 − cos(vec ΔW_i^l, vec ΔW_j^l)),
    from the factors: ⟨B_i A_i, B_j A_j⟩_F = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ), an r × r product per pair, so the
    d_out × d_in products are never formed (N · 12 · 384² floats for MiniLM otherwise).

    `loras[i]` maps "<module>.A" (r × d_in) and "<module>.B" (d_out × r) to client i's factors; every
    client must have both factors of the same modules, of the same shapes. A zero ΔW has cosine 0 with
    everything (distance 1), as a zero B has in Eq. 2 on B. Above GRAM_FLOAT32_ABOVE clients the stacked
    factors are float32 (sums float64), as for B."""

    def __init__(self, loras: Sequence[Mapping[str, Any]]):
        self.keys = _check_keys(loras)
        self.modules = sorted({k[:-2] for k in self.keys if k.endswith((".A", ".B"))})
        if not self.modules:
            raise FedPeftError("Eq. 2 on ΔW = B·A needs LoRA factors (keys '<module>.A' and '<module>.B'), but the "
                               "clients have none.")
        for m in self.modules:
            for f in (".A", ".B"):
                if m + f not in self.keys:
                    raise FedPeftError(f"Eq. 2 on ΔW = B·A needs both factors of module '{m}', but '{m}{f}' "
                                       "is missing.")
        self.shapes = {k: _as_float64(loras[0][k]).shape for k in self.keys if k[:-2] in self.modules}
        self.dtype = np.float32 if len(loras) > GRAM_FLOAT32_ABOVE else np.float64
        self.held = self._factors(loras)

    def _factors(self, loras: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per module: (B_iᵀ stacked [N·r, d_out], A_i stacked [N·r, d_in], ‖B_i A_i‖_F [N])."""
        out = {}
        for m in self.modules:
            b = _checked_stack(loras, m + ".B", self.shapes[m + ".B"], "matrix")  # [N, d_out, r]
            a = _checked_stack(loras, m + ".A", self.shapes[m + ".A"], "matrix")  # [N, r, d_in]
            if b.shape[2] != a.shape[1]:
                raise FedPeftError(f"Module '{m}': B has rank {b.shape[2]} but A has rank {a.shape[1]}.")
            gram = np.einsum("nor,nos->nrs", b, b) * np.einsum("nrd,nsd->nrs", a, a)
            norm = np.sqrt(np.maximum(gram.sum(axis=(1, 2)), 0.0))
            bt = b.transpose(0, 2, 1).reshape(len(b) * b.shape[2], -1).astype(self.dtype)
            out[m] = bt, a.reshape(len(a) * a.shape[1], -1).astype(self.dtype), norm
        return out

    def _cosines(self, left: dict, right: dict) -> np.ndarray:
        """Mean over modules of cos(ΔW of the `left` clients, ΔW of the `right` ones) (both from _factors)."""
        n_left, n_right = (len(next(iter(f.values()))[2]) for f in (left, right))
        out = np.zeros((n_left, n_right))
        for m in self.modules:
            r = self.shapes[m + ".A"][0]
            (bt_l, a_l, norm_l), (bt_r, a_r, norm_r) = left[m], right[m]
            for lo in range(0, n_left, DELTA_W_BLOCK):
                hi = min(n_left, lo + DELTA_W_BLOCK)
                gb = bt_l[lo * r:hi * r] @ bt_r.T  # [(hi-lo)·r, n_right·r]
                ga = a_l[lo * r:hi * r] @ a_r.T
                inner = (gb.astype(np.float64) * ga).reshape(hi - lo, r, n_right, r).sum(axis=(1, 3))
                scale = np.outer(norm_l[lo:hi], norm_r)
                out[lo:hi] += np.divide(inner, scale, out=np.zeros_like(inner), where=scale > 0)
        return out / len(self.modules)

    def distance_matrix(self) -> np.ndarray:
        d = 1.0 - self._cosines(self.held, self.held)
        d = (d + d.T) / 2
        np.fill_diagonal(d, 0.0)
        return np.clip(d, 0.0, 2.0)

    def late_rows(self, joiners: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """As UnitRows.late_rows, on ΔW: joiner t's distances to the held clients, then to joiners 0..t−1."""
        if not joiners:
            return []
        for b in joiners:
            _check_late_keys(self.keys, b, "matrix")
        new = self._factors(joiners)
        return _joiner_rows(np.clip(1.0 - self._cosines(self.held, new), 0.0, 2.0),
                            np.clip(1.0 - self._cosines(new, new), 0.0, 2.0))


def delta_w_distance_matrix(loras: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Eq. 2 on ΔW = B·A per module instead of B (see DeltaWRows): symmetric, zero diagonal, in [0, 2]."""
    return DeltaWRows(loras).distance_matrix()


# ---------------------------------------------------------------------------------------------
# Clustering and the choice of M
# ---------------------------------------------------------------------------------------------


@dataclass
class ClusteringResult:
    """The partition of the clients into M clusters (one expert per cluster)."""

    labels: list[int]  # canonical: clusters numbered by their smallest client id
    num_clusters: int
    silhouette: dict[int, float]  # S(k) for every candidate k evaluated
    method: str
    warnings: list[str] = field(default_factory=list)
    distance: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def clusters(self) -> list[list[int]]:
        """Members (client ids, ascending) of each cluster id."""
        members: list[list[int]] = [[] for _ in range(self.num_clusters)]
        for client, label in enumerate(self.labels):
            members[label].append(client)
        return members

    def to_json(self) -> dict:
        return {
            "labels": [int(x) for x in self.labels],
            "num_clusters": int(self.num_clusters),
            "clusters": self.clusters(),
            "silhouette": {str(k): float(s) for k, s in sorted(self.silhouette.items())},
            "method": self.method,
            "warnings": list(self.warnings),
            "distance": np.asarray(self.distance, dtype=np.float64).tolist(),
        }


def canonical_labels(labels: Sequence[int]) -> list[int]:
    """Renumber clusters in increasing order of their smallest member, so client 0 is in cluster 0."""
    new_id: dict[int, int] = {}
    return [new_id.setdefault(int(x), len(new_id)) for x in labels]


def _check_distance(distance: Any) -> np.ndarray:
    d = _as_float64(distance)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise FedPeftError(f"The client distance matrix must be square, but it has shape {d.shape}.")
    if d.shape[0] == 0:
        raise FedPeftError("The client distance matrix is empty; clustering needs at least one client.")
    if not np.all(np.isfinite(d)):
        raise FedPeftError("The client distance matrix contains NaN or infinite values.")
    if np.any(d < 0):
        raise FedPeftError(f"The client distance matrix must be non-negative, but its minimum is {d.min():g}.")
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def linkage_matrix(distance: Any) -> np.ndarray:
    """scipy average-linkage matrix Z of the clients (for the dendrogram and the hierarchical cuts)."""
    d = _check_distance(distance)
    if d.shape[0] < 2:
        raise FedPeftError("A dendrogram needs at least two clients.")
    return linkage(squareform(d, checks=False), method="average")


def _cut(z: np.ndarray, n: int, k: int) -> np.ndarray:
    """Apply the first n - k merges of Z: exactly k clusters, even when merge heights tie.

    (fcluster's "maxclust" cuts at a height and can return fewer than k clusters on ties.)
    """
    parent = list(range(2 * n - 1))

    def root(a: int) -> int:  # with path halving: near-constant time, so 10,000 clients cut in a blink
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for step in range(n - k):
        a, b = int(z[step, 0]), int(z[step, 1])
        parent[root(a)] = parent[root(b)] = n + step
    return np.array([root(i) for i in range(n)])


def _partition(d: np.ndarray, k: int, method: str, seed: int, z: np.ndarray | None) -> np.ndarray:
    if method == "hierarchical":
        return _cut(z, d.shape[0], k)
    from sklearn.cluster import SpectralClustering

    affinity = 1.0 - d / 2.0  # D in [0, 2] -> affinity in [0, 1]
    model = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed)
    return model.fit_predict(affinity)


def cluster_clients(
    distance: Any,
    max_clusters: int = 8,
    method: str = "hierarchical",
    pair_split_threshold: float = 0.5,
    seed: int = 42,
) -> ClusteringResult:
    """Partition the clients and choose M = argmax_k S(k) over k in {2, ..., min(M_max, N-1)} (the paper's
    §4.1; docs/methods/fedlease.md#choosing-m-by-silhouette).

    Hierarchical: average linkage on D, each k cut to exactly k clusters. Spectral (the clustering
    ablation): affinity 1 - D/2. Either way S(k) is the silhouette on D; ties within 1e-9 go to the
    smallest k. Cluster ids are ordered by their smallest member, so client 0 is in cluster 0.
    """
    if method not in METHODS:
        raise FedPeftError(f"Unknown clustering method '{method}'; choose one of {', '.join(METHODS)}.")
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, (int, np.integer)) or max_clusters < 1:
        raise FedPeftError(f"max_clusters (M_max) must be an integer >= 1, but it is {max_clusters!r}.")
    if not np.isfinite(pair_split_threshold):
        raise FedPeftError(f"pair_split_threshold must be a finite number, but it is {pair_split_threshold!r}.")
    d = _check_distance(distance)
    n = d.shape[0]
    notes: list[str] = []
    scores: dict[int, float] = {}

    def result(labels: Sequence[int]) -> ClusteringResult:
        labels = canonical_labels(labels)
        return ClusteringResult(labels, max(labels) + 1, scores, method, notes, d)

    def warn(message: str) -> None:
        notes.append(message)
        warnings.warn(message, UserWarning, stacklevel=3)

    # Small federations: no silhouette is needed, or none is defined. N = 1 or M_max = 1 gives M = 1;
    # N = 2 splits only above the threshold (0.5 by default); all-identical distances give M = 1.
    if n == 1 or max_clusters == 1:
        return result([0] * n)
    if n == 2:
        return result([0, 1] if d[0, 1] > pair_split_threshold else [0, 0])
    if max_clusters > n - 1:
        warn(f"max_clusters={max_clusters} exceeds N-1={n - 1} for N={n} clients; candidates are k <= {n - 1}.")
    if np.all(d[~np.eye(n, dtype=bool)] <= IDENTICAL_TOL):
        warn("All client distances are zero, so the silhouette is undefined; using one cluster (M=1).")
        return result([0] * n)

    from sklearn.metrics import silhouette_score

    z = linkage(squareform(d, checks=False), method="average") if method == "hierarchical" else None
    partitions: dict[int, np.ndarray] = {}
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = _partition(d, k, method, seed, z)
        found = len(np.unique(labels))
        if found != k:  # only possible for spectral, on degenerate affinities
            warn(f"Spectral clustering returned {found} clusters for k={k}; k={k} is skipped.")
            continue
        partitions[k] = labels
        scores[k] = float(silhouette_score(d, labels, metric="precomputed"))  # a singleton has s = 0
    if not scores:
        warn("No candidate number of clusters could be scored; using one cluster (M=1).")
        return result([0] * n)
    best = max(scores.values())
    m = min(k for k, s in scores.items() if s >= best - TIE_TOL)
    return result(partitions[m])


def task_clusters(tasks: Sequence[str], distance: Any) -> ClusteringResult:
    """The oracle partition (`--clustering task`, a diagnostic, not the paper's method): one cluster
    per task, clients grouped by the task they hold. It bounds what the B-matrix clustering can
    give; an independent re-run of the official code used it (docs/methods/fedlease.md#oracle-clustering)."""
    order = list(dict.fromkeys(tasks))
    labels = canonical_labels([order.index(t) for t in tasks])
    return ClusteringResult(labels, max(labels) + 1, {}, "task", [], _check_distance(distance))


def assign_late_client(distances_to_members: Any, labels: Sequence[int]) -> int:
    """Cluster of a late-joining client: argmin_j of its mean Eq. 2 distance to C_j (the average-linkage
    criterion that built the clusters); ties -> smallest j. M is unchanged.

    `distances_to_members[i]` is d(new, i) for every existing client i, and `labels[i]` its cluster.
    """
    dist = _as_float64(distances_to_members).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if dist.shape != labels.shape or dist.size == 0:
        raise FedPeftError(
            f"A late client needs one distance per existing client: got {dist.size} distances for {labels.size} labels."
        )
    if not np.all(np.isfinite(dist)):
        raise FedPeftError("The late client's distances contain NaN or infinite values.")
    if np.any(labels < 0):
        raise FedPeftError("Cluster labels must be non-negative integers.")
    means = {int(j): float(dist[labels == j].mean()) for j in np.unique(labels)}
    best = min(means.values())
    return min(j for j, m in means.items() if m <= best + IDENTICAL_TOL)
