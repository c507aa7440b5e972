"""Model registry: shapes, feature interface, parameter counts, low-res stems."""
from __future__ import annotations

import functools

import pytest
import torch

from trainer.models import create_model, is_imagenet_model, list_models

NUM_CLASSES = 100

# Parameter counts for 100 classes of the CRD pairs (HobbitLong/RepDistiller's
# architectures, the numbers the KD/CRD literature tabulates for CIFAR-100).
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43,
    "wrn_40_2": 2.25, "wrn_16_2": 0.70,
    "resnet56": 0.86, "resnet20": 0.28, "resnet32": 0.47, "resnet110": 1.74,
    "vgg13": 9.46, "vgg8": 3.96,
    "mobilenetv2": 0.81, "shufflenetv1": 0.95,
}


@functools.lru_cache(maxsize=None)
def built(name: str, low_res_stem: bool = False):
    torch.manual_seed(0)
    kw = {"low_res_stem": low_res_stem} if is_imagenet_model(name) else {}
    return create_model(name, NUM_CLASSES, **kw).eval()


def test_registry_lists_the_required_models():
    required = {"resnet8x4", "resnet32x4", "wrn_40_2", "wrn_16_2", "resnet56", "resnet20",
                "resnet32", "resnet110", "vgg13", "vgg8", "mobilenetv2", "shufflenetv1",
                "resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"}
    assert required <= set(list_models())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # batch-2 forwards gain nothing from threads, and on a shared 2-core
    # machine OpenMP spin-waiting under contention makes them much slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_features_and_channels_last(name):
    model = built(name, low_res_stem=is_imagenet_model(name))
    for size in (32, 16, 8):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(x)
            emb, logits2 = model.forward_features(x)
            emb3, logits3 = model(x, return_features=True)
            logits_cl = model(x.contiguous(memory_format=torch.channels_last))
        assert logits.shape == (2, NUM_CLASSES), size
        assert emb.shape == (2, model.feature_dim), size
        assert torch.isfinite(logits).all() and torch.isfinite(emb).all()
        torch.testing.assert_close(logits, logits2)
        torch.testing.assert_close(emb, emb3)
        torch.testing.assert_close(logits3, model.head(emb))
        # random-init eval-mode logits can be huge (deep nets, identity BN stats): compare relatively
        scale = logits.abs().max().clamp(min=1.0)
        torch.testing.assert_close(logits_cl / scale, logits / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name):
    n = sum(p.numel() for p in built(name).parameters()) / 1e6
    assert n == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.02), f"{name}: {n:.3f}M"


def _spatial_size_before_pool(model, size):
    with torch.no_grad():
        return tuple(model.features_map(torch.randn(2, 3, size, size)).shape[-2:])


@pytest.mark.parametrize("name,expected", [("resnet18", (4, 4)), ("resnet50", (4, 4)),
                                           ("mobilenet_v3_small", (2, 2)),
                                           ("mobilenet_v3_large", (2, 2))])
def test_low_res_stem_keeps_spatial_map_at_32px(name, expected):
    assert _spatial_size_before_pool(built(name, low_res_stem=True), 32) == expected
    # without it the ImageNet stem collapses a 32 px input to 1x1
    assert _spatial_size_before_pool(built(name, low_res_stem=False), 32) == (1, 1)


def test_low_res_stem_changes_only_the_stem():
    std = sum(p.numel() for p in built("mobilenet_v3_small", False).parameters())
    low = sum(p.numel() for p in built("mobilenet_v3_small", True).parameters())
    assert std == low
    r_std, r_low = built("resnet18", False), built("resnet18", True)
    assert r_std.net.conv1.kernel_size == (7, 7) and r_low.net.conv1.kernel_size == (3, 3)
    assert r_low.net.conv1.stride == (1, 1)
    assert isinstance(r_low.net.maxpool, torch.nn.Identity)


def test_train_mode_backward_channels_last():
    torch.manual_seed(0)
    model = create_model("resnet8x4", 10).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    emb, logits = model.forward_features(x)
    (logits.logsumexp(1).mean() + emb.pow(2).mean()).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        create_model("resnet9000", 10)
    msg = str(err.value)
    assert "resnet9000" in msg and "resnet8x4" in msg and "mobilenet_v3_small" in msg


def test_aliases_and_options():
    assert type(create_model("ShuffleV1", 10)).__name__ == "ShuffleNetV1"
    assert type(create_model("MobileNetV2", 10)).__name__ == "MobileNetV2"
    # CIFAR stems are already low-res: the shared config key is accepted and ignored
    a, b = create_model("resnet20", 10, low_res_stem=True), create_model("resnet20", 10)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    with pytest.raises(TypeError, match="no options"):
        create_model("resnet20", 10, width=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["resnet8x4", "shufflenetv1", "resnet18", "mobilenet_v3_small",
                                  "timm/test_resnet", "torchvision/mobilenet_v3_small"])
def test_cuda_channels_last_bf16_train_step(name):
    torch.manual_seed(0)
    model = create_model(name, 10, low_res_stem=True).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb, logits = model(x, return_features=True)
    assert logits.shape == (4, 10) and emb.shape == (4, model.feature_dim)
    logits.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
