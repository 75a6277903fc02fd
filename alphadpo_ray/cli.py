"""`alphadpo-ray` command line: sweep (the main job), compare, study, report, train, reference, validate, init-model,
self-check."""

from __future__ import annotations

import argparse
import json
import sys

from .config.presets import COMPARE_QUICKSTART, QUICKSTART_SWEEP
from .errors import AlphaDPOError

# Each command imports the modules it runs inside its function (the only function-level project imports
# left in the package, with config/experiment.py's two): `alphadpo-ray --help`, a typo'd command or a bad
# argument answers in a fraction of a second instead of first importing torch, Ray, DeepSpeed, MLflow and
# datasets (several seconds on 2 cores); `main` imports the console (compat, asyncio: ~0.5 s) only when run.


def _config(args, preset: dict | None = None):
    """The CONFIG file, or the embedded preset when none is given; --set overrides apply to both. In a
    Ray job's working-dir copy, places that would be lost with it are refused before anything is written
    (a sweep takes its lock in storage before its preflight)."""
    from .config.experiment import config_from_dict, load_config
    from .training.preflight import check_job_outputs

    if args.config is None and preset is not None:
        config = config_from_dict(preset, "<embedded defaults>", args.set)
    else:
        config = load_config(args.config, args.set)
    check_job_outputs(config)
    return config


def cmd_reference(args) -> int:
    """Build (or reuse) the built-in task and its SFT reference; print the reference's held-out metrics."""
    from .training.prepare import prepare_builtin

    config = _config(args)
    built = prepare_builtin(config)
    print(f"built-in task and SFT reference: {built.root}")
    print(json.dumps(built.reference_metrics, indent=2))
    return 0


def cmd_validate(args) -> int:
    """Check every file given: one ``ok`` line per good one, one ``error:`` line per bad one (naming the
    file); exit 2 when any is bad."""
    from .config.experiment import load_config
    from .training.preflight import check_deepspeed, check_models

    bad = 0
    for path in args.configs:
        try:
            config = load_config(path, args.set)
            check_deepspeed(config)
            check_models(config)
        except AlphaDPOError as err:
            bad += 1
            message = str(err)
            print(f"error: {message if path in message else f'{path}: {message}'}", file=sys.stderr)
            continue
        print(f"ok  {path}  ({config.method.name}, {config.ray.num_workers} workers, ZeRO-{config.deepspeed.zero_stage})")
    if bad and len(args.configs) > 1:
        print(f"{bad} of {len(args.configs)} configs invalid")  # stderr: one line per bad file
    return 2 if bad else 0


def cmd_train(args) -> int:
    from .training.launch import train

    summary = train(_config(args), restart=args.restart, address=args.address)
    if summary.get("already_finished"):
        print(f"[resume] run {summary['run_name']} already finished at step {summary.get('steps')} of "
              f"{summary.get('total_steps')} (summary: {summary['summary_path']}); nothing to do — "
              f"{invoked_command([*args.argv, '--restart'])} to train again")
        return 0
    final = summary.get("final_eval") or {}
    print(f"\nfinished {summary['run_name']}: " + ", ".join(
        f"{k.removeprefix('eval/')} {final[k]:.4f}" for k in
        ("eval/accuracy", "eval/accuracy_logratio", "eval/kl", "eval/generation_accuracy") if k in final))
    print(f"summary: {summary['summary_path']}")
    print(f"policy:  {summary['policy']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow:  run {summary['mlflow_run_id']} — {_mlflow_hint(summary['tracking_uri'], run_id=summary['mlflow_run_id'])}")
    return 0


def cmd_init_model(args) -> int:
    from .training.init_model import InitModelSettings, init_model

    settings = InitModelSettings(family=args.family, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                 num_layers=args.layers, num_heads=args.heads, sft_steps=args.sft_steps,
                                 max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                 format=args.format, chat_template=args.chat_template, seed=args.seed)
    init_model(args.data, args.out, settings, force=args.force)
    return 0


def _mlflow_hint(uri, experiment_id=None, run_id=None) -> str:
    """`tracking.ui_hint` for a run whose experiment id the summary may not hold (read from the store)."""
    from .services.tracking import ui_hint

    if experiment_id is None and run_id:
        try:
            from mlflow.tracking import MlflowClient

            from .services.tracking import resolve_tracking_uri

            experiment_id = MlflowClient(resolve_tracking_uri(uri)).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - only a link: the experiments page then
            experiment_id = None
    return ui_hint(uri, experiment_id)


