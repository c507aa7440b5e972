"""``python -m benchmarks.demo`` (``cqkd demo``) reports a bad recipe in one line."""
from __future__ import annotations

import pytest

from benchmarks.demo import main as demo_main
from dataset_tools.settings import ConfigError


def test_bad_override_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    assert demo_main(["--seeds", "1", "data.backend=ffvc"]) == 2
    assert capsys.readouterr().err == (
        "error: override data.backend=ffvc: data.backend='ffvc' is not one of reference, ffcv, dali, memory "
        "(did you mean 'ffcv'?)\n(set CQKD_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("CQKD_DEBUG", "1")
    with pytest.raises(ConfigError):
        demo_main(["data.backend=ffvc"])
