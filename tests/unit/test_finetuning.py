"""Freezing modes: what trains, and frozen BatchNorm statistics that never move."""

from __future__ import annotations

import contextlib

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_tl.backbones import backbone_stages
from vision_tl.models import count_trainable
from vision_tl.models.finetuning import unfreeze_stages
from vision_tl.tasks import ImageClassifier, class_weights_from_counts

TINY = "test_efficientnet"


def _model(mode: str, **kwargs) -> ImageClassifier:
    return ImageClassifier(["a", "b", "c"], backbone=TINY, pretrained=False, image_size=32, mode=mode,
                           class_counts=[4, 4, 4], **kwargs)


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def _fit_one_epoch(model: ImageClassifier, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g) * 3 + 1, torch.randint(0, 3, (16,), generator=g))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=8))


def test_partial_mode_frozen_bn_is_bit_identical_after_training(tmp_path):
    model = _model("partial", trainable_stages=2, freeze_bn=False)
    stages = backbone_stages(model.net.backbone)
    frozen = nn.ModuleList([m for stage in stages[:-2] for m in stage])
    trained = nn.ModuleList([m for stage in stages[-2:] for m in stage])
    frozen_before, trained_before = _bn_state(frozen), _bn_state(trained)
    weights_before = {k: v.clone() for k, v in frozen.state_dict().items()}
    _fit_one_epoch(model, tmp_path)
    for key, value in _bn_state(frozen).items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, weights_before[key]), key
    # The trainable stages' statistics did move (freeze_bn=False), so the check above can fail.
    assert any(not torch.equal(v, trained_before[k]) for k, v in _bn_state(trained).items())


def test_freeze_bn_keeps_statistics_of_trainable_stages(tmp_path):
    model = _model("full", freeze_bn=True)
    before = _bn_state(model.net.backbone)
    _fit_one_epoch(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in _bn_state(model.net.backbone).items())


def test_frozen_mode_trains_only_the_head():
    model = _model("frozen")
    trainable, total = count_trainable(model.net)
    assert trainable == sum(p.numel() for p in model.net.head.parameters()) < total
    model.train()
    assert not model.net.backbone.training and model.net.head.training


