"""torchvision/<name> and timm/<name> in the registry: names, the embedding
through each library's feature API, the low-resolution stem, the errors.

The oracle for logits and embeddings is the plain library model (built by
timm / torchvision directly, the wrapper's weights copied in): its logits,
and the input its final linear layer receives (a forward pre-hook)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from trainer.models import ModelError, StemError, create_model, is_imagenet_model, list_models
from trainer.models.library import UnsupportedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may download: any connection attempt fails the test."""
    def refuse(*a, **kw):
        raise AssertionError("a model build tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small forwards on a shared machine
    yield
    torch.set_num_threads(n)


def plain_library_model(name: str, num_classes: int) -> nn.Module:
    lib, _, bare = name.partition("/")
    if lib == "timm":
        return timm.create_model(bare, pretrained=False, num_classes=num_classes)
    return tvm.get_model(bare, weights=None, num_classes=num_classes)


def classifier_input(net: nn.Module, linear: nn.Linear, x: torch.Tensor):
    """(logits, what ``linear`` received) from the plain library model."""
    seen = {}
    hook = linear.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0].detach()))
    try:
        logits = net(x)
    finally:
        hook.remove()
    return logits, seen["x"]


# (name, input size, the plain model's final linear layer, expected embedding size)
CASES = [
    ("timm/test_resnet", 32, lambda n: n.fc, None),
    ("timm/test_convnext", 32, lambda n: n.head.fc, None),
    ("timm/test_efficientnet", 32, lambda n: n.classifier, None),
    ("timm/test_vit", 160, lambda n: n.head, None),
    ("timm/mobilenetv3_small_050", 32, lambda n: n.classifier, 1024),  # after conv_head: head_hidden_size
    ("torchvision/shufflenet_v2_x0_5", 32, lambda n: n.fc, 1024),
    ("torchvision/mobilenet_v3_small", 32, lambda n: n.classifier[3], 1024),
    ("torchvision/resnet18", 32, lambda n: n.fc, 512),
]


@pytest.mark.parametrize("name,size,final_linear,dim", CASES, ids=[c[0] for c in CASES])
def test_embedding_is_the_classifier_input_and_logits_match_the_library(name, size, final_linear, dim):
    torch.manual_seed(0)
    model = create_model(name, 7).eval()
    plain = plain_library_model(name, 7).eval()
    plain.load_state_dict({k[len("net."):]: v for k, v in model.state_dict().items()})  # same paths
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        emb, logits = model(x, return_features=True)
        ref_logits, ref_emb = classifier_input(plain, final_linear(plain), x)
    assert emb.shape == (3, model.feature_dim) and logits.shape == (3, 7)
    if dim is not None:
        assert model.feature_dim == dim
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(emb, ref_emb.flatten(1))
    torch.testing.assert_close(model.head(emb), logits)
    assert is_imagenet_model(name)


def test_torchvision_dropout_before_the_classifier_moves_into_the_head():
    torch.manual_seed(0)
    model = create_model("torchvision/mobilenet_v3_small", 5).train()
    x = torch.randn(4, 3, 32, 32)
    emb1, _ = model.forward_features(x)
    emb2, _ = model.forward_features(x)
    torch.testing.assert_close(emb1, emb2)  # no dropout on the embedding (p=0.2 would differ)
    with torch.no_grad():
        a, b = model.head(emb1), model.head(emb1)
    assert not torch.equal(a, b)  # the classifier's dropout still acts in training
    model.eval()
    torch.testing.assert_close(model.head(emb1), model.head(emb1))


def _map_before_pool(model, pool: nn.Module, size: int):
    seen = {}
    hook = pool.register_forward_hook(lambda m, inp, out: seen.update(hw=tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, size, size))
    hook.remove()
    return seen["hw"]


