"""tools/gpu_check.py rehearsed on the CPU at tiny sizes: the one run on a lent GPU must not fail on a typo."""
import json
import os
import subprocess
import sys

import pytest

from tools.gpu_check import FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runs(node):
    """Every measured process run in the JSON: dicts with an exit code and seconds."""
    if isinstance(node, dict):
        if "rc" in node and "seconds" in node:
            yield node
        for value in node.values():
            yield from runs(value)


def rehearse(tmp_path, *parts):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--rehearse", "--out", str(out),
                             "--work", str(tmp_path), "--parts", *parts], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(FIELDS) <= set(report) and not any("error" in report[field] for field in FIELDS), report
    return report


def test_the_gpu_check_rehearses_on_the_cpu(tmp_path):
    """Every part but the memory caps and the benchmark, which take a minute even at tiny size: the
    full tier runs those."""
    report = rehearse(tmp_path, *[part for part in FIELDS if part not in ("caps", "bench")])
    assert report["gpu_tier"]["rc"] == 0, report["gpu_tier"]
    for kind in ("full", "lora8"):
        train = report["train"][kind]
        assert train["killed"]["rc"] == -9 and train["resumed"]["rc"] == 0 and train["step_seconds"] > 0, train
    measured = list(runs(report["edit"]))
    assert len(measured) == 2 and all(r["rc"] == 0 and r["peak_rss_gb"] > 0 for r in measured), measured


@pytest.mark.full
def test_the_gpu_checks_caps_and_benchmark_rehearse_on_the_cpu(tmp_path):
    report = rehearse(tmp_path, "device", "caps", "bench")
    measured = list(runs(report["caps"]))
    assert len(measured) == 4 and all(r["rc"] == 0 and r["peak_rss_gb"] > 0 for r in measured), measured
    bench = report["bench"]
    assert bench["rc"] == 0 and bench["results"], bench
