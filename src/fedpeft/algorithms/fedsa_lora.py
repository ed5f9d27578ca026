"""FedSA-LoRA (Guo et al., ICLR 2025): A and B trained locally, only A uploaded and averaged.

B stays on its client (kept in the client's store) and never leaves it; client i's model uses
s·B_i·Ā. The first instruction carries the whole common initialisation (A and B = 0), so every client
starts from the same tensors (docs/methods/fedlease.md#common-initialisation).
"""

from __future__ import annotations

from fedpeft.algorithms.fedit import FedIT
from fedpeft.errors import FedPeftError


class FedSALoRA(FedIT):
    name = "fedsa-lora"
    trained_factors = ("A", "B")
    sent_factors = ("A",)
    exports_one_adapter = False

    def export(self, state, backbone, out, base_path, stores=None):
        """One PEFT folder per client (client_<i>/): the averaged Ā with that client's own B, what the
        client is scored with. The server's LoRA alone (Ā with the initial B = 0) changes nothing, so it
        is not exported; without the clients' stores there is nothing to export."""
        from fedpeft.algorithms.lora_runtime import export_lora

        have = {cid: store["lora"] for cid, store in sorted((stores or {}).items()) if "lora" in store}
        if not have:
            raise FedPeftError("FedSA-LoRA's clients use the averaged A with their own B, which never leaves them, "
                               "and this run folder holds no client stores (a deployed Flower run keeps them on "
                               "its nodes): there is no adapter to export")
        adapters = {}
        for cid, own in have.items():
            export_lora(backbone, self.cfg, {**state["lora"], **own}, out / f"client_{cid}", base_path)
            adapters[f"client_{cid}"] = {"path": f"client_{cid}", "clients": [cid],
                                         "use": "alone, by this client: the averaged A with its own B"}
        return adapters