@pytest.mark.parametrize("name", ["timm/resnet18", "torchvision/resnet18"])
def test_low_res_stem_on_resnets(name):
    torch.manual_seed(0)
    low, std = create_model(name, 10, low_res_stem=True), create_model(name, 10)
    pool = (lambda m: m.net.global_pool) if name.startswith("timm") else (lambda m: m.net.avgpool)
    assert std.net.conv1.kernel_size == (7, 7) and std.net.conv1.stride == (2, 2)
    assert low.net.conv1.kernel_size == (3, 3) and low.net.conv1.stride == (1, 1)
    assert isinstance(low.net.maxpool, nn.Identity)
    assert _map_before_pool(low, pool(low), 32) == (4, 4)  # total stride 8
    assert _map_before_pool(std, pool(std), 32) == (1, 1)  # the ImageNet stem: stride 32
    assert low(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_low_res_stem_on_a_timm_deep_stem_and_mobile_models():
    deep = create_model("timm/test_resnet", 10, low_res_stem=True)
    assert deep.net.conv1[0].stride == (1, 1) and isinstance(deep.net.maxpool, nn.Identity)
    for name, conv in (("timm/mobilenetv3_small_050", lambda m: m.net.conv_stem),
                       ("timm/test_efficientnet", lambda m: m.net.conv_stem),
                       ("torchvision/mobilenet_v3_small", lambda m: m.net.features[0][0])):
        low, std = create_model(name, 10, low_res_stem=True), create_model(name, 10)
        assert conv(low).stride == (1, 1) and conv(std).stride == (2, 2), name
        assert sum(p.numel() for p in low.parameters()) == sum(p.numel() for p in std.parameters())


@pytest.mark.parametrize("name", ["timm/test_convnext", "torchvision/shufflenet_v2_x0_5", "timm/test_vit"])
def test_low_res_stem_refused_where_the_rule_does_not_apply(name):
    with pytest.raises(StemError) as err:
        create_model(name, 10, low_res_stem=True)
    msg = str(err.value)
    assert msg.startswith(f"{name}: low_res_stem is not defined for")
    assert "timm ResNet" in msg and "torchvision ResNet" in msg and "low_res_stem to false" in msg


def test_unknown_names_name_close_matches_and_how_to_list():
    with pytest.raises(ModelError) as err:
        create_model("timm/convnext_tny", 10)
    msg = str(err.value)
    assert msg.startswith("unknown model 'timm/convnext_tny' (timm has no model 'convnext_tny')")
    assert "did you mean timm/convnext_tiny" in msg and "python -m trainer.models" in msg
    with pytest.raises(ModelError, match=r"did you mean torchvision/convnext_tiny, timm/convnext_tiny"):
        create_model("convnext_tiny", 10)  # no prefix: the library names are suggested
    with pytest.raises(ModelError, match=r"unknown source 'tv'.*torchvision/resnet18"):
        create_model("tv/resnet18", 10)
    with pytest.raises(ModelError, match=r"torchvision has no model 'resnet19'.*torchvision/resnet18"):
        is_imagenet_model("torchvision/resnet19")


def test_refused_library_models_and_options():
    with pytest.raises(UnsupportedModel, match="squeezenet1_0: no linear classifier"):
        create_model("torchvision/squeezenet1_0", 10)
    with pytest.raises(UnsupportedModel, match="2 classifier heads"):
        create_model("timm/deit_tiny_distilled_patch16_224", 10)
    with pytest.raises(TypeError, match="no options but low_res_stem"):
        create_model("timm/test_resnet", 10, drop_rate=0.1)


def test_listing_names():
    assert "resnet8x4" in list_models() and not any("/" in n for n in list_models())
    timm_resnets = list_models("resnet18*", "timm")
    assert "timm/resnet18" in timm_resnets and "timm/resnet18d" in timm_resnets
    assert list_models("*convnext_tiny", "all") == ["torchvision/convnext_tiny", "timm/convnext_tiny"]
    r = subprocess.run([sys.executable, "-m", "trainer.models", "--source", "torchvision", "resnet*"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "torchvision/resnet50" in r.stdout.split() and "timm/resnet50" not in r.stdout


def test_timm_pretrained_tag_names_the_architecture():
    model = create_model("timm/test_resnet.r160_in1k", 4)  # the tag is accepted, nothing is fetched
    assert type(model.net).__name__ == "ResNet" and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)
