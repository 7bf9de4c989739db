"""BatchNorm folding for a frozen backbone: same outputs, fewer layers, the model left as trained."""

from __future__ import annotations

import timm
import torch
from torch import nn

from tests.conftest import TINY
from vision_tl.backbones import FoldedInference, fold_batchnorm, resolve_preprocessing
from vision_tl.features.extractor import FeatureExtractor
from vision_tl.tasks import ImageClassifier


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _trained_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine terms away from their defaults, so a fold has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def test_folded_backbones_match_and_lose_every_norm_after_a_conv():
    for name in (TINY, "test_resnet", "test_byobnet"):
        model = _trained_stats(timm.create_model(name, pretrained=False, num_classes=0))
        x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        folded = fold_batchnorm(model, x[:2])
        assert folded is not None and _norms(model) > 0 and _norms(folded) == 0, name
        with torch.no_grad():
            expected, got = model(x), folded(x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), name
        # the source is untouched: same keys, same values, still a trainable module
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert list(before) == list(model.state_dict())
        assert not any(p.requires_grad for p in folded.parameters())


def test_a_conv_output_used_twice_is_not_folded():
    """The traced pairing sees the norm's input, not the conv output's other use; the check
    against the model catches it and the model runs unfolded."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _trained_stats(Residual())
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) is None


def test_norm_before_conv_and_models_without_batchnorm_are_left_alone():
    pre = _trained_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)))
    assert fold_batchnorm(pre, torch.randn(2, 3, 8, 8)) is None
    assert fold_batchnorm(timm.create_model("test_vit", pretrained=False, num_classes=0).eval(),
                          torch.randn(2, 3, 160, 160)) is None


def test_folded_inference_rebuilds_when_the_weights_change_and_steps_aside_while_they_train():
    model = _trained_stats(timm.create_model(TINY, pretrained=False, num_classes=0)).requires_grad_(False)
    run = FoldedInference(model)
    x = torch.randn(2, 3, 32, 32)
    first = run.model_for(x)
    assert first is not model and run.model_for(x) is first  # kept while nothing changes
    with torch.no_grad():
        model.conv_stem.weight.mul_(2.0)  # an optimiser step changes weights in place like this
    second = run.model_for(x)
    assert second is not first
    with torch.no_grad():
        assert torch.allclose(second(x), model(x), rtol=1e-4, atol=1e-5)
    model.load_state_dict({k: v * 1 for k, v in model.state_dict().items()})
    assert run.model_for(x) is not second
    model.conv_stem.weight.requires_grad_(True)  # training the backbone: run it as it is
    assert run.model_for(x) is model


def test_frozen_classifier_runs_the_folded_backbone_and_trains_only_the_head():
    model = ImageClassifier(["a", "b", "c"], backbone=TINY, image_size=32, mode="frozen", pretrained=False,
                            dropout=0.0)
    _trained_stats(model.net.backbone)
    keys = list(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.train()
    logits = model(x)
    with torch.no_grad():
        expected = model.net.head(model.net.backbone(x))
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert model.__dict__["_folded"].model_for(x) is not model.net.backbone  # the folded copy ran
    logits.sum().backward()
    assert all(p.grad is not None for p in model.net.head.parameters())
    assert all(p.grad is None for p in model.net.backbone.parameters())
    assert list(model.state_dict()) == keys  # checkpoints keep the model as trained


def test_partial_classifier_trains_unfolded_and_validates_folded_after_every_step():
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False)
    _trained_stats(model.net.backbone)
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        model.train()
        model(x).sum().backward()
        assert "_folded" not in model.__dict__ or model.__dict__["_folded"].trainable
        assert any(p.grad is not None for p in model.net.backbone.parameters())
        opt.step()
        opt.zero_grad()
        model.eval()  # validation: eval mode, no gradients -> the folded copy of the weights as they are now
        with torch.no_grad():
            got = model(x)
            assert _norms(model.__dict__["_folded"].model_for(x)) == 0
            expected = model.net(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    model.eval()
    assert model(x).requires_grad  # eval mode with gradients on (saliency maps): the model itself runs


def test_extractor_embeddings_match_the_unfolded_backbone():
    model = _trained_stats(timm.create_model(TINY, pretrained=False, num_classes=0))
    fx = FeatureExtractor(model, TINY, resolve_preprocessing(TINY, 32), stages="pooled,-1")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    got = fx.embed(x)
    with torch.no_grad():
        norm = fx._normalise(x)
        # folded although the backbone's parameters require gradients: embed runs in inference mode
        assert any(p.requires_grad for p in model.parameters())
        assert _norms(fx._folded.model_for(norm)) == 0
        final, inter = model.forward_intermediates(norm, indices=[len(model.feature_info) - 1])
        expected = torch.cat([model.forward_head(final, pre_logits=True), inter[0].mean((2, 3))], 1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_check_runs_without_cudnn_benchmarking_and_restores_it():
    """A GPU fit with ``trainer.benchmark`` (configs/gpu.yaml) would otherwise time every
    convolution again for the check's small batch."""
    model = _trained_stats(timm.create_model(TINY, pretrained=False, num_classes=0))
    seen = []
    model.conv_stem.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        assert fold_batchnorm(model, torch.randn(2, 3, 32, 32)) is not None
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    assert seen and not any(seen)
