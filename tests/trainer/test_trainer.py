"""The trainer end to end on a small CIFAR-100 subset (CPU): jobs, resume
equality, cached-vs-online targets, errors."""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import pytest
import torch

from trainer import jobs
from trainer.__main__ import main as cli
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.yaml_config import ConfigError, load_config
from trainer.engine import Trainer
from trainer.distill.logit_cache import CacheError
from trainer.distill.terms import LossInputs
from trainer.recipe import Config


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: x}\noptim: {lr: 0.2, milestones: [0.5, 0.8]}\nmix: {p_cutmix: 0.5}\n")
    cfg = load_config(Config, path, ["optim.epochs=3", "data.scale=[0.5, 1.0]", "loss.kd=0.9"])
    assert (cfg.run.name, cfg.optim.lr, cfg.optim.epochs) == ("x", 0.2, 3)
    assert cfg.optim.milestones == (0.5, 0.8) and cfg.data.scale == (0.5, 1.0)
    assert cfg.mix.p_cutmix == 0.5 and cfg.loss.kd == 0.9
    with pytest.raises(ConfigError, match="unknown key.*optim.lrr|lrr"):
        load_config(Config, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.epochs.*integer"):
        load_config(Config, path, ["optim.epochs=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="p_mixup"):  # the section's own validation, with its name
        load_config(Config, None, ["mix.p_mixup=0.8", "mix.p_cutmix=0.8"])


@pytest.mark.slow
def test_end_to_end_student_beats_chance(teacher_run, tmp_path):
    cfg, teacher, calib, cache = teacher_run
    assert teacher["val_top1"] > 0.25  # 10 classes: chance is 0.10
    assert calib["nll_after"] <= calib["nll_before"]
    assert cache["num_views"] == 2 and cache["fp16_max_abs_error"] < 0.01
    student_cfg = replace(cfg, run=replace(cfg.run, tag="kd_cutmix"),
                          optim=replace(cfg.optim, epochs=4),
                          loss=replace(cfg.loss, ce=0.1, kd=0.9, temperature=4.0),
                          mix=replace(cfg.mix, p_cutmix=1.0))
    result = jobs.run_distill(student_cfg)
    assert result["val_top1"] > 0.25, result  # chance 0.10: a wide margin
    ev = jobs.run_evaluate(student_cfg, str(student_cfg.student_dir / "final.pt"))
    assert (ev["split"], ev["store"]) == ("test", cfg.data.test_store) and ev["top1"] > 0.25
    assert ev["resolution"] == 16 and os.path.getsize(ev["reliability_diagram"]) > 1000
    # evaluate and the training validation read the same pixels: pointed at the
    # val split, evaluate reproduces the last validation
    on_val = replace(student_cfg, data=replace(student_cfg.data, test_store=cfg.data.val_store))
    assert jobs.run_evaluate(on_val, str(student_cfg.student_dir / "final.pt"))["top1"] == \
        pytest.approx(result["val_top1"])
    lines = (student_cfg.student_dir / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("val_ece" in json.loads(x) for x in lines)


def test_resume_gives_the_same_final_metrics(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    base = replace(cfg, run=replace(cfg.run, deterministic=True),
                   loss=replace(cfg.loss, ce=0.5, kd=0.5), mix=replace(cfg.mix, p_mixup=0.5))
    full = jobs.run_distill(replace(base, run=replace(base.run, tag="uninterrupted")))
    interrupted = replace(base, run=replace(base.run, tag="resumed", max_steps=17))  # mid-epoch 2
    jobs.run_distill(interrupted)
    assert not (interrupted.student_dir / "final.pt").exists()
    resumed = jobs.run_distill(replace(interrupted, run=replace(interrupted.run, max_steps=0, resume=True)))
    for k in ("val_top1", "val_ece", "val_nll", "val_brier", "step"):
        assert resumed[k] == full[k], k
    a = load_checkpoint(base.run.root / "uninterrupted" / "final.pt")["model"]
    b = load_checkpoint(base.run.root / "resumed" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_and_online_targets_agree_without_mixing(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    cfg32 = replace(cfg, distill=replace(cfg.distill, cache_dtype="float32"),
                    run=replace(cfg.run, name="t32", out_dir=str(tmp_path)))
    cfg32 = replace(cfg32, distill=replace(cfg32.distill, teacher_checkpoint=str(cfg.teacher_checkpoint)))
    jobs.run_cache(cfg32)
    loss = replace(cfg.loss, kd=1.0, rkd=1.0, crd=1.0, crd_negatives=16)
    cached = Trainer(replace(cfg32, loss=loss), "student")
    online = Trainer(replace(cfg32, distill=replace(cfg32.distill, targets="online"), loss=loss), "student")
    try:
        online.train_loader.set_epoch(1)
        batch = next(iter(online.train_loader))
        assert batch.teacher is not None and batch.teacher.shape[-1] == 32
        p_online, e_online = online.targets(batch)
        p_cached, e_cached = cached.targets(batch)
        torch.testing.assert_close(p_cached, p_online, atol=1e-5, rtol=1e-4)
        # the cache holds the teacher's penultimate embedding: RKD / CRD see what online mode sees
        assert e_cached.shape == e_online.shape == (len(batch), online.targets.teacher_dim)
        torch.testing.assert_close(e_cached, e_online, atol=1e-4, rtol=1e-4)
        s_emb = torch.randn(len(batch), cached.criterion.crd.embed_s.linear.in_features)
        cached.criterion.crd.load_state_dict(online.criterion.crd.state_dict())
        for name in ("rkd", "crd"):
            vals = []
            for t, emb in ((cached, e_cached), (online, e_online)):
                torch.manual_seed(0)  # the same CRD negatives
                vals.append(t.criterion.terms[name](LossInputs(None, s_emb, None, teacher_emb=emb,
                                                               indices=batch.indices)))
            torch.testing.assert_close(vals[0], vals[1], atol=1e-4, rtol=1e-4)
    finally:
        cached.close()
        online.close()


def test_splits_calibrated_teacher_and_temperature_choice(teacher_run, tmp_path):
    """calibrate fits on val; the calibrated teacher is softened at T_cal * T; the
    sweep trains on the cache, scores on val, follows its rule and is reused."""
    cfg, teacher, calib, cache = teacher_run
    assert (calib["split"], calib["store"]) == ("val", cfg.data.val_store)
    assert calib["num_samples"] == 120  # 12 held-out images x 10 classes
    t_cal = calib["temperature"]
    cal = Trainer(replace(cfg, distill=replace(cfg.distill, calibrated_teacher=True),
                          loss=replace(cfg.loss, kd=1.0, temperature=2.0)), "student")
    try:
        assert cal.targets.temperature == pytest.approx(2.0 * t_cal)
    finally:
        cal.close()
    wrong = json.loads(cfg.temperature_file.read_text())
    sweep_cfg = replace(cfg, run=replace(cfg.run, name="sw", out_dir=str(tmp_path)),
                        distill=replace(cfg.distill, teacher_checkpoint=str(cfg.teacher_checkpoint)),
                        loss=replace(cfg.loss, ce=0.1, kd=0.9, temperature="auto"),
                        sweep=replace(cfg.sweep, temperatures=(1.0, 4.0), objectives=("teacher_smoothing",),
                                      calibrated=(False, True), epochs=1, refine=0))
    sweep_cfg.teacher_dir.mkdir(parents=True)
    (sweep_cfg.teacher_dir / "temperature.json").write_text(json.dumps({**wrong, "store": "elsewhere"}))
    with pytest.raises(ValueError, match="not the validation split"):
        jobs.run_distill(replace(sweep_cfg, loss=replace(sweep_cfg.loss, temperature=2.0),
                                 distill=replace(sweep_cfg.distill, calibrated_teacher=True)))
    (sweep_cfg.teacher_dir / "temperature.json").write_text(json.dumps(wrong))
    import shutil
    shutil.copy(cfg.cache_path, sweep_cfg.cache_path)
    shutil.copy(cfg.cache_path.with_suffix(".json"), sweep_cfg.cache_path.with_suffix(".json"))
    from trainer.sweep import choose, run_sweep
    result = run_sweep(sweep_cfg)
    assert len(result["runs"]) == 4 and result["split"] == "val" and result["store"] == cfg.data.val_store
    assert result["choice"]["tag"] == choose(result["runs"], result["top1_tolerance"])["tag"]
    assert result["top1_tolerance"] >= 0.01 and result["top1_standard_error"] > 0
    assert os.path.getsize(result["plot"]) > 1000 and result["cost"]["train_images"] > 0
    assert result["cost"]["online_teacher_seconds_estimate"] > result["cost"]["seconds"]
    # distill with temperature=auto reuses the sweep (no sweep run is trained again)
    import trainer.sweep as sweep_module
    calls = []
    real_fit = jobs._fit
    jobs._fit = lambda c, role: calls.append(c.run.tag) or real_fit(c, role)
    try:
        out = jobs.run_distill(replace(sweep_cfg, run=replace(sweep_cfg.run, tag="auto")))
    finally:
        jobs._fit = real_fit
    assert calls == ["auto"] and out["val_top1"] > 0
    whash = load_checkpoint(cfg.teacher_checkpoint)["weights_hash"]
    assert sweep_module.recipe_fingerprint(sweep_cfg, whash) == result["recipe_fingerprint"]
    assert sweep_module.recipe_fingerprint(sweep_cfg, "another teacher") != result["recipe_fingerprint"]
    final = load_checkpoint(sweep_cfg.run.root / "auto" / "final.pt")["config"]
    assert final["loss"]["temperature"] == result["choice"]["temperature"]
    assert final["distill"]["calibrated_teacher"] == result["choice"]["calibrated"]
    # each run folder holds its resolved config: the sweep's recipe, and the
    # student's with the temperature the sweep chose
    assert load_config(Config, sweep_cfg.sweep_dir / "config.yaml") == sweep_cfg
    auto = load_config(Config, sweep_cfg.run.root / "auto" / "config.yaml")
    assert (auto.loss.temperature, auto.loss.kd_objective, auto.distill.calibrated_teacher) == \
        (result["choice"]["temperature"], result["choice"]["objective"], result["choice"]["calibrated"])


def test_stale_cache_and_incompatible_checkpoints_are_clear_errors(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    other_views = replace(cfg, data=replace(cfg.data, view_seed=1))  # different view contract
    with pytest.raises(CacheError, match="not found|stale"):
        Trainer(other_views, "student")
    wrong_arch = replace(cfg, model=replace(cfg.model, teacher="resnet20"),
                         distill=replace(cfg.distill, targets="online"))
    with pytest.raises(ValueError, match="resnet8"):
        Trainer(wrong_arch, "student")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert cli(["distill", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert cli(["teacher", "data.train_store=" + str(tmp_path / "nostore"), "run.progress=false"]) == 1
    err = capsys.readouterr().err
    assert "nostore" in err and "convert" in err


def test_checkpoints_never_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()
