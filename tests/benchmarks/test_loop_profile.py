"""The loop profile: every phase the engine labels is found, the shares add
up to the epoch, and the profiled teacher kind never touches the run's
trained teacher."""
from __future__ import annotations

import pytest

from benchmarks.loop_profile import PHASES, print_table, profile_kind


@pytest.mark.parametrize("kind", ["kd_cutmix", "teacher"])
def test_phases_cover_the_epoch(teacher_run, kind, capsys):
    cfg, *_ = teacher_run
    before = cfg.teacher_checkpoint.stat().st_mtime_ns
    row = profile_kind(cfg, kind)
    share = row["share_of_epoch"]
    assert set(share) == set(PHASES) | {"other"}
    for phase in ("data", "forward_loss", "backward", "optimizer", "stats"):
        assert share[phase] > 0, phase
    if kind == "teacher":  # no teacher targets: the label wraps a no-op
        assert share["targets"] < 0.01
    else:
        assert share["targets"] > 0
    assert (share["mix"] > 0) == (kind == "kd_cutmix")
    assert sum(share.values()) == pytest.approx(1.0, abs=0.05)
    assert row["train_images_per_sec"] > 0 and row["validation_ms"] > 0
    assert cfg.teacher_checkpoint.stat().st_mtime_ns == before
    print_table([row])
    assert kind in capsys.readouterr().out


@pytest.mark.parametrize("pairing", ["steps", "epochs"])
def test_paired_efficiency_pairs_the_job_with_the_plain_loop(teacher_run, pairing, capsys):
    from benchmarks.loop_pairs import paired_efficiency
    from benchmarks.loop_pairs import print_table as print_pairs

    cfg, *_ = teacher_run
    before = cfg.teacher_checkpoint.stat().st_mtime_ns
    row = paired_efficiency(cfg, "kd_cutmix", rounds=3, min_round_seconds=0.1, pairing=pairing)
    assert row["role"] == "student" and row["rounds"] == 3 and row["steps_per_epoch"] > 0
    assert row["pairing"] == pairing
    assert len(row["job_images_per_sec"]) == len(row["plain_images_per_sec"]) == len(row["ratios"]) == 3
    for ratio, job, plain in zip(row["ratios"], row["job_images_per_sec"], row["plain_images_per_sec"]):
        assert job > 0 and plain > 0 and ratio == pytest.approx(job / plain)
    eff = row["loop_efficiency"]
    assert eff["min"] <= eff["median"] <= eff["max"] and eff["median"] == sorted(row["ratios"])[1]
    assert cfg.teacher_checkpoint.stat().st_mtime_ns == before
    print_pairs([row])
    assert "kd_cutmix" in capsys.readouterr().out


def test_plain_between_steps_runs_one_plain_step_per_batch():
    from benchmarks.loop_pairs import PlainBetweenSteps

    class Plain:
        batch_size, calls = 4, 0

        def step(self):
            self.calls += 1

    class Loader(list):
        store = "the loader's own attribute"

    plain = Plain()
    between = PlainBetweenSteps(Loader(["a", "b", "c"]), plain)
    seen = []
    for batch in between:
        seen.append((batch, plain.calls))  # the plain step ran before the batch was handed on
    assert seen == [("a", 1), ("b", 2), ("c", 3)]
    assert between.steps == 3 and between.seconds >= 0 and len(between) == 3
    assert between.store == "the loader's own attribute"
