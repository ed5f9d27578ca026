"""Where the in-process engine keeps each client's store between rounds (`--client-store`).

A client's store is what it keeps across rounds: a local head, FedSA-LoRA's B, FedDPA's local LoRA,
FedLEASE's warmup LoRA and optimiser state, a router. `memory` keeps every store in the process and
saves them with each checkpoint. `disk` keeps them as files in RUN_DIR/client_stores/, loaded when
the client is sampled or scored and written back after: a thousand clients' optimiser states need
not fit in memory. Each file keeps the store of the last round that changed it and the one before,
so a run resumed from the checkpoint of round R reads, for every client, its store as of round R.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from fedpeft.atomic import atomic_write_with
from fedpeft.hardware import WIRE_DEVICE


class MemoryStores:
    """Stores live on the Client objects; the checkpoint saves them."""

    def __init__(self, clients):
        self.clients = clients

    def load(self, client) -> None:
        pass

    def save(self, client, rnd: int) -> None:
        pass

    def for_checkpoint(self) -> dict[int, dict[str, Any]]:
        return {c.cid: c.store for c in self.clients}

    def restore(self, saved: dict[int, dict[str, Any]], rnd: int) -> None:
        for c in self.clients:
            c.store = saved.get(c.cid, {})


class DiskStores:
    """One file per client: {"rounds": [r_new, r_old], "stores": [store_new, store_old]}."""

    def __init__(self, clients, folder: Path):
        self.clients = clients
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.upto: int | None = None  # resuming: ignore versions a previous process wrote after this round
        self._mine: set[int] = set()  # clients whose newest version this process wrote

    def _path(self, cid: int) -> Path:
        return self.folder / f"{cid}.pt"

    def _read(self, cid: int) -> dict[str, Any] | None:
        path = self._path(cid)
        if not path.is_file():
            return None
        return torch.load(io.BytesIO(path.read_bytes()), map_location=WIRE_DEVICE, weights_only=True)

    def load(self, client) -> None:
        data = self._read(client.cid)
        client.store = {}
        if data is not None:
            for rnd, store in zip(data["rounds"], data["stores"]):
                if self.upto is None or rnd <= self.upto or client.cid in self._mine:
                    client.store = store
                    break

    def save(self, client, rnd: int) -> None:
        data = self._read(client.cid)
        if data is None:
            data = {"rounds": [], "stores": []}
        mine = self.upto is None or client.cid in self._mine
        if data["rounds"] and data["rounds"][0] == rnd and mine:  # changed again in the same round
            data["stores"][0] = client.store
        else:
            keep = [(r, s) for r, s in zip(data["rounds"], data["stores"]) if mine or r <= self.upto]
            data = {"rounds": [rnd] + [r for r, _ in keep[:1]], "stores": [client.store] + [s for _, s in keep[:1]]}
        self._mine.add(client.cid)
        atomic_write_with(self._path(client.cid), lambda fh: torch.save(data, fh))
        client.store = {}  # out of memory until the client is needed again

    def for_checkpoint(self) -> dict[int, dict[str, Any]]:
        return {}  # the files are the stores

    def restore(self, saved: dict[int, dict[str, Any]], rnd: int) -> None:
        self.upto = rnd


def stores_as_of(folder: Path, rnd: int) -> dict[int, dict[str, Any]]:
    """Every client's store as of round `rnd` from a `disk` store folder (for export)."""
    out = {}
    for path in sorted(Path(folder).glob("*.pt")):
        if not path.stem.isdigit():
            continue
        data = torch.load(io.BytesIO(path.read_bytes()), map_location=WIRE_DEVICE, weights_only=True)
        for r, store in zip(data["rounds"], data["stores"]):
            if r <= rnd:
                out[int(path.stem)] = store
                break
    return out


def make_stores(kind: str, clients, run_dir: Path):
    return DiskStores(clients, Path(run_dir) / "client_stores") if kind == "disk" else MemoryStores(clients)