def test_optimizer_sees_only_trainable_parameters_with_discriminative_lr(tmp_path):
    model = _model("partial", lr=1e-2, backbone_lr_factor=0.1)
    model.trainer = L.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path)
    model.trainer.fit_loop.epoch_loop.max_steps = 10
    groups = {g["name"]: g for g in model.configure_optimizers()["optimizer"].param_groups}
    optimised = {id(p) for g in groups.values() for p in g["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups["backbone"]["lr"] == pytest.approx(groups["head"]["lr"] * 0.1)


def test_unfreeze_stages_grows_the_trainable_set():
    model = _model("partial", trainable_stages=1)
    before, _ = count_trainable(model.net)
    newly = unfreeze_stages(model.net, 3)
    after, _ = count_trainable(model.net)
    assert newly and after == before + sum(p.numel() for p in newly)



@pytest.mark.parametrize("mode, stages, milestone", [("full", None, 2), ("partial", 3, 2)])
def test_a_milestone_never_freezes_stages_that_train(mode, stages, milestone):
    """A milestone of fewer stages than already train (full mode; partial with more) froze the
    others again, while the log said there was nothing to unfreeze."""
    model = _model(mode, **({"trainable_stages": stages} if stages else {}))
    training = [p.requires_grad for p in model.net.parameters()]
    eval_modules = list(model.net.eval_modules)
    assert unfreeze_stages(model.net, milestone) == []
    assert [p.requires_grad for p in model.net.parameters()] == training
    assert model.net.eval_modules == eval_modules


def test_a_milestone_keeps_training_a_vits_tokens_that_a_resumed_run_trains():
    """An older partial run trained a ViT's cls_token and pos_embed; resumed, they train again,
    and a milestone rebuilding the frozen set froze them anew."""
    from vision_tl.models.finetuning import outside_stages

    model = ImageClassifier(["a", "b", "c"], backbone="test_vit", pretrained=False, mode="partial",
                            trainable_stages=1, class_counts=[4, 4, 4])
    tokens = outside_stages(model.net.backbone)
    for param in tokens:
        param.requires_grad = True
    assert unfreeze_stages(model.net, 2)
    assert tokens and all(p.requires_grad for p in tokens)


def test_invalid_mode_and_settings_list_valid_choices():
    with pytest.raises(ValueError, match="unknown mode 'half'; expected one of: frozen, partial, full"):
        _model("half")
    with pytest.raises(ValueError, match="trainable_stages must be between 1 and"):
        _model("partial", trainable_stages=99)
    with pytest.raises(ValueError, match="cached_views must be a whole number of at least 1"):
        _model("frozen", cached_views=0)  # (was refused only when fit started)
    with pytest.raises(ValueError, match="trainable_stages must be a whole number of stages, got 1.5"):
        _model("partial", trainable_stages=1.5)  # (was "slice indices must be integers" deep inside)
    with pytest.raises(ValueError, match="lr must be > 0"):
        _model("frozen", lr=-1.0)
    with pytest.raises(ValueError, match="class_weights"):
        _model("frozen", class_weights="log")
    # before training, not as a traceback from the loss in the first validation step
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 2"):
        _model("frozen", label_smoothing=2)
    with pytest.raises(ValueError, match=r"class_counts \[5, 5\] must give one count >= 0 per class"):
        ImageClassifier(["a", "b", "c"], backbone=TINY, pretrained=False, mode="frozen", class_counts=[5, 5])


def test_class_weights():
    assert class_weights_from_counts([1, 1], "none") is None
    w = class_weights_from_counts([100, 25], "sqrt")
    assert w[1] / w[0] == pytest.approx(2.0) and w.mean() == pytest.approx(1.0)
    w = class_weights_from_counts([100, 25], "inverse")
    assert w[1] / w[0] == pytest.approx(4.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_val_loss_with_class_weights_does_not_depend_on_the_batch_size(label_smoothing):
    """val/loss is the weighted loss of all val images at once: PyTorch's weighted mean of each
    batch, averaged over batches, moved with the batch size (val images come sorted by class)."""
    model = ImageClassifier(["a", "b", "c"], backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            class_counts=[20, 4, 1], class_weights="inverse", label_smoothing=label_smoothing)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.tensor([0] * 7 + [1] * 3 + [2] * 2)
    losses = []
    for batch_size in (1, 5, 12):
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        result = trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=batch_size), verbose=False)
        losses.append(result[0]["val/loss"])
    model.eval()
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(model(x), y, weight=model.loss_weights,
                                                  label_smoothing=label_smoothing)
    assert model.loss_weights[2] > 10 * model.loss_weights[0]  # (the weights are in use)
    assert losses == pytest.approx([float(whole)] * 3, rel=1e-5)


def test_fit_says_which_loss_weights_the_classes_get(capsys):
    """Without the balanced sampler (an imbalance under 4x, or --data.sampler none) the default
    sqrt weights favour a rare class: fit says so with the weights, as it says when it draws
    classes evenly instead; classes about equally large get no line."""
    model = ImageClassifier(["ok", "dent", "scratch"], backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            class_counts=[90, 30, 10], feature_cache=None)
    model.setup("fit")
    line = next(text for text in capsys.readouterr().out.splitlines() if "loss weights" in text)
    assert "class_weights sqrt" in line and "ok 0.52, dent 0.91, scratch 1.57" in line
    assert "--model.class_weights none" in line
    _model("frozen", feature_cache=None).setup("fit")  # (4, 4, 4)
    assert "loss weights" not in capsys.readouterr().out


def test_compile_is_opt_in_runs_and_keeps_checkpoint_keys(monkeypatch, tmp_path):
    """A real torch.compile wrapper (eager backend: no C++ build in the test) runs the
    forward pass and the checkpoint keys stay those of the plain network."""
    calls, real_compile = [], torch.compile

    def eager_compile(module, **options):
        calls.append(module)
        return real_compile(module, **options, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = _model("frozen")
    compiled = _model("frozen", compile=True)
    compiled.load_state_dict(plain.state_dict())
    plain.setup("validate"), compiled.setup("validate")
    assert calls == [compiled.net]
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), plain(x), atol=1e-5)


