"""Run a tiny `compare` (2 methods × 1 search + 2 seed trials) against a real `mlflow server` on 127.0.0.1,
open MLflow's UI in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium) and save
what a reader sees: the runs table, a method's run, the compare run with its description.

    .venv/bin/python benchmarks/mlflow_screenshots.py [--out docs/img] [--work DIR]

Writes ``mlflow-runs.png``, ``mlflow-method-run.png``, ``mlflow-compare-run.png`` under ``--out`` (default:
``$ALPHADPO_MLFLOW_SCREENSHOTS``, else a temporary directory) and prints one JSON object: what was found on
each page (``tests/test_mlflow_ui.py`` asserts on it) and the console's "View run" line count.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
METHODS = ("alpha-dpo", "simpo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _config(work: Path, uri: str) -> dict:
    return {
        "name": "ui", "output_dir": str(work / "outputs"),
        "data": {"source": "builtin", "max_eval_samples": 48},
        "method": {"name": "alpha-dpo", "beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.2},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4,
                     "eval_steps": 2, "logging_steps": 2, "save_steps": 4, "generation_eval_samples": 0,
                     "per_device_eval_batch_size": 24},
        "deepspeed": {"zero_stage": 0},
        "ray": {"num_workers": 1, "storage_path": str(work / "ray")},
        "tracking": {"tracking_uri": uri, "experiment_name": "side-by-side"},
        "sweep": {"name": "side-by-side", "methods": list(METHODS), "num_samples": 1, "seeds": 2,
                  "max_concurrent_trials": 2},
        "study": {"kind": "compare", "title": "alpha-dpo against simpo",
                  "question": "Does alpha-dpo reach lower KL than simpo at matched accuracy?",
                  "verdict": list(METHODS)},
    }


def _compare(work: Path, uri: str, console: Path) -> None:
    """`alphadpo-ray compare` in a process of its own (its own local Ray), as a user runs it."""
    import yaml

    config = work / "compare.yaml"
    config.write_text(yaml.safe_dump(_config(work, uri)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with open(console, "wb") as handle:
        code = subprocess.call([sys.executable, "-m", "alphadpo_ray", "compare", str(config), "--address", "local"],
                               cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=1500)
    if code != 0:
        raise RuntimeError(f"compare failed ({code}):\n{console.read_text(errors='replace')[-4000:]}")


def _browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,950",
                "--disable-gpu"):
        options.add_argument(arg)
    service = webdriver.ChromeService(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except Exception:  # noqa: BLE001 - the page is being replaced
        return ""


def _close_assistant(driver) -> None:
    """MLflow 3.17 opens its "MLflow Assistant" side panel on first visit; closed for the screenshots."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        try:
            button.click()
        except Exception:  # noqa: BLE001 - not clickable: left as it is
            pass


def _expand(driver) -> None:
    """Open the compare run's row: the methods' runs are its children, shown collapsed (the "+" beside its name).
    The "+" is drawn after the row's name (seen: the name shown, no button yet), so it is waited for; clicked once
    (a second click folds the row again)."""
    from selenium.webdriver.common.by import By

    buttons = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"),
                    60, "the compare run's expand button")
    buttons[0].click()


def _show_more(driver) -> None:
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']")[:1]:
        element.click()


def browse(uri: str, experiment_id: str, method_runs: dict[str, str], compare_run: str, out: Path) -> dict:
    """Open the pages, wait for what a reader should see, save screenshots; what was found, per page."""
    from alphadpo_ray.services.tracking import experiment_url

    found: dict = {}
    driver = _browser()
    try:
        return _browse(driver, uri, experiment_id, method_runs, compare_run, out, found)
    except Exception:
        driver.save_screenshot(str(out / "failed.png"))
        (out / "failed.html").write_text(driver.page_source)
        raise
    finally:
        driver.quit()


def _browse(driver, uri, experiment_id, method_runs, compare_run, out: Path, found: dict) -> dict:
    from alphadpo_ray.services.tracking import experiment_url

    if True:
        driver.get(experiment_url(uri, experiment_id))
        _wait(lambda: "side-by-side" in _text(driver), 120, "the runs table")
        _close_assistant(driver)
        _expand(driver)  # the methods' runs are children of the compare run
        _wait(lambda: all(f"side-by-side-{m}" in _text(driver) for m in METHODS), 60, "the methods' runs")
        time.sleep(1)  # let the table settle
        found["runs_page"] = {"url": driver.current_url, "traces": "Traces" in _text(driver).split("Runs")[0][-200:],
                              "text": _text(driver)}
        driver.save_screenshot(str(out / "mlflow-runs.png"))
        found["method_pages"] = {}
        for i, (method, run_id) in enumerate(method_runs.items()):
            driver.get(experiment_url(uri, experiment_id, run_id))
            _wait(lambda: "accuracy_logratio_high" in _text(driver), 90, f"{method}'s metrics")
            _close_assistant(driver)
            found["method_pages"][method] = _text(driver)
            if i == 0:
                driver.save_screenshot(str(out / "mlflow-method-run.png"))
        driver.get(experiment_url(uri, experiment_id, compare_run))
        _wait(lambda: "Description" in _text(driver) and "Metrics" in _text(driver), 90, "the compare run's page")
        _show_more(driver)  # the description is shown folded
        _wait(lambda: "Result." in _text(driver), 30, "the compare run's description")
        _close_assistant(driver)
        time.sleep(1)
        found["compare_page"] = _text(driver)
        driver.save_screenshot(str(out / "mlflow-compare-run.png"))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("ALPHADPO_MLFLOW_SCREENSHOTS"))
    parser.add_argument("--work", default=None, help="where the server, its store and the compare's outputs go")
    parser.add_argument("--reuse", action="store_true", help="a --work that holds a finished compare: only browse")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="mlflow-screens-"))
    work = Path(args.work or tempfile.mkdtemp(prefix="mlflow-ui-"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    with open(work / "server.log", "ab") as log:
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
                                   "--artifacts-destination", str(work / "artifacts")],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        def healthy():
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(work / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    return True
            except OSError:
                return False

        _wait(healthy, 180, "mlflow server")
        results = work / "outputs" / "side-by-side" / "results.json"
        console = work / "console.log"
        if not (args.reuse and results.exists()):
            _compare(work, uri, console)
        text = console.read_text(errors="replace")
        summary = json.loads(results.read_text())
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment_id = summary["mlflow_experiment_id"]
        sweeps = client.search_runs([experiment_id], "tags.`alphadpo.kind` = 'sweep' and tags.`alphadpo.phase` = 'search'")
        method_runs = {r.data.tags["method"]: r.info.run_id for r in sweeps}
        found = browse(uri, experiment_id, method_runs, summary["mlflow_compare_run_id"], out)
        metrics = {m: client.get_run(r).data.metrics for m, r in method_runs.items()}
        print(json.dumps({"out": str(out), "console_view_run_lines": text.count("View run"),
                          "console_tail": text.splitlines()[-3:], "experiment_id": experiment_id,
                          "method_metrics": metrics, "found": found}))
    finally:
        _stop(server)
    return 0


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started, by PID."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    sys.exit(main())
