"""BatchNorm folding for a frozen backbone: same outputs, fewer layers, the model left as trained."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vision_tl.backbones import FoldedInference, fold_batchnorm, resolve_preprocessing
from vision_tl.features.extractor import FeatureExtractor
from vision_tl.tasks import ImageClassifier

TINY = "test_efficientnet"


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextmanager
def _batch_norm_calls():
    """Counts F.batch_norm calls (nn.BatchNorm2d and timm's norm-act layers both make them):
    a folded backbone makes none."""
    calls = []
    real = F.batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    with mock.patch.object(F, "batch_norm", counting):
        yield calls


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


def test_a_conv_output_another_module_reads_too_stays_but_the_other_pairs_fold():
    """MaxViT's and CoAtNet's layout: the stem's last convolution feeds a block's pre-norm and its
    shortcut. Folding that norm changed the shortcut's input too, and the check then left the
    whole model unfolded; now only that pair stays and the others fold."""

    class PreNormBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.pre_norm, self.shortcut = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
            self.body = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = self.conv(torch.relu(self.stem_bn(self.stem(x))))
            return self.shortcut(x) + self.body(self.pre_norm(x))

    _assert_only_this_norm_stays(_trained_stats(PreNormBlock()), "pre_norm")


def _assert_only_this_norm_stays(model: nn.Module, kept: str) -> None:
    """The fold keeps BatchNorm ``kept`` as it is, folds the other one, and gives the model's output."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    folded = fold_batchnorm(model, x)
    assert folded is not None and isinstance(getattr(folded, kept), nn.BatchNorm2d) and _norms(folded) == 1
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_convolution_called_twice_stays_and_the_other_pairs_fold():
    """A convolution run twice (weights shared), its second output read by no module: looking
    for that output's other readers raised a KeyError, and the whole model ran unfolded."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = torch.relu(self.stem_bn(self.stem(x)))
            return self.conv(self.bn(self.conv(x))).mean((2, 3))

    _assert_only_this_norm_stays(_trained_stats(Shared()), "bn")


def test_norm_before_conv_and_models_without_batchnorm_are_left_alone():
    pre = _trained_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)))
    assert fold_batchnorm(pre, torch.randn(2, 3, 8, 8)) is None
    assert fold_batchnorm(timm.create_model("test_vit", pretrained=False, num_classes=0).eval(),
                          torch.randn(2, 3, 160, 160)) is None


def test_folded_inference_rebuilds_when_the_weights_change_and_steps_aside_for_training():
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
    third = run.model_for(x, trainable_ok=False)
    assert third is not second and third is not model
    model.conv_stem.weight.requires_grad_(True)  # a forward with gradients runs such a backbone as it is
    assert run.model_for(x, trainable_ok=False) is model
    assert run.model_for(x) is not model  # inference (no gradients) still folds it


def test_a_sample_given_as_a_callable_is_made_only_when_a_copy_is_built():
    model = _trained_stats(timm.create_model(TINY, pretrained=False, num_classes=0)).requires_grad_(False)
    run, made = FoldedInference(model), []
    x = torch.randn(4, 3, 32, 32)

    def sample():
        made.append(1)
        return x

    first = run.model_for(sample)
    assert run.model_for(sample) is first and made == [1]  # a kept copy needs no sample
    with torch.no_grad():
        model.conv_stem.weight.mul_(2.0)
    assert run.model_for(sample) is not first and made == [1, 1]


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
    with _batch_norm_calls() as calls:  # the copy is built: the next training step runs it
        logits = model(x)
    assert not calls
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
            with _batch_norm_calls() as calls:
                assert torch.equal(model(x), got)
            assert not calls
            expected = model.net(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    model.eval()
    assert model(x).requires_grad  # eval mode with gradients on (saliency maps): the model itself runs


def test_frozen_classifier_in_eval_mode_passes_the_input_gradient():
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="frozen", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x)[:, 0].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_weights_written_through_data_are_seen_at_the_next_evaluation_pass():
    """Lightning's weight averaging swaps weights in through .data, which moves no version counter."""
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="full", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        model.net.backbone.conv_stem.weight.data.mul_(3.0)
        model.on_predict_epoch_start()
        got = model(x)
        expected = model.net(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_backbone_with_forward_hooks_runs_unfolded_and_folds_again_once_they_are_removed():
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="frozen", pretrained=False).eval()
    x = torch.randn(4, 3, 32, 32)
    seen = []
    handle = model.net.backbone.register_forward_hook(lambda _m, _i, out: seen.append(len(out)))
    with torch.no_grad():
        model(x)
        model(x)
    assert seen == [4, 4]  # once per call, on the caller's batches: no copy calls it on others
    handle.remove()
    with torch.no_grad():
        model(x)  # builds the copy
        with _batch_norm_calls() as calls:
            model(x)
    assert seen == [4, 4] and not calls


def test_extractor_embeddings_match_the_unfolded_backbone():
    model = _trained_stats(timm.create_model(TINY, pretrained=False, num_classes=0))
    fx = FeatureExtractor(model, TINY, resolve_preprocessing(TINY, 32), stages="pooled,-1")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    fx.embed(x)  # builds the copy
    assert any(p.requires_grad for p in model.parameters())  # folded all the same: embed runs in inference mode
    with _batch_norm_calls() as calls:
        got = fx.embed(x)
    assert not calls
    with torch.no_grad():
        norm = fx._normalise(x)
        final, inter = model.forward_intermediates(norm, indices=[len(model.feature_info) - 1])
        expected = torch.cat([model.forward_head(final, pre_logits=True), inter[0].mean((2, 3))], 1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_check_runs_without_cudnn_benchmarking_and_restores_it():
    """A GPU fit with ``trainer.benchmark`` (configs/gpu.yaml) would otherwise time every
    convolution again for the check's small batch."""
    model = _trained_stats(timm.create_model(TINY, pretrained=False, num_classes=0))
    seen = []
    real = F.conv2d

    def conv2d(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return real(*args, **kwargs)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with mock.patch.object(F, "conv2d", conv2d):
            assert fold_batchnorm(model, torch.randn(2, 3, 32, 32)) is not None
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    assert seen and not any(seen)


def test_an_intermediate_stage_taken_before_a_batchnorm_is_not_folded_away():
    """GhostNet's stage 0 is its stem convolution's output before bn1: the check runs the
    extractor's own call, so the fold that would change that stage is refused."""
    model = _trained_stats(timm.create_model("ghostnet_050", pretrained=False, num_classes=0))
    fx = FeatureExtractor(model, "ghostnet_050", resolve_preprocessing("ghostnet_050", 64), stages="0")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got = fx.embed(x)
    with torch.no_grad():
        norm = fx._normalise(x).contiguous(memory_format=torch.channels_last)
        _, inter = model.eval().forward_intermediates(norm, indices=[0])
    assert torch.allclose(got, inter[0].mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_fold_restores_train_flags_and_leaves_norms_without_running_statistics():
    model = timm.create_model(TINY, pretrained=False, num_classes=0).train()
    assert fold_batchnorm(model, torch.randn(2, 3, 32, 32)) is not None
    assert all(m.training for m in model.modules())
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold_batchnorm(batch_stats, torch.randn(2, 3, 8, 8)) is None


def test_partial_training_runs_its_frozen_stages_folded_with_the_same_outputs_and_gradients():
    import copy

    from vision_tl.models.finetuning import unfreeze_stages

    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False,
                            dropout=0.0)
    _trained_stats(model.net.backbone)
    reference = copy.deepcopy(model.net).to(memory_format=torch.channels_last).train()
    keys, stem_norm = list(model.state_dict()), model.net.backbone.bn1
    x = torch.randn(4, 3, 32, 32)
    model.train()
    model(x)  # builds the copy of the frozen stages
    with _batch_norm_calls() as calls:
        out = model(x)
    with _batch_norm_calls() as all_calls:
        expected = reference(x.contiguous(memory_format=torch.channels_last))
    assert 0 < len(calls) < len(all_calls)  # the norms of the stages that train still run
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    trained = [(p, q) for p, q in zip(model.net.parameters(), reference.parameters()) if p.requires_grad]
    assert trained and all(torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6) for p, q in trained)
    assert all(p.grad is None for p in model.net.parameters() if not p.requires_grad)
    assert model.net.backbone.bn1 is stem_norm and list(model.state_dict()) == keys  # the tree is restored
    within = model.__dict__["_folded_stages_by"][1].within
    unfreeze_stages(model.net, 3)  # GradualUnfreezing: fewer frozen stages, folded again
    model(x)
    assert len(model.__dict__["_folded_stages_by"][1].within) < len(within)


def test_a_frozen_module_replaced_after_the_copy_was_built_is_the_one_that_runs():
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False,
                            dropout=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    model(x)  # builds the copy of the frozen stages
    stem = model.net.backbone.conv_stem
    model.net.backbone.conv_stem = nn.Conv2d(stem.in_channels, stem.out_channels, 3, stride=2, padding=1,
                                              bias=False).to(memory_format=torch.channels_last)
    out = model(x)
    expected = model.net(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert model.net.backbone.conv_stem.weight.grad is not None  # the new module trains


def test_the_head_is_sized_for_what_the_backbone_returns():
    """MobileNetV3 returns features after its head convolution (head_hidden_size), wider
    than num_features: the classifier and the extractor used to be sized for the latter."""
    model = ImageClassifier(["a", "b"], backbone="mobilenetv3_small_050", image_size=64, mode="frozen",
                            pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    backbone = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    fx = FeatureExtractor(backbone, "mobilenetv3_small_050", resolve_preprocessing("mobilenetv3_small_050", 64))
    assert fx.embed(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).shape == (2, fx.num_features)


def test_partial_training_swaps_whole_frozen_stages_not_each_layer():
    from vision_tl.tasks.classifier import _outermost_covered

    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False).train()
    swapped = model._folded_stages(torch.randn(2, 3, 32, 32))
    assert list(swapped) == ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"]
    assert all(not any(p.requires_grad for p in m.parameters()) for m in swapped.values())
    # a stateless layer (an activation) inside a frozen block is covered; a layer that trains is not
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)))
    frozen = {id(net[0][0]), id(net[1][0])}
    assert _outermost_covered(net, frozen) == ["0", "1.0"]
