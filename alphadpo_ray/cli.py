"""`alphadpo-ray` command line: reference, validate, train (sweep, compare and report come with the sweep)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import AlphaDPOError


def _config(args):
    from .config import load_config

    return load_config(args.config, args.set)


def cmd_reference(args) -> int:
    """Build (or reuse) the built-in task and its SFT reference; print the reference's held-out metrics."""
    from .prepare import _builtin

    config = _config(args)
    built = _builtin(config)
    print(f"built-in task and SFT reference: {built.root}")
    print(json.dumps(built.reference_metrics, indent=2))
    return 0


def cmd_validate(args) -> int:
    from .config import load_config

    for path in args.configs:
        config = load_config(path, args.set)
        print(f"ok  {path}  ({config.method.name}, {config.ray.num_workers} workers, ZeRO-{config.deepspeed.zero_stage})")
    return 0


def cmd_train(args) -> int:
    from .launch import train

    summary = train(_config(args))
    final = summary.get("final_eval") or {}
    print(f"\nfinished {summary['run_name']}: " + ", ".join(
        f"{k.removeprefix('eval/')} {final[k]:.4f}" for k in
        ("eval/accuracy", "eval/accuracy_logratio", "eval/kl", "eval/generation_accuracy") if k in final))
    print(f"summary: {summary['policy'] and summary['policy'].rsplit('/', 1)[0]}/summary.json")
    print(f"policy:  {summary['policy']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow:  run {summary['mlflow_run_id']} — view with `mlflow ui --backend-store-uri {summary['tracking_uri']}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alphadpo-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    with_config(sub.add_parser("train", help="one training run (Ray Train × DeepSpeed)"))
    return parser


COMMANDS = {"reference": cmd_reference, "validate": cmd_validate, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AlphaDPOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
