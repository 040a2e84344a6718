"""Two tiers. `python -m pytest` runs the default tier, a few minutes: every module, command line
and bad-input path, on the tiny and toy models. `python -m pytest --full` adds the tests marked
`full`: full-size parity and memory, the reduced toy replication, the README's commands as written,
and the command-line runs that train for many steps or are interrupted. CI runs --full."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the slow tier (tests marked full)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = pytest.mark.skip(reason="the full tier: run with --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(slow)
