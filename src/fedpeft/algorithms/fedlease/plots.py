"""FedLEASE's figures: the clustering (dendrogram, MDS, distance heat-map, silhouette per k) and the
expert usage per client and layer (the paper's Fig. 6). Each function writes one PNG and returns its path;
`FedLEASE.artifacts` hands them to the run layer, which draws them into the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedpeft.errors import FedPeftError
from fedpeft.figures import figure as _figure, save as _save, square as _square

def plot_dendrogram(distance: Any, client_labels: list[str], path: str | Path) -> Path:
    """Average-linkage dendrogram of the clients on the Eq. 2 distance."""
    from scipy.cluster.hierarchy import dendrogram

    from fedpeft.algorithms.fedlease.clustering import linkage_matrix

    d = _square(distance, client_labels)
    fig = _figure(max(6.0, 0.45 * len(client_labels)), 4.5)
    ax = fig.add_subplot()
    dendrogram(linkage_matrix(d), labels=list(client_labels), ax=ax, leaf_rotation=90, color_threshold=0)
    ax.set_title("Client dendrogram (average linkage, Eq. 2 distance on B)")
    ax.set_xlabel("client")
    ax.set_ylabel("mean cosine distance of B")
    return _save(fig, path)


def plot_mds(
    distance: Any, cluster_labels: list[int], client_labels: list[str], path: str | Path, seed: int = 0
) -> Path:
    """2-D metric MDS embedding of the clients, coloured by cluster and annotated with client labels."""
    from sklearn.manifold import MDS

    d = _square(distance, client_labels)
    if len(cluster_labels) != d.shape[0]:
        raise FedPeftError(f"Got {len(cluster_labels)} cluster labels for {d.shape[0]} clients.")
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    if d.shape[0] >= 2:
        import inspect

        if "metric_mds" in inspect.signature(MDS).parameters:  # scikit-learn >= 1.8 renamed the arguments
            kwargs = {"metric": "precomputed", "init": "classical_mds"}
        else:
            kwargs = {"dissimilarity": "precomputed", "n_init": 4}
        xy = MDS(n_components=2, random_state=seed, **kwargs).fit_transform(d)
    else:  # nothing to embed
        xy = np.zeros((d.shape[0], 2))

    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    colors = [f"C{int(c) % 10}" for c in cluster_labels]
    ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=60, edgecolors="black", linewidths=0.5)
    for (x, y), name in zip(xy, client_labels):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for c in sorted(set(int(c) for c in cluster_labels)):  # legend: one entry per cluster
        ax.scatter([], [], c=f"C{c % 10}", s=60, edgecolors="black", linewidths=0.5, label=f"cluster {c}")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Clients embedded by MDS of the Eq. 2 distance")
    ax.set_xlabel("MDS dimension 1")
    ax.set_ylabel("MDS dimension 2")
    return _save(fig, path)


def plot_distance_heatmap(distance: Any, client_labels: list[str], path: str | Path) -> Path:
    """Heat-map of the client distance matrix (block-diagonal when tasks separate)."""
    d = _square(distance, client_labels)
    n = d.shape[0]
    fig = _figure(max(5.5, 0.4 * n + 2.5), max(4.5, 0.4 * n + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(d, cmap="viridis", vmin=0.0, vmax=max(1.0, float(d.max())))
    fig.colorbar(image, ax=ax, label="Eq. 2 distance")
    ax.set_xticks(range(n), list(client_labels), rotation=90, fontsize=8)
    ax.set_yticks(range(n), list(client_labels), fontsize=8)
    ax.set_title("Client distance matrix (mean cosine distance of B)")
    return _save(fig, path)


def plot_silhouette(scores: Mapping[int, float], chosen_k: int, path: str | Path) -> Path:
    """Silhouette score S(k) per candidate number of clusters, with the chosen M marked."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    ks = sorted(int(k) for k in scores)
    ax.plot(ks, [scores[k] for k in ks], marker="o", label="S(k)")
    if chosen_k in scores:
        ax.scatter([chosen_k], [scores[chosen_k]], s=150, facecolors="none", edgecolors="red", zorder=3)
    if ks:
        ax.set_xticks(ks)
    ax.axvline(chosen_k, color="red", linestyle="--", linewidth=1, label=f"chosen M = {chosen_k}")
    ax.set_title("Silhouette score per number of clusters")
    ax.set_xlabel("number of clusters k")
    ax.set_ylabel("silhouette score S(k)")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_expert_usage(usage: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Heat-map of the mean number of distinct experts selected per token: rows clients, columns layers."""
    rows = list(usage)
    if not rows:
        raise FedPeftError("Expert usage is empty: there is no client to plot.")
    columns: list[str] = []
    for row in rows:  # union of layer names, in first-seen order
        columns += [c for c in usage[row] if c not in columns]
    values = np.array([[usage[r].get(c, np.nan) for c in columns] for r in rows], dtype=np.float64)

    fig = _figure(max(6.0, 0.35 * len(columns) + 3.0), max(3.0, 0.4 * len(rows) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="magma")
    fig.colorbar(image, ax=ax, label="mean distinct experts per token")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title("Expert usage per client and layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("client")
    return _save(fig, path)
