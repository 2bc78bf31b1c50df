"""Teacher diagnostics: measured without disturbing the run, drawn as the paper's Figure 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metateach.report.diagnostics import WeightSnapshot
from metateach.trainer import Trainer


def test_weight_shares_on_clean_and_mislabeled_samples() -> None:
    snapshot = WeightSnapshot(
        weights=np.array([2.0, 2.0, 0.0, 0.0]),
        losses=np.zeros(4),
        targets=np.zeros(4, dtype=int),
        noisy=np.array([False, False, True, False]),
        features=np.zeros((4, 2)),
    )
    summary = snapshot.summary()
    assert summary["teacher/noisy_weight_share"] == 0.0
    assert summary["teacher/noisy_sample_share"] == 0.25
    assert summary["teacher/mean_weight_clean"] == pytest.approx(4 / 3)
    assert summary["teacher/mean_weight_noisy"] == 0.0
    assert summary["teacher/effective_sample_share"] == pytest.approx(0.5)  # two of four
    # The mislabeled sample weighs less than two clean ones and ties the third.
    assert summary["teacher/clean_over_noisy_auc"] == pytest.approx(2.5 / 3)


@pytest.mark.parametrize(
    ("weights", "share", "auc"),
    [
        ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 1.0, 0.5),  # even weight tells nothing apart
        ([0.0, 0.0, 0.0, 6.0, 0.0, 0.0], 1 / 6, 1 / 3),  # collapsed onto one mislabeled sample
        ([0.5, 1.0, 1.5, 0.2, 0.4, 2.4], None, 6 / 9),  # clean over noisy in 6 of 9 pairs
        ([3.0, 2.0, 1.0, 0.0, 0.0, 0.0], None, 1.0),
        ([0.0, 0.0, 0.0, 1.0, 2.0, 3.0], None, 0.0),
    ],
)
def test_the_spread_of_the_weight_and_how_it_parts_clean_from_mislabeled(
    weights: list[float], share: float | None, auc: float
) -> None:
    w = np.array(weights)
    summary = WeightSnapshot(
        weights=w,
        losses=np.zeros(6),
        targets=np.zeros(6, dtype=int),
        noisy=np.array([False, False, False, True, True, True]),
        features=np.zeros((6, 2)),
    ).summary()
    expected = share if share is not None else w.sum() ** 2 / (6 * np.square(w).sum())
    assert summary["teacher/effective_sample_share"] == pytest.approx(expected)
    pairs = [(c > n) + 0.5 * (c == n) for c in w[:3] for n in w[3:]]
    assert summary["teacher/clean_over_noisy_auc"] == pytest.approx(auc)
    assert np.mean(pairs) == pytest.approx(auc)  # the reference: every pair counted


@pytest.mark.parametrize(
    "teacher", ["meta_weight_net", "learning_to_reweight", "deep_interaction", "mentornet_pd"]
)
def test_diagnostics_do_not_change_the_run(make_config, teacher: str) -> None:
    common = (f"teacher.name={teacher}", "teacher.hypergrad.inner_steps=3" if teacher == "deep_interaction" else "train.seed=0",
              "noise.type=symmetric", "noise.rate=0.3", "data.train_subset=300")  # fmt: skip
    quiet = Trainer(make_config(*common, "logging.diagnostics=false", "train.run_name=quiet"))
    quiet.fit()
    watched = Trainer(
        make_config(
            *common, "logging.plots=true", "logging.diagnostic_samples=150", "train.run_name=w"
        )
    )
    watched.fit()
    for key, value in quiet.model.state_dict().items():
        assert torch.equal(value, watched.model.state_dict()[key]), key
    for key, value in quiet.teaching.teacher.state_dict().items():  # a running threshold too
        assert torch.equal(value, watched.teaching.teacher.state_dict()[key]), key
    records = [
        json.loads(line) for line in (watched.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    shares = [r["teacher/noisy_weight_share"] for r in records if "trainer/epoch" in r]
    assert len(shares) == 2 and all(0 <= s <= 1 for s in shares)
    for name in ("weight_vs_loss", "tsne", "weight_histogram", "noisy_weight_share"):
        assert (watched.run_dir / "diagnostics" / f"{name}.png").stat().st_size > 5_000, name


def test_a_learned_reweighter_puts_less_weight_on_mislabeled_samples(make_config) -> None:
    # Meta-Weight-Net with its first release's normalized weights, which learn within four
    # epochs (the stable code's do not, docs/results.md, "Meta-Weight-Net, two versions").
    trainer = Trainer(
        make_config(
            "teacher.name=meta_weight_net",
            "teacher.kwargs.normalize=true",
            "train.epochs=4",
            "noise.type=symmetric",
            "noise.rate=0.4",
        )
    )
    final = trainer.fit()
    assert final["teacher/noisy_weight_share"] < 0.7 * final["teacher/noisy_sample_share"]
    assert final["teacher/mean_weight_noisy"] < final["teacher/mean_weight_clean"]


def test_a_collapsed_student_still_gets_its_figures(tmp_path) -> None:
    from metateach.report.plots import plot_tsne

    dead = WeightSnapshot(
        weights=np.ones(50), losses=np.full(50, 2.3), targets=np.arange(50) % 10,
        noisy=np.zeros(50, dtype=bool), features=np.zeros((50, 8)),
    )  # fmt: skip
    assert plot_tsne(dead, "collapsed", tmp_path / "tsne.png").stat().st_size > 5_000


def test_the_sample_record_keeps_every_epoch_through_a_resume(make_config) -> None:
    from metateach.report.diagnostics import SAMPLES, SampleRecord

    common = ("teacher.name=mentornet_pd", "train.epochs=3", "noise.type=symmetric",
              "noise.rate=0.4", "logging.diagnostic_samples=100")  # fmt: skip
    straight = Trainer(make_config(*common, "train.run_name=straight"))
    straight.fit()
    cut = Trainer(make_config(*common, "train.run_name=cut"))
    cut.fit(max_steps=len(cut.train_loader) + 3)  # one epoch measured, then a checkpoint
    Trainer(make_config(*common, f"train.resume={cut.run_dir}")).fit()

    expected = SampleRecord.load(straight.run_dir / "diagnostics" / SAMPLES)
    record = SampleRecord.load(cut.run_dir / "diagnostics" / SAMPLES)
    assert record.epoch.tolist() == [1, 2, 3] and record.losses.shape == (3, 100)
    assert record.progress.tolist() == pytest.approx([1 / 3, 2 / 3, 1])
    for name, value in vars(expected).items():
        np.testing.assert_array_equal(getattr(record, name), value, err_msg=name)
    train = straight.data.train
    assert (record.targets == train.targets[record.index].numpy()).all()
    noisy = record.targets != record.clean_targets
    assert noisy.any() and (noisy == train.is_noisy[record.index].numpy()).all()
    # The losses are the student's as it went: the mislabeled samples' stay higher.
    assert record.losses[-1][noisy].mean() > record.losses[-1][~noisy].mean()
