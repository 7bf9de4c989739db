"""The frozen backbone on a GPU: replayed as a CUDA graph, with the eager backbone's outputs.

Most of these need a GPU and skip without one; the CPU side (the switches, eager fallback) runs everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vision_tl.backbones import GraphedInference
from vision_tl.tasks import ImageClassifier

TINY = "test_efficientnet"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _frozen(**kwargs) -> ImageClassifier:
    model = ImageClassifier(["a", "b", "c"], backbone=TINY, image_size=32, mode="frozen", pretrained=False,
                            dropout=0.0, feature_cache=None, **kwargs)
    with torch.no_grad():  # statistics away from their defaults, so folding has work to do
        for m in model.net.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.3)
    return model


def _batch_norm_calls(model: ImageClassifier, x: torch.Tensor) -> int:
    calls = []
    real = F.batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "batch_norm", counting)
        with torch.no_grad():
            model(x)
    return len(calls)


def test_fold_batchnorm_false_runs_the_backbone_as_it_is_with_the_same_logits():
    x = torch.randn(4, 3, 32, 32)
    folded, plain = _frozen().eval(), _frozen(fold_batchnorm=False).eval()
    plain.load_state_dict(folded.state_dict())
    model_out = folded(x)  # builds the folded copy
    assert _batch_norm_calls(folded, x) == 0
    assert _batch_norm_calls(plain, x) > 0
    assert torch.allclose(plain(x), model_out, rtol=1e-4, atol=1e-5)
    plain.train()
    logits = plain(x)  # frozen training: the head trains, the backbone records no gradient
    logits.sum().backward()
    assert all(p.grad is not None for p in plain.net.head.parameters())
    assert all(p.grad is None for p in plain.net.backbone.parameters())


def test_partial_mode_with_fold_batchnorm_false_runs_its_frozen_stages_unfolded():
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False,
                            fold_batchnorm=False).train()
    model(torch.randn(2, 3, 32, 32))
    assert "_folded_stages_by" not in model.__dict__


def test_graphed_inference_runs_cpu_tensors_and_gradients_eagerly_and_records_nothing():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    graphs = GraphedInference()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(graphs(net, x), net(x))
    assert torch.equal(graphs(net, x), net(x))  # gradients on: eager
    assert not graphs._graphs


@cuda
def test_the_graph_matches_eager_and_follows_weights_changed_in_place_or_replaced():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).cuda().eval()
    graphs = GraphedInference()
    x = torch.randn(5, 3, 16, 16, device="cuda")
    with torch.no_grad():
        assert torch.allclose(graphs(net, x, version=0), net(x), atol=1e-6)
        assert len(graphs._graphs) == 1 and next(iter(graphs._graphs.values())) is not None
        net[0].weight.mul_(2.0)  # in place: the same graph replays the new values
        assert torch.allclose(graphs(net, x, version=1), net(x), atol=1e-6)
        recorded = next(iter(graphs._graphs.values()))
        net[0].weight.data = net[0].weight.data.clone() * 0.5  # other addresses: recorded again
        assert torch.allclose(graphs(net, x, version=2), net(x), atol=1e-6)
        assert next(iter(graphs._graphs.values())) is not recorded
        out = graphs(net, x, version=2)
        graphs(net, x * 3, version=2)
        assert torch.allclose(out, net(x), atol=1e-6)  # outputs are copies, not the graph's buffers


@cuda
def test_recordings_share_one_capture_stream_and_an_expanded_input_is_recorded_too():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).cuda().eval()
    graphs = GraphedInference()
    with torch.no_grad():
        for n in (5, 3):
            x = torch.randn(n, 3, 16, 16, device="cuda")
            assert torch.allclose(graphs(net, x, version=0), net(x), atol=1e-6)
        assert len(graphs._streams) == 1  # the pool's blocks can be reused from one recording to the next
        x = torch.randn(1, 3, 16, 16, device="cuda").expand(4, -1, -1, -1)  # stride 0
        assert torch.allclose(graphs(net, x, version=0), net(x), atol=1e-6)
    assert len(graphs._graphs) == 3 and all(v is not None for v in graphs._graphs.values())


@cuda
def test_frozen_classifier_on_a_gpu_replays_a_graph_with_eager_logits_and_frees_it_at_teardown():
    model = _frozen(fold_batchnorm=False).cuda().eval()  # graph against eager, both unfolded
    x = torch.randn(6, 3, 32, 32, device="cuda")
    with torch.no_grad():
        graphed = model(x)
        assert model.__dict__["_graphed_backbone"]._graphs
        eager = model.net(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(graphed, eager, rtol=1e-5, atol=1e-6)
        model.hparams.cuda_graphs = False
        assert torch.allclose(model(x), eager, rtol=1e-5, atol=1e-6)
        assert "_graphed_backbone" not in model.__dict__  # switched off: their memory freed
        model.hparams.cuda_graphs = True
        model(x)
    assert model.__dict__["_graphed_backbone"]._graphs
    model.teardown("fit")
    assert "_graphed_backbone" not in model.__dict__


@cuda
def test_partial_mode_on_a_gpu_records_no_graph():
    model = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    model.train()(x)
    with torch.no_grad():
        model.eval()(x)
    assert "_graphed_backbone" not in model.__dict__


def test_graphs_are_for_frozen_mode_only():
    frozen = _frozen()
    partial = ImageClassifier(["a", "b"], backbone=TINY, image_size=32, mode="partial", pretrained=False)
    assert frozen._cuda_graphs() and not partial._cuda_graphs()
    assert not _frozen(cuda_graphs=False)._cuda_graphs()


def _hooked_gradient(model: ImageClassifier) -> torch.Tensor | None:
    """A hook that makes a block's output a leaf to read its gradient (feature attribution)."""
    seen = []

    def hook(module, args, out):
        out = out.detach().requires_grad_(True)
        seen.append(out)
        return out
    handle = model.net.backbone.blocks[-1].register_forward_hook(hook)
    try:
        model(torch.randn(4, 3, 32, 32, device=model.device)).sum().backward()
    finally:
        handle.remove()
    return seen[0].grad


