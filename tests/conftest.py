import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest
import torch

import hsresnet  # noqa: F401  (registers the models into timm)

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
