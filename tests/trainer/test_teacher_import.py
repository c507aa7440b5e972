"""Importing a teacher (``model.teacher_weights``): every file format gives the
saved model's logits; every error names the file and the fix; the weights
hash keys the cache and the temperature; fine-tuning starts from the file.

The oracle is the plain library model the file was saved from (timm /
torchvision, random weights and random BN statistics), run on the same input."""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from trainer.checkpoint import save_checkpoint, unwrap, weights_hash
from trainer.models import ModelError, create_model
from trainer.models.weights import WeightsError, load_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NUM_CLASSES = 10  # the cifar_stores fixture's classes
TIMM, TV = "timm/test_resnet", "torchvision/shufflenet_v2_x0_5"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may download: any connection attempt fails the test."""
    def refuse(*a, **kw):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def library_model(name: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> torch.nn.Module:
    """The plain timm / torchvision model, random weights and BN statistics."""
    torch.manual_seed(seed)
    lib, _, bare = name.partition("/")
    net = timm.create_model(bare, pretrained=False, num_classes=num_classes) if lib == "timm" \
        else tvm.get_model(bare, weights=None, num_classes=num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


FORMATS = ("state_dict", "safetensors", "timm_checkpoint", "timm_ema_checkpoint")


def save_weights(net: torch.nn.Module, path: Path, fmt: str) -> Path:
    sd = net.state_dict()
    if fmt == "state_dict":
        torch.save(sd, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    # what timm's train.py writes (CheckpointSaver): DDP prefixes, its argparse args, the optimizer
    ckpt = {"epoch": 3, "arch": "x", "version": 2, "metric": 0.5,
            "args": argparse.Namespace(lr=0.1, model="x"),
            "state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    if fmt == "timm_ema_checkpoint":  # EMA weights are the ones used, as timm does
        ckpt["state_dict"] = {k: torch.zeros_like(v) for k, v in sd.items()}
        ckpt["state_dict_ema"] = sd
    torch.save(ckpt, path.with_suffix(".pth.tar"))
    return path.with_suffix(".pth.tar")


def logits_of(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", [TIMM, TV])
def test_every_format_imports_the_saved_model(name, tmp_path):
    net = library_model(name)
    x = torch.randn(4, 3, 32, 32)
    expected = logits_of(net, x)
    hashes = set()
    for fmt in FORMATS:
        path = save_weights(net, tmp_path / fmt, fmt)
        model = create_model(name, NUM_CLASSES)
        loaded = load_weights(model, path, NUM_CLASSES, arch=name, classes_from="the store")
        torch.testing.assert_close(logits_of(model, x), expected, msg=fmt)
        assert loaded.head == "loaded" and loaded.weights_hash == weights_hash(model.state_dict())
        assert loaded.source == {"state_dict": "state dict", "safetensors": "safetensors",
                                 "timm_checkpoint": "checkpoint['state_dict']",
                                 "timm_ema_checkpoint": "checkpoint['state_dict_ema']"}[fmt]
        hashes.add(loaded.weights_hash)
    assert len(hashes) == 1  # the same weights, whatever the file format
    other = create_model(name, NUM_CLASSES)
    other_hash = load_weights(other, save_weights(library_model(name, seed=1), tmp_path / "o", "state_dict"),
                              NUM_CLASSES, arch=name, classes_from="the store").weights_hash
    assert other_hash not in hashes


def test_a_trainer_checkpoint_and_the_wrapper_layout_load_with_the_same_hash(tmp_path):
    model = create_model(TIMM, NUM_CLASSES)
    sd = model.state_dict()
    save_checkpoint(tmp_path / "final.pt", {"arch": TIMM, "num_classes": NUM_CLASSES, "model": sd,
                                            "weights_hash": weights_hash(sd)})
    torch.save(sd, tmp_path / "wrapper.pt")  # keys with the wrapper's net. prefix
    x = torch.randn(2, 3, 32, 32)
    for f in ("final.pt", "wrapper.pt"):
        fresh = create_model(TIMM, NUM_CLASSES)
        loaded = load_weights(fresh, tmp_path / f, NUM_CLASSES, arch=TIMM, classes_from="the store")
        assert loaded.weights_hash == weights_hash(sd)  # a trained teacher's hash, by the same rule
        torch.testing.assert_close(logits_of(fresh, x), logits_of(model, x))
    with pytest.raises(WeightsError, match=r"final.pt: a trainer checkpoint of a 'timm/test_resnet', but "
                                           r"the model is 'resnet8'; set the model name"):
        load_weights(create_model("resnet8", NUM_CLASSES), tmp_path / "final.pt", NUM_CLASSES,
                     arch="resnet8", classes_from="the store")


def test_a_project_model_imports_its_own_state_dict(tmp_path):
    torch.manual_seed(3)
    src = create_model("resnet8", NUM_CLASSES)
    save_file(src.state_dict(), tmp_path / "r8.safetensors")
    dst = create_model("resnet8", NUM_CLASSES)
    load_weights(dst, tmp_path / "r8.safetensors", NUM_CLASSES, arch="resnet8", classes_from="the store")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits_of(dst, x), logits_of(src, x))


# ----------------------------------------------------------------- errors
def _load(path, name=TIMM, num_classes=NUM_CLASSES, **kw):
    return load_weights(create_model(name, num_classes, **kw), path, num_classes, arch=name,
                        classes_from="the store data.train_store='s'", head_fix="Fix: HERE")


def test_wrong_head_size_names_file_expected_found_and_fix(tmp_path):
    path = save_weights(library_model(TIMM, num_classes=7), tmp_path / "seven", "safetensors")
    with pytest.raises(WeightsError) as err:
        _load(path)
    assert str(err.value) == (f"{path}: the classifier head (fc.weight (7, 96)) has 7 outputs, but the "
                              f"store data.train_store='s' has 10 classes: expected head size 10, found 7. "
                              f"Fix: HERE")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = library_model(TV).state_dict()
    dropped = sorted(k for k in sd if k.startswith("conv5.") and not k.endswith("num_batches_tracked"))
    torch.save({k: v for k, v in sd.items() if not k.startswith("conv5.")}, tmp_path / "missing.pt")
    with pytest.raises(WeightsError) as err:
        _load(tmp_path / "missing.pt", TV)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'missing.pt'}: its keys do not fit {TV}: {len(dropped)} missing (")
    assert dropped[0] in msg and "unexpected (" not in msg and "torchvision/<arch>" in msg
    torch.save({**sd, "extra.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"extra.pt: its keys do not fit .*: "
                                           r"1 unexpected \(extra.weight\)"):
        _load(tmp_path / "extra.pt", TV)
    # a torchvision file for the project's own resnet18 (keys under net.): named, with the fix
    torch.save(library_model("torchvision/resnet18").state_dict(), tmp_path / "tv_r18.pt")
    with pytest.raises(WeightsError, match=r"102 missing \(net\.bn1\.bias.*122 unexpected \(bn1\.bias.*"
                                           r"needs the model named torchvision/<arch>"):
        _load(tmp_path / "tv_r18.pt", "resnet18")


def test_a_pickle_that_is_not_weights_only_is_refused_without_running_it(tmp_path):
    sd = library_model(TIMM).state_dict()
    torch.save({"state_dict": sd, "hook": _RunsCode()}, tmp_path / "unsafe.pt")
    with pytest.raises(WeightsError) as err:
        _load(tmp_path / "unsafe.pt")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'unsafe.pt'}: not a weights-only file: torch.load(weights_only=True) "
                          f"refused it (")
    assert "GLOBAL getattr was not an allowed global by default)" in msg and "add_safe_globals" not in msg
    assert "safetensors.torch.save_file(model.state_dict()" in msg
    assert not _RunsCode.ran


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_RunsCode._run, ())

    @staticmethod
    def _run():
        _RunsCode.ran = True


def test_unreadable_and_empty_files(tmp_path):
    with pytest.raises(WeightsError, match=r"nope.pt: weights file not found; "
                                           r"fix the path \(model.teacher_weights\)"):
        _load(tmp_path / "nope.pt")
    good = save_weights(library_model(TIMM), tmp_path / "w", "state_dict")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"cut.pt: not a loadable torch file .*is it truncated\?"):
        _load(tmp_path / "cut.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightsError, match=r"junk.safetensors: neither a torch.save file nor a readable "
                                           r"safetensors file"):
        _load(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, tmp_path / "nosd.pt")
    with pytest.raises(WeightsError, match=r"nosd.pt: no state dict in it: its top-level keys are epoch, "
                                           r"optimizer, not tensors nor one of state_dict_ema, model_ema"):
        _load(tmp_path / "nosd.pt")


def test_low_res_stem_on_full_resolution_weights_says_which_flag(tmp_path):
    path = save_weights(library_model("torchvision/resnet18"), tmp_path / "r18", "safetensors")
    with pytest.raises(WeightsError) as err:
        _load(path, "torchvision/resnet18", low_res_stem=True)
    msg = str(err.value)
    assert "conv1.weight (file (64, 3, 7, 7), model (64, 3, 3, 3))" in msg
    assert "model.*_low_res_stem=true replaces the stem" in msg


# ------------------------------------------------ through the trainer's jobs
@pytest.fixture()
def cfg_for(cifar_stores, tmp_path):
    from trainer_helpers import make_cfg

    def make(weights, **model):
        return make_cfg(cifar_stores, tmp_path / "runs", optim=dict(epochs=1),
                        data=dict(batch_size=48, eval_batch_size=120),
                        model=dict(teacher=TIMM, teacher_weights=str(weights), **model))
    return make


def test_teacher_job_errors_name_the_fix(cfg_for, tmp_path):
    from trainer.teacher import load_teacher

    seven = save_weights(library_model(TIMM, num_classes=7), tmp_path / "seven", "state_dict")
    cfg = cfg_for(seven)
    with pytest.raises(WeightsError) as err:
        load_teacher(cfg, NUM_CLASSES, "cpu")
    msg = str(err.value)
    assert msg.startswith(f"{seven}: the classifier head (fc.weight (7, 96)) has 7 outputs, but the store "
                          f"data.train_store={cfg.data.train_store!r} has 10 classes: expected head size 10, "
                          f"found 7. Fix: fine-tune a new 10-class head: 'python -m trainer teacher --config "
                          f"... model.teacher_weights={seven}' starts from these weights")
    assert "run calibrate / cache / distill without model.teacher_weights" in msg
    both = replace(cfg, distill=replace(cfg.distill, teacher_checkpoint="runs/x/teacher/final.pt"))
    with pytest.raises(WeightsError, match="both name the teacher; set one of them"):
        load_teacher(both, NUM_CLASSES, "cpu")
    with pytest.raises(ModelError, match="did you mean timm/test_resnet"):
        load_teacher(replace(cfg, model=replace(cfg.model, teacher="timm/test_resnt")), NUM_CLASSES, "cpu")


def test_cli_shows_the_head_error_in_one_line(cfg_for, tmp_path, capsys, monkeypatch):
    import yaml

    from trainer.__main__ import main

    seven = save_weights(library_model(TIMM, num_classes=7), tmp_path / "seven", "safetensors")
    cfg = cfg_for(seven)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "run": {"name": "t", "out_dir": str(tmp_path / "runs"), "progress": False},
        "data": {"train_store": cfg.data.train_store, "val_store": cfg.data.val_store,
                 "test_store": cfg.data.test_store, "num_workers": 0},
        "model": {"teacher": TIMM, "teacher_weights": str(seven)}}))
    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    assert main(["calibrate", "--config", str(tmp_path / "c.yaml")]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"error: {seven}: the classifier head") and "Traceback" not in err
    assert "expected head size 10, found 7" in err


def test_imported_teacher_hash_keys_calibration_cache_and_distill(cfg_for, tmp_path):
    from trainer import jobs
    from trainer.distill.logit_cache import CacheError
    from trainer.engine import Trainer
    from trainer.run_settings import calibrated_temperature
    from trainer.teacher import load_teacher, teacher_hash

    net = library_model(TIMM)
    a_st = save_weights(net, tmp_path / "a", "safetensors")
    a_ckpt = save_weights(net, tmp_path / "a", "timm_checkpoint")
    b = save_weights(library_model(TIMM, seed=1), tmp_path / "b", "state_dict")
    cfg, cfg_same, cfg_other = cfg_for(a_st), cfg_for(a_ckpt), cfg_for(b)
    teacher, whash = load_teacher(cfg, NUM_CLASSES, "cpu")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits_of(teacher, x), logits_of(net, x))
    assert whash == teacher_hash(cfg) == teacher_hash(cfg_same) != teacher_hash(cfg_other)

    calib = jobs.run_calibrate(cfg)
    assert calib["teacher_weights_hash"] == whash and calib["num_samples"] == 120
    assert calibrated_temperature(cfg_same, whash) == calib["temperature"]
    with pytest.raises(ValueError, match="fitted for another teacher"):
        calibrated_temperature(cfg_other, teacher_hash(cfg_other))
    cache = jobs.run_cache(cfg)
    assert cache["num_samples"] == 480 and cache["feature_dim"] == teacher.feature_dim

    for c, targets in ((cfg_same, "cached"), (cfg, "online")):  # the same weights from another file
        student = replace(c, run=replace(c.run, tag=targets),
                          loss=replace(c.loss, ce=0.1, kd=0.9, temperature=4.0, rkd=1.0),
                          distill=replace(c.distill, targets=targets, calibrated_teacher=True))
        assert jobs.run_distill(student)["step"] == 10  # 1 epoch of 480 / 48
        assert (student.student_dir / "final.pt").is_file()
    other_student = replace(cfg_other, run=replace(cfg_other.run, tag="other"))
    with pytest.raises(CacheError):  # another teacher file: its cache rows are refused
        Trainer(other_student, "student")


def test_fine_tuning_starts_from_the_imported_weights(cfg_for, tmp_path, capsys):
    from trainer import jobs
    from trainer.engine import Trainer
    from trainer.teacher import load_teacher

    same = save_weights(library_model(TIMM), tmp_path / "ten", "safetensors")
    seven = save_weights(library_model(TIMM, num_classes=7, seed=2), tmp_path / "seven", "state_dict")
    file_sd = {"net." + k: v for k, v in library_model(TIMM).state_dict().items()}
    trainer = Trainer(cfg_for(same), "teacher")
    try:
        start = unwrap(trainer.model).state_dict()
        assert start.keys() == file_sd.keys()
        for k in start:
            torch.testing.assert_close(start[k], file_sd[k], msg=k)
    finally:
        trainer.close()
    assert f"teacher: starting from {same} (safetensors; head loaded)" in capsys.readouterr().err

    cfg = cfg_for(seven)
    seven_sd = {"net." + k: v for k, v in library_model(TIMM, num_classes=7, seed=2).state_dict().items()}
    trainer = Trainer(cfg, "teacher")
    try:
        start = unwrap(trainer.model).state_dict()
        for k in start:
            if k.startswith("net.fc."):  # a fresh 10-class head
                assert start[k].shape[0] == NUM_CLASSES
            else:
                torch.testing.assert_close(start[k], seven_sd[k], msg=k)
    finally:
        trainer.close()
    assert "head re-initialised: the file's head has 7 classes" in capsys.readouterr().err

    assert jobs.run_teacher(cfg)["step"] == 10  # 1 epoch of 480 / 48, from the 7-class file
    # later jobs read the fine-tuned teacher once model.teacher_weights is unset
    trained = replace(cfg, model=replace(cfg.model, teacher_weights=""))
    teacher, whash = load_teacher(trained, NUM_CLASSES, "cpu")
    moved = unwrap(teacher).state_dict()["net.conv1.0.weight"]
    assert not torch.equal(moved, seven_sd["net.conv1.0.weight"])  # trained from the import
    assert whash != load_teacher(cfg_for(same), NUM_CLASSES, "cpu")[1]