@pytest.mark.parametrize("fold", [None, False])
def test_frozen_training_with_a_hook_on_the_backbone_keeps_its_gradient(fold):
    model = _frozen(fold_batchnorm=fold).train()
    assert _hooked_gradient(model) is not None


@cuda
def test_frozen_training_on_a_gpu_with_a_hook_on_the_backbone_keeps_its_gradient():
    model = _frozen().cuda().train()
    assert _hooked_gradient(model) is not None


@cuda
def test_a_graph_recorded_in_inference_mode_replays_in_a_training_step():
    model = _frozen().cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.inference_mode():  # Lightning's validation
        expected = model.eval()(x).clone()
    logits = model.train()(x)  # the same shape: the graph recorded above
    logits.sum().backward()
    assert torch.allclose(logits.detach(), expected, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.net.head.parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_graph_on_a_gpu_that_is_not_the_current_one_gives_each_batch_its_own_output():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to("cuda:1").eval()
    graphs = GraphedInference()
    with torch.cuda.device(0), torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 16, 16, device="cuda:1")
            assert torch.allclose(graphs(net, x), net(x), atol=1e-6)


def test_a_model_holding_graphs_can_be_deep_copied_and_pickled():
    import copy
    import pickle

    model = _frozen()
    graphs = model.__dict__["_graphed_backbone"] = GraphedInference(max_graphs=3)
    graphs._graphs[("shape",)] = None
    twin = copy.deepcopy(model)
    assert twin.__dict__["_graphed_backbone"] is not graphs and not twin.__dict__["_graphed_backbone"]._graphs
    again = pickle.loads(pickle.dumps(graphs))
    assert again.max_graphs == 3 and not again._graphs


# --- extraction (FeatureExtractor): normalisation and the backbone replayed as one graph ---

def _extractor(stages: str = "pooled", **kwargs):
    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.features.extractor import FeatureExtractor

    net = create_backbone(TINY, pretrained=False, img_size=32)
    return FeatureExtractor(net, TINY, resolve_preprocessing(TINY, 32), stages, **kwargs)