def test_compiled_network_keeps_static_shapes_when_the_last_batch_is_smaller(monkeypatch):
    """A small set's last batch is smaller than the others. Dynamo's default then recompiles the
    network for any batch size, and the later full batches run those slower, shape-generic
    kernels too; every graph here is for one batch size."""
    import torch._dynamo

    real_compile, graphs = torch.compile, []

    def record(gm, example_inputs):
        graphs.append([type(t) for t in example_inputs if not isinstance(t, torch.Tensor)]
                      + [type(d) for t in example_inputs if isinstance(t, torch.Tensor) for d in t.shape])
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda module, **options: real_compile(module, **options, backend=record))
    torch._dynamo.reset()
    model = _model("frozen", compile=True)
    model.setup("validate")
    model.eval()
    with torch.no_grad():
        for batch in (4, 2, 4, 3):
            assert model(torch.randn(batch, 3, 32, 32)).shape[0] == batch
    assert len(graphs) == 3 and all(kind is int for graph in graphs for kind in graph)
    torch._dynamo.reset()


def test_compile_without_a_compiler_stops_before_training_with_what_to_do(monkeypatch):
    """Without gcc/clang, torch.compile fails only at the first batch, in a 170-line traceback."""
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    model = _model("frozen", compile=True)
    with pytest.raises(ValueError, match=r"--model.compile true needs a C\+\+ compiler .* leave --model.compile false"):
        model.setup("validate")
    # on a GPU, Triton compiles its launchers with $CC, gcc or clang
    from vision_tl.tasks.classifier import _check_compiler

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match=r"needs a C compiler \(gcc or clang\) for torch.compile's GPU kernels"):
        _check_compiler("cuda")
    monkeypatch.setenv("CC", "/usr/bin/cc")
    _check_compiler("cuda")


