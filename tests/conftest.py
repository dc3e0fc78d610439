import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=True,
)
settings.register_profile("dev", deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import complexformer  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and complexformer.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a build with CUDA kernels")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (as does any -m expression that names slow)")


def _run_slow(config):
    return config.getoption("--runslow") or "slow" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (full emulation sweeps, long hypothesis runs, big shapes) are skipped by
    the quick run `pytest tests -q`; `pytest tests -q -m slow` runs exactly them (CI runs both)."""
    run_slow = _run_slow(config)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and a build with CUDA kernels"))
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with `pytest tests -m slow` (or --runslow)"))


DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