def test_an_extractor_leaves_its_model_in_the_mode_it_was_given():
    fx = _extractor()
    fx.model.train()
    fx.embed(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert fx.model.training  # neither building the extractor nor embedding switched it to eval


def test_extraction_on_a_cpu_records_no_graph():
    fx = _extractor()
    fx.embed(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert not fx._graphs._graphs and not fx._graphs._seen


@cuda
def test_graphs_record_a_shape_on_its_second_call_with_record_after():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).cuda().eval()
    graphs = GraphedInference(record_after=1)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        assert torch.allclose(graphs(net, x), net(x), atol=1e-6)
        assert not graphs._graphs  # once: eager
        assert torch.allclose(graphs(net, x), net(x), atol=1e-6)
        assert len(graphs._graphs) == 1 and not graphs._seen


@cuda
@pytest.mark.parametrize("stages", ["pooled", "1,3,pooled"])
def test_extraction_on_a_gpu_through_graphs_equals_the_unfolded_eager_model(stages):
    from vision_tl.features.extractor import warm_up

    graphed, eager = _extractor(stages), _extractor(stages, cuda_graphs=False, fold_batchnorm=False)
    eager.model.load_state_dict(graphed.model.state_dict())
    for fx in (graphed, eager):
        fx.model.cuda()
    device = torch.device("cuda")
    warm_up(graphed, 4, device)
    assert len(graphed._graphs._graphs) == 1  # recorded while the first batch decodes
    for n in (4, 4, 3):  # the last, smaller batch: eager once
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(graphed.embed(x), eager.embed(x), rtol=1e-5, atol=1e-6)  # the same kernels
    assert len(graphed._graphs._graphs) == 1
    graphed.model.blocks[-1].register_forward_hook(lambda m, a, out: out * 0)  # hooks run: eager
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device=device)
    assert not torch.equal(graphed.embed(x), eager.embed(x))
    graphed.release_graphs()
    assert not graphed._graphs._graphs


@cuda
def test_a_folded_backbone_can_be_replayed_too():
    folded = _extractor(fold_batchnorm=True)
    eager = _extractor(cuda_graphs=False, fold_batchnorm=False)
    eager.model.load_state_dict(folded.model.state_dict())
    for fx in (folded, eager):
        fx.model.cuda()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        assert torch.allclose(folded.embed(x), eager.embed(x), rtol=1e-4, atol=1e-4)
    assert folded._graphed.model is not folded.model and len(folded._graphs._graphs) == 1


def test_fold_batchnorm_false_extracts_through_the_model_as_it_is():
    fx = _extractor(fold_batchnorm=False)
    with torch.no_grad():
        for m in fx.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    calls = []
    real = F.batch_norm
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
        unfolded = fx.embed(x)
        fx.fold_batchnorm = None
        calls_unfolded = len(calls)
        fx.embed(x)  # builds the folded copy, checking it against the model
        calls_built = len(calls)
        folded = fx.embed(x)
    assert calls_unfolded > 0 and len(calls) == calls_built  # the default folds on a CPU
    assert torch.allclose(unfolded, folded, rtol=1e-4, atol=1e-5)


@cuda
def test_an_extraction_pass_replays_a_graph_and_frees_it_when_done(tmp_path):
    from PIL import Image

    from vision_tl.features.extractor import iter_embeddings

    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()).save(paths[-1])
    graphed, eager = _extractor(), _extractor(cuda_graphs=False, fold_batchnorm=False)
    eager.model.load_state_dict(graphed.model.state_dict())
    recorded = []
    rows = {}
    for fx in (graphed, eager):
        fx.model.cuda()
        rows[fx.cuda_graphs] = []
        for batch in iter_embeddings(fx, paths, 3, 2, "cuda", progress=False):  # batches of 3, 3 and 1
            rows[fx.cuda_graphs].append(batch.features)
            recorded.append(len(fx._graphs._graphs))
    assert max(recorded) == 1 and not graphed._graphs._graphs and graphed.cuda_graphs
    assert np.allclose(np.concatenate(rows[True]), np.concatenate(rows[False]), rtol=1e-5, atol=1e-6)


def test_a_pass_of_one_batch_leaves_the_extractor_as_it_was(tmp_path):
    from PIL import Image

    from vision_tl.features.extractor import iter_embeddings

    path = tmp_path / "a.jpg"
    Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()).save(path)
    fx = _extractor()
    (batch,) = iter_embeddings(fx, [path], 4, 0, "cpu", progress=False)
    assert batch.features.shape == (1, fx.num_features) and fx.cuda_graphs and not fx._graphs._graphs


# --- partial mode: the frozen stem and stages as one chain (partial_cuda_graph) ---

def _partial(**kwargs) -> ImageClassifier:
    return ImageClassifier(["a", "b", "c"], backbone=TINY, image_size=32, mode="partial", pretrained=False,
                           dropout=0.0, **kwargs)