def _where(result_dir, parent_run_id, uri, experiment_id=None) -> None:
    print(f"\nresults: {result_dir}  (trials.csv, pareto.png, results.json)")
    if parent_run_id:
        print(f"mlflow:  parent run {parent_run_id} — {_mlflow_hint(uri, experiment_id, parent_run_id)}")


def cmd_sweep(args) -> int:
    from .sweep.run import run_sweep

    result = run_sweep(_config(args, QUICKSTART_SWEEP), resume=args.resume, address=args.address)
    results = json.loads((result.directory / "results.json").read_text())
    _where(result.directory, result.parent_run_id, results["tracking_uri"], results.get("mlflow_experiment_id"))
    return 0


def cmd_compare(args) -> int:
    from .sweep.run import run_compare

    summary = run_compare(_config(args, COMPARE_QUICKSTART), resume=args.resume, address=args.address)
    _where(summary["files"]["methods"].rsplit("/", 1)[0], summary["mlflow_compare_run_id"], summary["tracking_uri"],
           summary.get("mlflow_experiment_id"))
    return 0


def cmd_study(args) -> int:
    from .config.experiment import load_config
    from .training.preflight import check_job_outputs
    from .sweep.run import run_study
    from .sweep.study import study_path

    path = study_path(args.name)
    config = load_config(str(path), args.set)
    check_job_outputs(config)
    command = " ".join(["alphadpo-ray study", args.name, *(f"--set {s}" for s in args.set)])
    out = run_study(config, command=command, resume=args.resume, address=args.address)
    print(f"\nstudy: {out['files']['markdown']}")
    if out["mlflow_run_id"]:
        print(f"mlflow:  run {out['mlflow_run_id']} (study.md, study.json and the plots are its artifacts) — "
              f"{_mlflow_hint(out['tracking_uri'], run_id=out['mlflow_run_id'])}")
    return 0


def cmd_report(args) -> int:
    from .sweep.report import report

    out = report(args.target, tracking_uri=args.tracking_uri, output_dir=args.output_dir)
    print(f"\nrebuilt from MLflow: {out['directory']}")
    return 0


def cmd_self_check(args) -> int:
    """Is this install's result normal? The SFT reference and a short train against the seeds' ranges
    (`alphadpo_ray.training.self_check`); exit 1 when a figure is far outside them."""
    from .training.self_check import format_report, load_expected, measure, report

    expected = None if args.measure_only else load_expected(args.expected)
    settings = dict(expected["settings"]) if expected else {}
    if args.steps is not None:
        settings["max_steps"] = args.steps
    measured = measure(args.seed, settings, workdir=args.workdir, log=lambda *a, **k: None)
    result = measured if args.measure_only else report(measured, expected)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    print(json.dumps(measured, indent=2) if args.measure_only else format_report(result))
    return 1 if (not args.measure_only and result["overall"] == "outside") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alphadpo-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_cluster(p):
        """The cluster options, the same on every command that runs on a cluster (train, sweep, compare, study)."""
        p.add_argument("--address", default=None,
                       help="existing Ray cluster: HOST:PORT of the head's GCS, ray://HOST:PORT, auto or local "
                            "(default: ray.address, else RAY_ADDRESS, else a local Ray; a one-worker train without "
                            "one trains in this process)")
        return p

    def with_config(p, required=False):
        if required:
            p.add_argument("config", help="experiment YAML")
        else:
            p.add_argument("config", nargs="?", default=None, help="experiment YAML (default: embedded quickstart)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.learning_rate=1e-4 (repeatable)")
        return p

    with_config(sub.add_parser("reference", help="build the built-in task's SFT reference and print its metrics"))
    p = sub.add_parser("validate", help="validate experiment configs without running anything")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = with_cluster(with_config(sub.add_parser("train", help="one training run (Ray Train × DeepSpeed)")))
    p.add_argument("--restart", action="store_true",
                   help="start over: set the run's old storage aside and start a new MLflow run (a re-run with "
                        "changed settings refuses without it)")
    for name, text in (("sweep", "Ray Tune + Optuna sweep of one method (default: the built-in quickstart sweep)"),
                       ("compare", "the same sweep budget for several methods, side by side")):
        p = with_cluster(with_config(sub.add_parser(name, help=text)))
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from its storage")
    p = sub.add_parser("study", help="a ready study (experiments/studies/NAME.yaml, or a YAML file): its sweep or "
                       "compare, then its tables, plots and verdict")
    p.add_argument("name", help="alpha-sensitivity, alphadpo-vs-simpo, methods-harder, methods-length-biased, "
                   "methods-label-noise, or a study YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study from its storage")
    with_cluster(p)
    p = sub.add_parser("init-model", help="a tokenizer and a small model for your own data, SFT on its chosen responses",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="your preference data (.jsonl/.json/.jsonl.gz/.parquet)")
    p.add_argument("out", help="directory to write the model and tokenizer to (then model.name_or_path: OUT)")
    p.add_argument("--family", default="llama", help="llama, mistral, llama3, gemma2 or qwen2 (architecture and chat template)")
    p.add_argument("--vocab-size", type=int, default=512, help="byte-level BPE vocabulary trained on your data")
    p.add_argument("--hidden-size", type=int, default=96, help="model width")
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads (must divide --hidden-size)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps on the chosen responses")
    p.add_argument("--max-length", type=int, default=256, help="tokens per prompt + response (as data.max_length)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="prompt tokens kept (as data.max_prompt_length)")
    p.add_argument("--format", default="auto", help="auto, strings, messages or hh (as data.format)")
    p.add_argument("--chat-template", action="store_true", help="render string prompts with the chat template")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's initialisation and SFT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p = sub.add_parser("self-check", help="is my result normal? the SFT reference and a short train against the "
                       "ranges measured over 5 seeds (a few minutes)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--expected", default=None, help="expectations JSON (default: alphadpo_ray/training/expected_figures.json, "
                   "written by make figures)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the expectations'; another "
                   "value is marked not comparable)")
    p.add_argument("--seed", type=int, default=0, help="pipeline seed k: SFT seed k, training seed 42 + k")
    p.add_argument("--workdir", default=None, help="where the short run writes (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--measure-only", action="store_true", help="measure and print the figures, compare nothing "
                   "(what make figures runs per seed)")
    p = sub.add_parser("report", help="rebuild a sweep's or compare's table and plots from MLflow alone")
    p.add_argument("target", help="sweep/compare name, MLflow run id, or experiment name")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else ./mlflow.db")
    p.add_argument("--output-dir", default=None, help="default: outputs/reports/TARGET")
    return parser


