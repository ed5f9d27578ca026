"""Integration: FedIT on the packaged MiniLM and real GLUE data (skipped without the data)."""

import pytest

from conftest import data_dir_or_skip

pytestmark = pytest.mark.integration


def test_fedit_on_real_sst2_mrpc_beats_majority(tmp_path):
    from fedpeft.config import RunConfig
    from fedpeft.runner import run

    data_dir = data_dir_or_skip()
    cfg = RunConfig(method="fedit", tasks=["sst2", "sst2", "mrpc", "mrpc"], model_name="minilm",
                    data_dir=data_dir, train_samples=160, test_samples=100, global_rounds=2, local_epochs=2,
                    lr=3e-3, batch_size=16, max_length=96, quiet=True, output_dir=str(tmp_path / "run"))
    result = run(cfg)
    last = result.headline
    # Test sets are class-balanced, so the majority-class rate is 0.5 on every client.
    records = [r for r in result.history.records if r["round"] == last["round"]]
    assert len(records) == 4
    mean_acc = sum(r["accuracy"] for r in records) / 4
    assert mean_acc > 0.5 + 0.05, f"mean accuracy {mean_acc:.3f} does not beat the majority rate 0.5"
    assert last["per_task"]["sst2"] > 0.6