def test_the_frozen_stages_as_one_chain_give_the_same_logits_and_gradients():
    from vision_tl.backbones import GraphedChain, swapped_in

    model, twin = _partial(), _partial()
    twin.load_state_dict(model.state_dict())
    model.train()
    twin.train()
    modes = [m.training for m in model.net.modules()]
    x = torch.randn(4, 3, 32, 32)
    stages = model._folded_stages(x, fold=False)
    swap = model._chained(stages, x)  # on a CPU the chain runs eagerly: the swap itself is what is tested
    assert [m.training for m in model.net.modules()] == modes  # the check put every mode back
    assert isinstance(swap[next(iter(stages))], GraphedChain)
    assert all(isinstance(swap[name], nn.Identity) for name in list(stages)[1:])
    with swapped_in(model.net.backbone, swap):
        chained = model.net(x)
    plain = twin.net(x)
    assert torch.allclose(chained, plain, rtol=1e-5, atol=1e-6)
    chained.sum().backward()
    plain.sum().backward()
    trained = [(n, p) for n, p in model.net.named_parameters() if p.requires_grad]
    assert trained and all(torch.allclose(p.grad, twin.net.get_parameter(n).grad, rtol=1e-4, atol=1e-6)
                           for n, p in trained)
    assert all(p.grad is None for p in model.net.parameters() if not p.requires_grad)


def test_stages_that_do_not_run_as_a_chain_are_left_as_they_are():
    model = _partial().train()
    x = torch.randn(2, 3, 32, 32)
    stages = model._folded_stages(x, fold=False)
    backwards = dict(reversed(list(stages.items())))  # the chain would run them in the wrong order
    with pytest.warns(UserWarning, match="do not run as one chain"):
        assert model._chained(backwards, x) is backwards


def test_partial_cuda_graph_is_for_gpus_only():
    model = _partial(partial_cuda_graph=True).train()
    model(torch.randn(2, 3, 32, 32))
    assert "_graphed_chain" not in model.__dict__  # a CPU folds the frozen stages instead
    assert "_folded_stages_by" in model.__dict__


@cuda
def test_partial_training_through_the_graphed_chain_matches_eager_on_a_gpu():
    graphed = _partial(partial_cuda_graph=True).cuda().train()
    eager = _partial(fold_batchnorm=False).cuda().train()
    eager.load_state_dict(graphed.state_dict())
    for step in range(3):  # the chain records on its second call
        x = torch.randn(4, 3, 32, 32, device="cuda", generator=None)
        a, b = graphed(x), eager(x)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), step
        a.sum().backward()
        b.sum().backward()
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            if p.requires_grad:
                assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name
    chain = graphed.__dict__["_graphed_chain"][2]
    assert chain.graphs._graphs  # recorded
    graphed.teardown("fit")
    assert "_graphed_chain" not in graphed.__dict__ and not chain.graphs._graphs


def test_the_chain_is_freed_once_no_stage_stays_frozen():
    from vision_tl.models.finetuning import unfreeze_stages

    model = _partial().train()
    x = torch.randn(2, 3, 32, 32)
    model._chained(model._folded_stages(x, fold=False), x)
    assert "_graphed_chain" in model.__dict__
    unfreeze_stages(model.net, 99)  # the whole backbone trains now (full fine-tuning)
    model(x)
    assert "_graphed_chain" not in model.__dict__


def test_the_chain_replays_in_a_training_step_where_only_its_containers_are_in_train_mode():
    """partial mode freezes the layers that hold weights; the blocks around them and their
    activations keep the train flag, which changes nothing they compute: the chain still goes to
    its graphs (on a GPU), and runs eagerly only where a layer would act as in training."""
    from vision_tl.backbones import GraphedChain

    model = _partial().train()
    x = torch.randn(2, 3, 32, 32)
    stages = model._folded_stages(x, fold=False)
    chain = GraphedChain(list(stages.values()))
    assert any(m.training for m in chain.chain.modules() if m is not chain.chain)  # the blocks' flags
    replayed = []

    def graphs(module, inputs, version=None):
        replayed.append(inputs.shape)
        return module(inputs)

    chain.graphs = graphs
    chain(x)
    assert replayed == [x.shape]
    for acting in (nn.Dropout(0.2), nn.BatchNorm2d(3)):  # would draw, would update its statistics
        replayed.clear()
        odd = GraphedChain([acting.train()])
        odd.graphs = graphs
        odd(torch.randn(2, 3, 4, 4))
        assert not replayed
    quiet = GraphedChain([nn.Sequential(nn.ReLU(), nn.Dropout(0.0)).train()])
    quiet.graphs = graphs
    quiet(torch.randn(2, 3, 4, 4))
    assert replayed
