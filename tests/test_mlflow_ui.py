"""MLflow's UI in a real headless browser against a real `mlflow server`: after a small `compare` (2 methods ×
(1 search + 2 seed trials)), the printed link lands on the runs table (not traces), each method's run shows
its mean and interval, the compare run's description holds the methods table and the verdict. Runs
`benchmarks/mlflow_screenshots.py` (which also makes docs/mlflow.md's screenshots); screenshots go to
``$ALPHADPO_MLFLOW_SCREENSHOTS`` (default: the test's temporary directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromedriver") and shutil.which("chromium")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_compare_reads_side_by_side_in_the_mlflow_ui(builtin_task, tmp_path):
    out = Path(os.environ.get("ALPHADPO_MLFLOW_SCREENSHOTS") or tmp_path / "screenshots")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mlflow_screenshots.py"), "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    found = report["found"]

    assert report["console_view_run_lines"] == 0  # no "🏃 View run" lines from MLflow
    assert any("open http://127.0.0.1:" in line and "workflowType=machine_learning" in line
               for line in report["console_tail"])  # the final hint: the page to open, not `mlflow ui` on a URL
    runs = found["runs_page"]
    assert "/runs" in runs["url"] and "workflowType=machine_learning" in runs["url"]  # the runs table, not traces
    assert "side-by-side-alpha-dpo" in runs["text"] and "side-by-side-simpo" in runs["text"]

    for method, text in found["method_pages"].items():
        metrics = report["method_metrics"][method]
        for key in ("accuracy_logratio_mean", "accuracy_logratio_low", "accuracy_logratio_high", "rank", "tied"):
            assert key in text, (method, key)
        mean = metrics["accuracy_logratio_mean"]
        assert f"{mean:.3f}"[:4] in text, (method, mean)  # the value itself is shown, not only the key

    compare = found["compare_page"]
    assert "Result." in compare and "Verdict" in compare
    assert "alpha-dpo" in compare and "simpo" in compare and "accuracy (log-ratio)" in compare  # the methods table
    for name in ("mlflow-runs.png", "mlflow-method-run.png", "mlflow-compare-run.png"):
        assert (out / name).stat().st_size > 10_000, name
