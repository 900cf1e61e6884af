import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest
import torch

import hsresnet  # noqa: F401  (registers the models into timm)

# The suite is many small models on tiny inputs: one intra-op thread per process is several times faster than two
# (threads fight over cores), and `pytest -n 2` uses both cores with one process each.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