def test_gradual_unfreezing_trains_on_and_resumes(tmp_path):
    """A milestone adds a parameter group mid-training: the learning-rate schedule follows it
    (LambdaLR stopped with 'zip() argument 2 is shorter'), and a run resumed after the
    milestone restores the group and its schedule."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vision_tl.tasks.callbacks import GradualUnfreezing

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g))

    def fit(epochs: int, ckpt_path=None) -> ImageClassifier:
        model = _model("frozen", warmup_fraction=0.0)
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, num_sanity_val_steps=0,
                            callbacks=[GradualUnfreezing({1: 2}), ModelCheckpoint(tmp_path, save_last=True)])
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return model

    model = fit(2)
    optimizer = model.trainer.optimizers[0]
    assert [group["name"] for group in optimizer.param_groups] == ["head", "unfrozen@1"]
    scheduler = model.trainer.lr_scheduler_configs[0].scheduler
    added = optimizer.param_groups[1]
    assert added["initial_lr"] == pytest.approx(model.hparams.lr * model.hparams.backbone_lr_factor)
    assert added["lr"] == pytest.approx(added["initial_lr"] * scheduler.factor(scheduler.last_epoch))
    before = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    resumed = fit(3, ckpt_path=tmp_path / "last.ckpt")
    groups = resumed.trainer.optimizers[0].param_groups
    assert len(groups) == 2
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6  # 3 epochs x 2 steps
    # the restored group trains: its parameters were frozen again by the module's mode
    assert all(p.requires_grad for p in groups[1]["params"])
    names = {id(p): n for n, p in resumed.named_parameters()}
    moved = [names[id(p)] for p in groups[1]["params"] if not torch.equal(before[names[id(p)]], p.detach())]
    assert moved, "no unfrozen stage changed in the resumed epoch"


def test_a_stage_unfrozen_mid_schedule_takes_its_first_step_at_the_scheduled_rate(tmp_path):
    """The added group's first step ran at the base rate (x4 the schedule's, or x12 in warm-up):
    one full-size AdamW step for every newly trained weight."""
    from vision_tl.tasks.callbacks import GradualUnfreezing

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g))
    seen = []

    class Rates(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    model = _model("frozen", warmup_fraction=0.0, lr=1e-3, backbone_lr_factor=0.1)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[GradualUnfreezing({1: 2}), Rates()])
    trainer.fit(model, DataLoader(data, batch_size=8))
    first = next(rates for rates in seen if len(rates) == 2)  # the added group's first step
    assert first[1] == pytest.approx(first[0] * 0.1) and first[0] < 1e-3


def test_gradual_unfreezing_is_refused_under_ddp():
    """Parameters unfrozen after DDP wrapped the model are not synchronised between processes."""
    from types import SimpleNamespace

    from vision_tl.tasks.callbacks import GradualUnfreezing

    with pytest.raises(ValueError, match="GradualUnfreezing cannot run with 2 processes"):
        GradualUnfreezing({1: 2}).setup(SimpleNamespace(world_size=2), _model("frozen"), "fit")


@pytest.mark.parametrize("milestones,message", [
    ({2: 0}, r"\{2: 0\}: 0 stages; give 1 to \d+, the number of last stages of EfficientNet"),
    ({5: 2}, r"\{5: 2\}: epoch 5 never comes \(this fit trains epochs 0\.\.2\)"),
    ({-1: 2}, r"epoch -1 never comes"),
])
def test_gradual_unfreezing_refuses_milestones_that_cannot_work_before_training(milestones, message):
    """They failed after epochs of training, naming trainable_stages, or never fired at all."""
    from types import SimpleNamespace

    from vision_tl.tasks.callbacks import GradualUnfreezing

    with pytest.raises(ValueError, match=message):
        GradualUnfreezing(milestones).setup(SimpleNamespace(world_size=1, max_epochs=3), _model("frozen"), "fit")
    GradualUnfreezing({1: 99})._check_milestones(_model("frozen").net.backbone, 3)  # more than it has: all of it


def test_an_interruption_before_the_first_checkpoint_says_to_start_again(tmp_path, capsys):
    from types import SimpleNamespace

    from vision_tl.tasks.resume import ResumableRandomState

    callback = ResumableRandomState()
    callback.setup(SimpleNamespace(log_dir=str(tmp_path)), None, "fit")
    fit = SimpleNamespace(is_global_zero=True, fast_dev_run=False, state=SimpleNamespace(fn="fit"))
    callback.on_exception(fit, None, KeyboardInterrupt())
    out = capsys.readouterr().out
    assert "before the first epoch's checkpoint was written, so there is nothing to resume" in out
    assert "start again by running the same command" in out and "--ckpt_path" not in out
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    callback.on_exception(fit, None, KeyboardInterrupt())
    assert f"--ckpt_path {tmp_path / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    predict = SimpleNamespace(is_global_zero=True, fast_dev_run=False, state=SimpleNamespace(fn="predict"))
    callback.on_exception(predict, None, KeyboardInterrupt())  # not a training run: nothing to resume
    out = capsys.readouterr().out
    assert "run the same command again" in out and "resume" not in out
    # an error is not an interruption: running again helps only once its cause is put right
    callback.on_exception(fit, None, PermissionError(13, "Permission denied"))
    out = capsys.readouterr().out
    assert "stopped by an error (PermissionError, below)" in out and "once its cause is fixed" in out
    assert "interrupted" not in out


def test_the_resume_advice_quotes_paths_and_falls_back_to_best(tmp_path, capsys):
    """A path with a space printed unquoted could not be pasted; stopped while the first last.ckpt
    was written, best.ckpt (already there) is the resume point, not 'nothing to resume'."""
    import shlex
    from types import SimpleNamespace

    from vision_tl.tasks.resume import ResumableRandomState

    run = tmp_path / "my runs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    callback = ResumableRandomState()
    callback.setup(SimpleNamespace(log_dir=str(run)), None, "fit")
    callback.on_exception(SimpleNamespace(is_global_zero=True, fast_dev_run=False, state=SimpleNamespace(fn="fit")), None,
                          KeyboardInterrupt())
    out = capsys.readouterr().out
    command = out[out.index("vision-tl fit"):].strip()
    assert shlex.split(command)[-4:] == ["--config", str(run / "config.yaml"), "--ckpt_path",
                                         str(run / "checkpoints" / "best.ckpt")]


def test_a_resume_with_more_epochs_stretches_the_schedule_instead_of_training_at_lr_0(capsys):
    """The advice for a finished run is 'pass a larger --trainer.max_epochs'; the restored
    scheduler must then follow the new length, not the saved one (which is over: lr 0)."""
    from vision_tl.tasks.classifier import WarmupCosine

    def scheduler(total: int) -> WarmupCosine:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return WarmupCosine(optimizer, total, warmup=2)

    finished = scheduler(10)
    for _ in range(10):
        finished.optimizer.step()
        finished.step()
    assert finished.optimizer.param_groups[0]["lr"] == 0.0
    longer = scheduler(20)
    longer.load_state_dict(finished.state_dict())
    assert longer.total == 20 and longer.last_epoch == 10
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * longer.factor(10)) and longer.factor(10) > 0.4
    assert "decays to 0 at step 20 (it was 10)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="would end at step 8 .* at or before the 10 steps"):
        scheduler(8).load_state_dict(finished.state_dict())  # e.g. a larger batch: fewer steps per epoch
    half = scheduler(10)  # an interrupted run resumed as it was: the same rates as never stopped
    for _ in range(5):
        half.optimizer.step()
        half.step()
    same = scheduler(10)
    same.load_state_dict(half.state_dict())
    for _ in range(5):
        assert half.optimizer.param_groups[0]["lr"] == same.optimizer.param_groups[0]["lr"]
        for run in (half, same):
            run.optimizer.step()
            run.step()


def test_gradual_unfreezing_in_frozen_mode_trains_the_backbone_despite_the_feature_cache(
        inspection_folder, tmp_path, capsys):
    """Frozen mode trains the head on cached features by default; the stages a milestone
    unfreezes would then never run in training. With GradualUnfreezing the cache is not used."""
    from vision_tl.data import ImageFolderDataModule
    from vision_tl.tasks.callbacks import GradualUnfreezing

    data = ImageFolderDataModule(inspection_folder, backbone=TINY, image_size=32, batch_size=8, num_workers=0,
                                 augment="none")
    model = ImageClassifier(data.classes, backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            feature_cache=str(tmp_path / "cache"), warmup_fraction=0.0)
    before = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[GradualUnfreezing({1: 2, 2: 1})])
    trainer.fit(model, datamodule=data)
    out = capsys.readouterr().out
    assert "feature_cache is not used" in out
    assert "epoch 2: the last 1 stage(s) train already" in out  # {2: 1} after {1: 2} adds nothing
    after = model.net.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


def test_a_frozen_fit_stopped_by_an_error_leaves_no_features_for_the_next_model(inspection_folder, tmp_path):
    """A frozen fit that stopped (Ctrl-C in a notebook) never reached teardown: the data module
    kept serving cached features, and the next model, in full mode, trained its head only."""
    from vision_tl.data import ImageFolderDataModule

    class Stop(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            raise KeyboardInterrupt

    data = ImageFolderDataModule(inspection_folder, backbone=TINY, image_size=32, batch_size=8, num_workers=0,
                                 augment="none")
    frozen = ImageClassifier(data.classes, backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                             feature_cache=str(tmp_path / "cache"))
    settings = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    with contextlib.suppress(BaseException):
        L.Trainer(**settings, callbacks=[Stop()]).fit(frozen, datamodule=data)
    full = ImageClassifier(data.classes, backbone=TINY, pretrained=False, image_size=32, mode="full",
                           warmup_fraction=0.0)
    seen = []
    real = full.training_step
    full.training_step = lambda batch, batch_idx: seen.append(batch[0].ndim) or real(batch, batch_idx)
    before = {k: v.clone() for k, v in full.net.backbone.state_dict().items()}
    L.Trainer(**settings).fit(full, datamodule=data)
    assert set(seen) == {4}  # image batches, not [N, F] features
    after = full.net.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


@pytest.mark.parametrize(("classes", "good", "message"), [
    ("crack,good", None, "must be a list of class names"),  # not 10 classes named by its letters
    (["good", "good"], None, "name 'good' twice"),
    (["crack", "good"], "Good", "good_class 'Good' is not one of the classes"),
])
def test_classifier_refuses_classes_it_could_not_train_on(classes, good, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(classes, backbone=TINY, pretrained=False, image_size=32, good_class=good)


def test_partial_vit_freezes_its_tokens_with_the_stem_and_full_unfreezing_returns_them():
    model = ImageClassifier(["a", "b"], backbone="test_vit", mode="partial", pretrained=False, trainable_stages=2)
    vit = model.net.backbone
    assert not vit.cls_token.requires_grad and not vit.pos_embed.requires_grad  # they feed the frozen stem
    newly = unfreeze_stages(model.net, 99)
    assert any(p is vit.cls_token for p in newly) and any(p is vit.pos_embed for p in newly)
    assert all(p.requires_grad for p in vit.parameters())


def test_a_partial_vit_checkpoint_that_trained_its_tokens_keeps_training_them_when_resumed():
    """Checkpoints of earlier versions trained cls_token and pos_embed in partial mode: their
    optimizer state has two parameters more, and a resume must fit it."""
    model = ImageClassifier(["a", "b"], backbone="test_vit", mode="partial", pretrained=False, trainable_stages=2)
    trainable = sum(p.requires_grad for p in model.parameters())
    older = {"optimizer_states": [{"param_groups": [{"params": list(range(trainable + 2))}]}]}
    with pytest.warns(UserWarning, match="keep training in this resumed run") as caught:
        model._train_what_the_checkpoint_trained(older)
    assert model.net.backbone.cls_token.requires_grad and model.net.backbone.pos_embed.requires_grad
    now = sum(p.numel() for p in model.parameters() if p.requires_grad)  # setup's line counted before
    assert f"({now:,} of " in str(caught[0].message)
    again = ImageClassifier(["a", "b"], backbone="test_vit", mode="partial", pretrained=False, trainable_stages=2)
    again._train_what_the_checkpoint_trained({"optimizer_states": [{"param_groups": [{"params": list(range(trainable))}]}]})
    assert not again.net.backbone.cls_token.requires_grad  # a checkpoint of this version: as it is


def test_a_threshold_target_takes_its_good_class_from_the_data_module(inspection_folder, tmp_path):
    """The README: a good_class given to only one of model and data module is taken by both; a
    model with a threshold target refused to be built without its own."""
    from vision_tl.data import ImageFolderDataModule

    data = ImageFolderDataModule(inspection_folder, backbone=TINY, image_size=32, batch_size=8, num_workers=0,
                                 good_class="good")
    model = ImageClassifier(data.classes, backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            threshold_target="false_reject:0.5", feature_cache=None)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(model, datamodule=data)
    assert model.hparams.good_class == "good" and 0.0 <= model.threshold <= 1.0
    alone = ImageClassifier(data.classes, backbone=TINY, pretrained=False, image_size=32,
                            threshold_target="false_reject:0.5")
    with pytest.raises(ValueError, match="needs a good class"):
        alone.setup("fit")
    with pytest.raises(ValueError, match=r"got a tensor of shape 3x32x32; for one image pass x\[None\]"):
        model(torch.zeros(3, 32, 32))


def test_partial_runs_that_trained_all_stages_as_counted_before_the_final_norm_joined_the_last_still_load():
    """ConvNeXt had 6 stages while its final norm was one of its own (now 5): a run made then with
    trainable_stages=6 trained all of them; it must still build (load_classifier, resume), as all."""
    def model(stages):
        return ImageClassifier(["a", "b"], backbone="test_convnext", pretrained=False, image_size=32,
                               mode="partial", trainable_stages=stages, class_counts=[2, 2])

    assert len(backbone_stages(model(1).net.backbone)) == 5
    everything = model(5)
    assert count_trainable(model(6)) == count_trainable(everything)
    assert not everything.net.frozen_modules
    with pytest.raises(ValueError, match="between 1 and 5"):
        model(7)


def test_a_gradual_unfreezing_run_from_before_the_final_norm_joined_the_last_stage_resumes_training_what_it_did(
        tmp_path, monkeypatch):
    """ConvNeXt's final norm was a stage of its own: milestone {1: 2} unfroze the last real stage
    and that norm. Resumed after the milestone, the new count unfroze one more stage, which no
    restored optimizer group holds: it never trained, and its BatchNorm statistics moved."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import vision_tl.backbones._stages as stages_module
    from vision_tl.tasks.callbacks import GradualUnfreezing

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))

    def fit(epochs: int, ckpt_path=None) -> ImageClassifier:
        model = ImageClassifier(["a", "b", "c"], backbone="test_convnext", pretrained=False, image_size=32,
                                mode="frozen", class_counts=[4, 4, 4])
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, num_sanity_val_steps=0,
                            callbacks=[GradualUnfreezing({1: 2}), ModelCheckpoint(tmp_path, save_last=True)])
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return model

    with monkeypatch.context() as old_grouping:
        old_grouping.setattr(stages_module, "_matched", lambda matcher, name: True)  # the norm a stage apart
        fit(2)
    with pytest.warns(UserWarning, match="counts the stages"):
        resumed = fit(3, ckpt_path=tmp_path / "last.ckpt")
    held = {id(p) for group in resumed.trainer.optimizers[0].param_groups for p in group["params"]}
    trains = {id(p) for p in resumed.parameters() if p.requires_grad}
    assert trains == held
    stages = backbone_stages(resumed.net.backbone)
    assert all(not m.training for m in stages[-2]) and any(m.training for m in stages[-1])


