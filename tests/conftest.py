import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The suite runs on a 2-core machine: keep property tests small and deterministic.
settings.register_profile(
    "normlab",
    max_examples=int(os.environ.get("NORMLAB_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("normlab")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
