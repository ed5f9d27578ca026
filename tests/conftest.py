import os
import sys
from pathlib import Path

import pytest

# tests/ on the import path of this process and of every process it starts (Ray workers, SuperLink and
# SuperNodes of the Flower tests, CLI subprocesses): they load the tiny random models by their model
# factory names, e.g. --model_name tiny_models:tiny_bert (tiny_models.py, beside this file).
TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
if TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), TESTS_DIR) if p)

@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny matmuls gain nothing from threads and stall badly when
    the cores are busy (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backbone():
    from tiny_models import tiny_bert

    return tiny_bert(seed=0)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A RunConfig factory for fast runs on the tiny BERT and the bundled demo data."""
    from fedpeft.config import RunConfig

    def make(**overrides):
        # device and precision explicit: the numbers these tests check must not depend on the
        # machine (a GPU, or a CPU with native bf16, would change them under `auto`)
        base = dict(method="fedit", tasks=["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"],
                    train_samples=24, test_samples=16, global_rounds=2, local_epochs=1, batch_size=8,
                    eval_batch_size=32, max_length=32, rank=2, lr=5e-3, quiet=True, device="cpu",
                    precision="fp32", output_dir=str(tmp_path / "run"))
        base.update(overrides)
        return RunConfig(**base)

    return make


def data_dir_or_skip() -> str:
    path = os.environ.get("FEDPEFT_DATA_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("real GLUE data not found: set FEDPEFT_DATA_DIR to a data root laid out as "
                    "glue/SST-2/{train,dev}.tsv (one folder per GLUE task)")
    return path


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package): its main() runs in the test."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
