"""The study presets (experiments/studies/): every study file validates, and on the length-biased
preset's real pairs R-DPO's length term is non-zero, so R-DPO and DPO no longer give the same losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alphadpo_ray.config.experiment import load_config
from alphadpo_ray.ml.data import preference_data_from_rows, tokenize_pairs
from alphadpo_ray.ml.losses import build_loss
from alphadpo_ray.ml.models import build_tokenizer
from alphadpo_ray.ml.task import PREAMBLE, SFTConfig, TaskConfig, corpus, generate

STUDIES = Path(__file__).resolve().parents[1] / "experiments" / "studies"
STUDY_NAMES = ["alpha-sensitivity", "alphadpo-vs-simpo", "methods-harder", "methods-length-biased",
               "methods-label-noise"]


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_study_files_validate(name):
    config = load_config(STUDIES / f"{name}.yaml")
    assert config.study is not None and config.sweep is not None
    assert config.study.kind == ("sweep" if name == "alpha-sensitivity" else "compare")
    assert config.ray.num_workers == 1 and config.sweep.max_concurrent_trials == 2


def _preset_task(name: str, train_size: int) -> TaskConfig:
    b = load_config(STUDIES / f"{name}.yaml").data.builtin
    return TaskConfig(train_size=train_size, held_out_size=b.held_out_size, difficulty=b.difficulty,
                      length_bias=b.length_bias, label_noise=b.label_noise, operations=tuple(b.operations),
                      seed=b.seed)


def _response_lengths(rows, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token counts of chosen and rejected responses, tokenised the way training tokenises them."""
    data, _ = preference_data_from_rows(rows, name="preset", chat_template=True, tokenizer=tokenizer)
    sft = SFTConfig()
    pairs = tokenize_pairs(data, tokenizer, max_length=sft.max_length, max_prompt_length=sft.max_prompt_length)
    return (torch.tensor([len(ids) for ids in pairs["chosen_ids"]], dtype=torch.float64),
            torch.tensor([len(ids) for ids in pairs["rejected_ids"]], dtype=torch.float64))


def test_r_dpo_differs_from_dpo_on_the_length_biased_preset():
    task = _preset_task("methods-length-biased", train_size=200)
    assert task.length_bias < 0, "the preset makes the CHOSEN response verbose"
    train, held_out = generate(task)
    tokenizer = build_tokenizer(corpus(task), vocab_size=SFTConfig().vocab_size)
    verbose_chosen = torch.tensor([row["chosen"].startswith(PREAMBLE) for row in train])
    verbose_rejected = torch.tensor([row["rejected"].startswith(PREAMBLE) for row in train])
    # About |length_bias| of the training pairs carry the preamble, mostly on the chosen side (label
    # noise, where the preset has it, moves some of it to the rejected side).
    assert 0.3 < (verbose_chosen | verbose_rejected).float().mean() < 0.7
    assert verbose_chosen.sum() > 2 * verbose_rejected.sum()

    dpo = build_loss("dpo", beta=0.1)
    r_dpo = build_loss("r-dpo", beta=0.1, length_alpha=0.05)
    no_preamble = torch.zeros(len(held_out), dtype=torch.bool)
    for rows, longer, shorter in ((train, verbose_chosen, verbose_rejected), (held_out, no_preamble, no_preamble)):
        lc, lj = _response_lengths(rows, tokenizer)
        assert torch.equal(lc > lj, longer) and torch.equal(lc < lj, shorter)  # only the preamble changes length
        # Log-probs of a model that gives every token the same probability, and a policy a little away from it.
        generator = torch.Generator().manual_seed(0)
        rc, rj = -1.5 * lc, -1.5 * lj
        pc = rc + 0.1 * torch.randn(len(rows), generator=generator, dtype=torch.float64)
        pj = rj + 0.1 * torch.randn(len(rows), generator=generator, dtype=torch.float64)
        out_dpo, out_r = dpo(pc, pj, rc, rj, lc, lj), r_dpo(pc, pj, rc, rj, lc, lj)
        assert torch.equal(out_dpo.chosen_rewards, out_r.chosen_rewards)  # same implicit reward β(π − r)
        differs = ~torch.isclose(out_dpo.losses, out_r.losses, rtol=0, atol=1e-12)
        assert torch.equal(differs, longer | shorter)
        # R-DPO adds length_alpha·(|yc| − |yj|) inside the sigmoid: lower loss where chosen is longer.
        assert bool((out_r.losses[longer] < out_dpo.losses[longer]).all())
        assert bool((out_r.losses[shorter] > out_dpo.losses[shorter]).all())
    assert out_r.loss.item() == pytest.approx(out_dpo.loss.item(), abs=1e-12)  # held-out: clean, equal lengths
    train_lc, train_lj = _response_lengths(train, tokenizer)
    assert (train_lc - train_lj).abs().mean() > 3  # R-DPO's length term is non-zero on the training pairs
