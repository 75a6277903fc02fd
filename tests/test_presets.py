"""The embedded defaults of `sweep` and `compare` are exactly what the files under experiments/sweeps say."""

from pathlib import Path

import pytest

from alphadpo_ray.config.experiment import config_from_dict, load_config
from alphadpo_ray.config.presets import COMPARE_QUICKSTART, QUICKSTART_SWEEP

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"


@pytest.mark.parametrize("preset,name", [(QUICKSTART_SWEEP, "quickstart.yaml"),
                                         (COMPARE_QUICKSTART, "compare-quickstart.yaml")])
def test_preset_matches_its_file(preset, name):
    assert config_from_dict(preset).to_dict() == load_config(SWEEPS / name).to_dict()


def test_cli_sweep_without_config_uses_the_quickstart_preset():
    from alphadpo_ray import cli

    args = cli.build_parser().parse_args(["sweep", "--set", "sweep.num_samples=3"])
    config = cli._config(args, QUICKSTART_SWEEP)
    assert config.sweep.num_samples == 3 and config.name == "quickstart" and config.ray.num_workers == 1
