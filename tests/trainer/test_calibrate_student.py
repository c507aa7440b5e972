"""A calibrated student (``distill.calibrate_student``): the temperature is
fitted on the validation logits and folded into the classifier, which is the
only thing that changes; the fold itself, on the registry's model families;
the refusal where the head is not a final linear layer."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from dataset_tools.errors import CqkdError
from trainer import jobs
from trainer.checkpoint import load_checkpoint
from trainer.evaluation.temperature import fit_temperature
from trainer.models import create_model
from trainer.models.temperature_fold import fold_temperature


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_2", "torchvision/resnet18", "timm/resnet18"])
def test_fold_divides_the_logits(arch):
    torch.manual_seed(0)
    model = create_model(arch, 7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        fold_temperature(model, 2.5, 7)
        after = model(x)
    torch.testing.assert_close(after, before / 2.5, rtol=1e-4, atol=1e-5)


def test_fold_refuses_a_head_that_is_not_the_linear_layer():
    class Squashed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def head(self, emb):
            return torch.tanh(self.fc(emb)) * 5

    model = Squashed()
    w = model.fc.weight.clone()
    with pytest.raises(CqkdError, match="calibrate_student=false"):
        fold_temperature(model, 2.0, 3)
    assert torch.equal(model.fc.weight, w)  # undone
    with pytest.raises(ValueError, match="finite and > 0"):
        fold_temperature(create_model("resnet8", 3), 0.0, 3)


def test_calibrated_student_differs_only_by_the_folded_temperature(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    base = replace(cfg, run=replace(cfg.run, deterministic=True),  # the shared teacher and cache
                   loss=replace(cfg.loss, ce=0.1, kd=0.9, temperature=4.0))
    raw = jobs.run_distill(replace(base, run=replace(base.run, tag="calstudent_raw")))
    cal = jobs.run_distill(replace(base, run=replace(base.run, tag="calstudent_cal"),
                                   distill=replace(base.distill, calibrate_student=True)))
    a = load_checkpoint(base.run.root / "calstudent_raw" / "final.pt")
    b = load_checkpoint(base.run.root / "calstudent_cal" / "final.pt")
    t = b["student_temperature"]
    assert a["student_temperature"] is None and t == cal["student_temperature"] > 0
    changed = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert changed == ["fc.weight", "fc.bias"] or changed == ["fc.weight"]
    torch.testing.assert_close(b["model"]["fc.weight"], a["model"]["fc.weight"] / t)
    # the temperature is the NLL fit on the raw student's validation logits
    model = create_model("resnet8", 10)
    model.load_state_dict(a["model"])
    from trainer.evaluation.logits import collect_logits

    with jobs._eval_loader(base, "val", 16, torch.device("cpu")) as loader:
        logits, labels = collect_logits(model, loader, jobs._autocast_for(base, torch.device("cpu")))
    assert t == pytest.approx(fit_temperature(logits, labels).temperature, rel=1e-6)
    # the log: calibrated val metrics, the raw ones beside them, and the cross-fitted ECE
    rec = json.loads((base.run.root / "calstudent_cal" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["val_raw_top1"] == rec["val_top1"] == raw["val_top1"]
    assert rec["val_raw_ece"] == pytest.approx(raw["val_ece"]) and 0 <= rec["val_ece_crossfit"] <= 1
    assert rec["val_nll"] <= rec["val_raw_nll"] + 1e-9  # the NLL fit never raises the NLL
