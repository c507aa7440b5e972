"""Progress for people reading logs: plain lines (no carriage returns) when
standard error is not a terminal, a tqdm bar when it is; and the long jobs
(convert, training, cache fill, evaluate) use it."""
from __future__ import annotations

import io
import sys

import pytest
from tqdm import tqdm

from dataset_tools import progress as P


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_line_per_tenth_and_no_carriage_returns(capsys):
    assert not P.live_terminal()  # pytest captures stderr: not a terminal
    items = list(P.progress(range(50), desc="convert train", unit="img", min_seconds=0))
    assert items == list(range(50))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("convert train:  10% (5/50) [")
    assert lines[-1].startswith("convert train: 100% (50/50) [") and "img/s" in lines[-1]


def test_lines_are_throttled_and_the_last_one_is_kept(capsys):
    bar = P.progress(total=1000, desc="teacher cache", min_seconds=3600)
    for _ in range(1000):
        bar.update()
    bar.close()
    bar.close()  # closing twice writes once
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("teacher cache: 100% (1000/1000)")


def test_a_resumed_epoch_counts_from_where_it_was_and_shows_the_postfix(capsys):
    bar = P.progress(total=20, desc="student epoch 3", initial=14, min_seconds=0, final_line=False)
    for _ in range(6):
        bar.update()
        bar.set_postfix(loss="1.234")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("[")[0] for line in lines] == ["student epoch 3:  80% (16/20) ",
                                                      "student epoch 3:  90% (18/20) "]
    assert all(line.endswith(", loss=1.234]") for line in lines)  # no 100 % line: the caller's summary follows


def test_disabled_progress_says_nothing(capsys):
    assert sum(P.progress(range(30), enabled=False, min_seconds=0)) == sum(range(30))
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_tqdm_and_summary_lines_above_it(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = P.progress(total=5, desc="x", leave=False)
    assert isinstance(bar, tqdm)
    bar.update(5)
    bar.close()
    P.log_line("teacher epoch 1/2: loss 1.000")
    assert "\r" in term.getvalue() and "teacher epoch 1/2: loss 1.000\n" in term.getvalue()
    assert not isinstance(P.progress(total=5, enabled=False), tqdm)


def test_convert_logs_lines(cifar_subset, tmp_path, capsys):
    from dataset_tools.convert import main as convert_main

    assert convert_main([str(cifar_subset), str(tmp_path / "out"), "--workers", "1",
                         "--formats", "ffcv"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    done = [line for line in err.splitlines() if line.startswith("convert ")]
    assert done and done[-1].startswith(f"convert {cifar_subset.name}: 100% (200/200) [")


@pytest.mark.parametrize("shown", [True, False])
def test_training_and_evaluation_log_one_line_per_epoch(cifar_stores, tmp_path, capsys, shown):
    from trainer import jobs
    from trainer_helpers import make_cfg

    cfg = make_cfg(cifar_stores, tmp_path, optim=dict(epochs=2), run=dict(progress=shown))
    jobs.run_teacher(cfg)
    jobs.run_evaluate(cfg, str(cfg.teacher_checkpoint))
    err = capsys.readouterr().err
    assert "\r" not in err
    epochs = [line for line in err.splitlines() if line.startswith("teacher epoch")]
    if not shown:
        assert not epochs and "evaluate" not in err and "%" not in err
        return
    assert [line.split(":")[0] for line in epochs] == ["teacher epoch 1/2", "teacher epoch 2/2"]
    assert all("val top-1" in line and "img/s" in line for line in epochs)
    assert any(line.startswith("evaluate final.pt: 100% (") for line in err.splitlines())