@pytest.mark.parametrize(("name", "value"), [("lr", "1e-3"), ("weight_decay", None), ("warmup_fraction", "0.1")])
def test_a_classifier_number_given_as_a_string_or_none_is_named(name, value):
    """lr='1e-3' (a YAML 1e-3 without a dot reads as a string) failed with "'<=' not supported
    between instances of 'str' and 'int'", naming no argument."""
    with pytest.raises(ValueError, match=rf"^{name} must be a number, got {value!r}"):
        ImageClassifier(["good", "scratch"], backbone=TINY, pretrained=False, **{name: value})


@pytest.mark.parametrize("switch", [True, "true", "yes"])
def test_a_feature_cache_switch_is_refused_with_what_it_takes(switch):
    """feature_cache=True (decoded_cache takes true) failed in pathlib once training had begun;
    "true" made a cache folder named true in the working directory."""
    with pytest.raises(ValueError, match=r"feature_cache .*: give 'auto' \(the default cache folder\), a folder"):
        ImageClassifier(["good", "scratch"], backbone=TINY, pretrained=False, mode="frozen", feature_cache=switch)
    ImageClassifier(["good", "scratch"], backbone=TINY, pretrained=False, mode="frozen", feature_cache="auto")


def test_a_data_module_given_as_classes_says_to_pass_its_classes(inspection_folder):
    """ImageClassifier(data, ...) failed with "'ImageFolderDataModule' object is not iterable"."""
    from vision_tl.data import ImageFolderDataModule

    data = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0)
    with pytest.raises(ValueError, match=r"classes must be a list of class names.*ImageClassifier\(datamodule.classes"):
        ImageClassifier(data, backbone=TINY, pretrained=False)
    with pytest.raises(ValueError, match=r"classes must be a list of class names"):
        ImageClassifier((c for c in data.classes), backbone=TINY, pretrained=False)
    model = ImageClassifier(np.array(data.classes), backbone=TINY, pretrained=False)  # e.g. a column's unique()
    assert model.classes == data.classes and all(type(c) is str for c in model.hparams.classes)