COMMANDS = {"init-model": cmd_init_model, "reference": cmd_reference, "validate": cmd_validate, "train": cmd_train, "sweep": cmd_sweep,
            "compare": cmd_compare, "study": cmd_study, "report": cmd_report,
            "self-check": cmd_self_check}


RESUMABLE = ("train", "sweep", "compare", "study")  # commands that continue a stopped run when re-run


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it ends like Ctrl-C: its MLflow run marked KILLED."""


def _terminate(signum, frame):
    raise Terminated()


def resume_command(command: str, argv: list[str]) -> str:
    """The command line that continues this one, runnable as printed: the same arguments, run the same way
    (`invoked_command`), without ``--restart`` (a train run continues by being re-run) and with
    ``--resume`` for a sweep, compare or study."""
    args = [a for a in argv if a != "--restart"]
    if command != "train" and "--resume" not in args:
        args.append("--resume")
    return invoked_command(args)


def invoked_command(args: list[str]) -> str:
    """``alphadpo-ray ARGS`` as this process was run, runnable as printed: ``alphadpo-ray`` when that name on
    PATH is this program, else the program as given (``.venv/bin/alphadpo-ray``), or
    ``python -m alphadpo_ray`` for a module run."""
    import os
    import shlex
    import shutil

    program = sys.argv[0]
    if os.path.basename(program) == "__main__.py":
        head = [sys.executable, "-m", "alphadpo_ray"]
    else:
        name = os.path.basename(program) or "alphadpo-ray"
        head = [name if shutil.which(name) and os.path.realpath(shutil.which(name)) == os.path.realpath(program)
                else program]
    return shlex.join(head + args)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    from .console import quiet_driver

    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(given)
    args.argv = given  # for hints that repeat the command
    quiet_driver()
    resumable = args.command in RESUMABLE
    if resumable and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except AlphaDPOError as err:
        print(f"error: {err}", file=sys.stderr)
        from .training.launch import TrainingFailed

        if resumable and isinstance(err, TrainingFailed):
            print(f"to continue from its last checkpoint: {resume_command(args.command, given)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, SIGTERM (ours, or Ray's handler's sys.exit)
        terminated = isinstance(err, Terminated) or (isinstance(err, SystemExit) and err.code == signal.SIGTERM)
        word = "terminated" if terminated else "interrupted"
        print(f"{word}; to resume: {resume_command(args.command, given)}" if resumable else word, file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
