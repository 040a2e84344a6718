"""Three tiers. `python -m pytest` runs the default tier, a few minutes: every module, command line
and bad-input path, on the tiny and toy models. `python -m pytest --full` adds the tests marked
`full`: full-size parity and memory, the reduced toy replication, the README's commands as written,
and the command-line runs that train for many steps or are interrupted. CI runs --full.
`python -m pytest --gpu` adds the tests marked `gpu`, which run on a CUDA GPU (precision, memory,
the command lines, resume); they are skipped where there is none.

Every other test runs on the CPU, whatever the machine has: SINE_DEVICE=cpu is set for the tests and
the command lines they start, so that a GPU (or a Mac's mps) never changes what they compare."""
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the slow tier (tests marked full)")
    parser.addoption("--gpu", action="store_true", help="also run the GPU tier (tests marked gpu) on CUDA")


def pytest_configure(config):
    os.environ["SINE_DEVICE"] = "cpu"


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not config.getoption("--full"):
        skips["full"] = pytest.mark.skip(reason="the full tier: run with --full")
    if not config.getoption("--gpu"):
        skips["gpu"] = pytest.mark.skip(reason="the GPU tier: run with --gpu on a machine with a CUDA GPU")
    elif not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="no CUDA GPU visible to PyTorch")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