def test_the_eval_mode_warning_is_silenced_for_the_kits_model_only(tmp_path):
    """Frozen stages stay in eval mode on purpose, so Lightning's "Found N module(s) in eval mode"
    is noise for the kit's model; it was silenced by a warnings filter that importing the kit put
    in place for the whole process, which hid it for a user's own models in the same notebook."""
    import warnings

    import vision_tl.tasks.lightning_cli  # noqa: F401 - (importing the command line too adds nothing)

    message = "Found 3 module(s) in eval mode at the start of training."
    assert not any(action == "ignore" and pattern is not None and pattern.match(message)
                   for action, pattern, *_ in warnings.filters)

    class Users(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.frozen = nn.Linear(3, 3), nn.BatchNorm1d(3).eval()

        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def eval_mode_warnings(model) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(model, ImageClassifier):
                _fit_one_epoch(model, tmp_path)
            else:
                L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path).fit(
                    model, DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2))
        return [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]

    assert not eval_mode_warnings(_model("partial", trainable_stages=1))
    assert eval_mode_warnings(Users())


def test_validating_a_checkpoint_records_the_checkpoints_epoch(tmp_path):
    """`vision-tl validate` / `test` of a checkpoint from epoch 1 recorded "epoch": 0 in
    metrics.json (their trainer counts from 0 again), so compare and the figures named the wrong epoch."""
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)),
                      batch_size=4)
    model = _model("frozen")
    L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).fit(model, data, data)
    assert model.eval_results["val"]["epoch"] == 1
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    fresh = _model("frozen")
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).validate(fresh, data, ckpt_path=ckpt)
    assert fresh.eval_results["val"]["epoch"] == 1
