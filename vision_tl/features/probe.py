"""Quick probes: how well do a backbone's frozen features separate the classes?

Heads come from scikit-learn (logistic regression, k-nearest neighbours, PCA):
well-tested solvers with the cross-validation splitters we need, a better use of
this package's lines than a hand-written LBFGS. Features come from the
:class:`FeatureCache`, so probing a second time costs seconds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_tl.reports.plots import literal_text

HEADS = ("logreg", "knn", "logreg-l2")


@dataclass
class Score:
    """Mean and standard deviation of accuracy and balanced accuracy over folds or draws."""

    acc: float
    acc_std: float
    balanced: float
    balanced_std: float

    @classmethod
    def of(cls, accs: list[float], bals: list[float]) -> Score:
        return cls(float(np.mean(accs)), float(np.std(accs)), float(np.mean(bals)), float(np.std(bals)))


@dataclass
class ProbeResult:
    """One backbone x head row of the probe table."""

    backbone: str
    head: str
    stages: str
    num_features: int
    images_per_second: float
    cv: Score | None = None
    few_shot: dict[int, Score] = field(default_factory=dict)


def make_head(name: str, n_train_per_class: int | None = None):
    """A scikit-learn classifier: ``logreg`` (standardised features, L2-regularised
    logistic regression), ``logreg-l2`` (L2-normalised then standardised, tuned for
    few shots), or ``knn`` (cosine k-nearest neighbours, k <= shots). The logistic heads
    weight the classes by inverse frequency, as ``fit`` balances an imbalanced folder: a rare
    defect class counts as much as the good one (on balanced data this changes nothing)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced"))
    if name == "logreg-l2":
        return make_pipeline(Normalizer(), StandardScaler(),
                             LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))
    if name == "knn":
        k = 5 if n_train_per_class is None else max(1, min(5, n_train_per_class))
        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k, weights="distance"))
    raise ValueError(f"unknown head {name!r}; expected one of: {', '.join(HEADS)}")


def _fit_score(head: str, x_train, y_train, x_test, y_test, per_class: int | None = None) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if head == "knn":  # k never above the training rows (a fold of a tiny set has fewer than 5)
        per_class = min(per_class or 5, len(x_train))
    model = make_head(head, per_class).fit(x_train, y_train)
    pred = model.predict(x_test)
    return float(accuracy_score(y_test, pred)), float(balanced_accuracy_score(y_test, pred))


def _train_rows(features: np.ndarray, idx: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training rows; ``features`` of shape ``[N, K, F]`` contributes every view of each image."""
    if features.ndim == 2:
        return features[idx], labels[idx]
    views = features.shape[1]
    return features[idx].reshape(-1, features.shape[2]), np.repeat(labels[idx], views)


def _test_rows(features: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return features[idx] if features.ndim == 2 else features[idx, 0]  # view 0 is the clean image


def _has_copies(groups: np.ndarray | None) -> bool:
    return groups is not None and len(np.unique(groups)) < len(groups)


def distinct_per_class(labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Distinct images per class present: byte-identical copies (one ``groups`` value) count once,
    as folds and draws keep them together."""
    labels = np.asarray(labels)
    if groups is None:
        counts = np.bincount(labels)
    else:
        pairs = {(int(y), g) for y, g in zip(labels, np.asarray(groups))}
        counts = np.bincount([y for y, _ in pairs], minlength=int(labels.max(initial=-1)) + 1)
    return counts[counts > 0]


def _warn_classes_left_without_images(labels: np.ndarray, classes: Sequence[str]) -> None:
    """A class whose every image was left out as unreadable (``--skip-bad``) is not scored: say
    so by name, since the accuracies then cover the other classes only."""
    gone = [name for k, name in enumerate(classes) if not np.any(labels == k)]
    if gone:
        warnings.warn(f"no readable image in class {', '.join(map(repr, gone))}: the probe scores the other "
                      f"{len(classes) - len(gone)} classes only (their accuracy and balanced accuracy leave "
                      f"{'it' if len(gone) == 1 else 'them'} out)", stacklevel=3)


def check_folds_and_shots(labels: np.ndarray, groups: np.ndarray | None, folds: int, shots=(),
                          classes: Sequence[str] | None = None, paths: Sequence | None = None) -> None:
    """Raise ValueError (naming the option and the classes short of images) when a class has too
    few distinct images for ``folds``-fold cross-validation or for a ``shots``-shot draw with an
    image left to test, or when one image (byte-identical copies: the same ``groups`` value) is
    labelled with two classes, or when fewer than two classes have images (every image of the
    others left out as unreadable). ``classes`` and ``paths`` name them in the message."""
    _check_copies_agree(labels, groups, classes, paths)
    present = np.unique(labels)
    if len(present) < 2:  # no head can be fitted to one class
        named = ", ".join(classes[c] if classes is not None else str(c) for c in present) or "none"
        empty = ", ".join(name for k, name in enumerate(classes or []) if k not in present)
        raise ValueError(f"probing needs images of at least two classes, found images of {named} only"
                         + (f"; no readable images in: {empty}" if empty else ""))
    counts = distinct_per_class(labels, groups)
    smallest = int(counts.min()) if counts.size else 0
    copies = " (byte-identical copies count once)" if _has_copies(groups) else ""

    def short(need: int) -> str:
        names = [f"{classes[c] if classes is not None else c} ({counts[i]})"
                 for i, c in enumerate(np.unique(labels)) if counts[i] < need]
        return f"; too few in: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names else ""

    if folds and folds < 2:
        raise ValueError(f"--folds {folds}: cross-validation needs at least 2 folds (0 skips it)")
    if folds and smallest < folds:
        fix = f"Use --folds {smallest}" if smallest >= 2 else "Add images to it"
        raise ValueError(f"--folds {folds}: every class needs at least {folds} distinct images, one per test fold; "
                         f"the smallest class has {smallest}{copies}{short(folds)}. {fix}, or --folds 0 "
                         "to skip cross-validation")
    for n in shots:
        if n < 1:
            raise ValueError(f"--shots {n}: the number of training images per class must be at least 1")
        if smallest <= n:
            fits = [k for k in shots if 1 <= k < smallest]
            fix = (f"Use shots below {smallest} (e.g. --shots {' '.join(map(str, fits))})" if fits
                   else f"Use shots below {smallest}" if smallest > 1 else "Add images to it")
            raise ValueError(f"--shots {n}: every class needs more than {n} distinct images (one left to test); "
                             f"the smallest class has {smallest}{copies}{short(n + 1)}. {fix}")


def _check_copies_agree(labels: np.ndarray, groups: np.ndarray | None, classes: Sequence[str] | None,
                        paths: Sequence | None) -> None:
    """One image under two class folders is a labelling error no head can score: say which."""
    if groups is None:
        return
    first: dict = {}
    for row, (group, label) in enumerate(zip(groups.tolist(), labels.tolist(), strict=True)):
        other = first.setdefault(group, row)
        if labels[other] != label:
            def name(k: int) -> str:
                where = str(paths[k]) if paths is not None else f"row {k}"
                return f"{where} ({classes[labels[k]] if classes is not None else f'class {labels[k]}'})"

            raise ValueError(f"{name(other)} and {name(row)} are the same image (byte-identical) in two classes: a "
                             "labelling error that probing cannot score; keep one copy, in its right class")


def _as_arrays(features, labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Any sequences (lists, tuples, arrays) as arrays; labels must be class indices 0..C-1."""
    features, labels = np.asarray(features), np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D sequence of integer class indices, got dtype {labels.dtype} "
                         f"and shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{int((labels < 0).sum())} of {len(labels)} labels are negative (-1 marks an image "
                         "extracted without a class folder); the heads need a class for every row: pass the "
                         "labelled rows only, e.g. keep = labels >= 0, then features[keep], labels[keep]")
    if features.ndim not in (2, 3) or len(features) != len(labels):
        raise ValueError(f"features must be [N, F] or [N, K, F] with N = {len(labels)} (one row per label), "
                         f"got shape {features.shape}")
    return features, labels, None if groups is None else np.asarray(groups)


def cross_validate(features: np.ndarray, labels: np.ndarray, head: str = "logreg", folds: int = 5,
                   seed: int = 0, groups: np.ndarray | None = None) -> Score:
    """Stratified k-fold accuracy and balanced accuracy of ``head``.

    ``features`` is ``[N, F]``, or ``[N, K, F]`` with K cached views (view 0 clean):
    training folds then use every view, test folds only the clean one. ``groups``
    (e.g. each image's sha256) keeps byte-identical copies in one fold, so a copy in
    the training folds cannot score the test fold.

    Example:
        >>> cross_validate(fs.features, fs.labels, "logreg", folds=5).acc
        0.996
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    features, labels, groups = _as_arrays(features, labels, groups)
    if folds < 2:
        raise ValueError(f"--folds {folds}: cross-validation needs at least 2 folds (0 skips it)")
    check_folds_and_shots(labels, groups, folds)
    accs, bals = [], []
    if _has_copies(groups):
        splits = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups)
    else:  # the same folds as before grouping existed
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    for train, test in splits:
        x_train, y_train = _train_rows(features, train, labels)
        acc, bal = _fit_score(head, x_train, y_train, _test_rows(features, test), labels[test])
        accs.append(acc)
        bals.append(bal)
    return Score.of(accs, bals)


def few_shot(features: np.ndarray, labels: np.ndarray, shots: int, head: str = "logreg",
             draws: int = 10, seed: int = 0, groups: np.ndarray | None = None) -> Score:
    """Train on ``shots`` random images per class, test on all the others; repeat ``draws`` times.

    With ``groups`` (each image's sha256), a shot is a distinct image (one of its copies trains)
    and copies of a training image are left out of the test set.
    """
    features, labels, groups = _as_arrays(features, labels, groups)
    check_folds_and_shots(labels, groups, 0, [shots])
    rng = np.random.default_rng(seed)
    groups = np.arange(len(labels)) if groups is None else groups
    # per class: the row of each distinct image (its first copy) and the groups, in a fixed order
    firsts = {c: np.unique(groups[labels == c], return_index=True)[1] for c in np.unique(labels)}
    firsts = {c: np.flatnonzero(labels == c)[i] for c, i in firsts.items()}
    accs, bals = [], []
    for _ in range(draws):
        train = np.concatenate([rng.choice(firsts[c], shots, replace=False) for c in sorted(firsts)])
        test = np.setdiff1d(np.arange(len(labels)), train)
        test = test[~np.isin(groups[test], groups[train])]
        x_train, y_train = _train_rows(features, train, labels)
        acc, bal = _fit_score(head, x_train, y_train, _test_rows(features, test), labels[test], shots)
        accs.append(acc)
        bals.append(bal)
    return Score.of(accs, bals)


@literal_text
def pca_scatter(features: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | Path,
                title: str = "") -> Path:
    """Save a 2-D PCA scatter of the (standardised) features, coloured by class, as PNG."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from vision_tl.utils.files import atomic_path

    features, labels, _ = _as_arrays(features, labels, None)
    x = features if features.ndim == 2 else features[:, 0]
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(StandardScaler().fit_transform(x))
    many = len(classes) > 8  # the legend would cover the points: it goes to the right of them
    # not pyplot: leaves a notebook's backend and figures alone
    fig = Figure(figsize=(6.4 + (2.2 if many else 0), 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    markers = "osD^vP*Xph"  # a second cue besides colour: tab20's pairs and colour-blind eyes
    for k, name in enumerate(classes):
        mask = labels == k
        ax.scatter(xy[mask, 0], xy[mask, 1], s=10, alpha=0.7, color=cmap(k % cmap.N), marker=markers[k % len(markers)],
                   label=f"{name} ({int(mask.sum())})")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.set_title(title)
    place = {"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {"loc": "best"}
    ax.legend(markerscale=1.5, fontsize=8, title="class (images)", title_fontsize=8, **place)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def format_table(results: list[ProbeResult], folds: int) -> str:
    """A plain-text table: one row per backbone x head."""
    shots = sorted({s for r in results for s in r.few_shot})
    # --folds 0 skips cross-validation: no columns for it
    header = ["backbone", "stages", "head", *([f"{folds}-fold acc", "balanced acc"] if folds else []), "extract img/s"]
    header += [f"{s}-shot bal. acc" for s in shots]
    rows = [header]
    for r in results:
        cv = () if not folds else ("-", "-") if r.cv is None else (
            f"{r.cv.acc:.2%} ± {r.cv.acc_std:.2%}", f"{r.cv.balanced:.2%} ± {r.cv.balanced_std:.2%}")
        speed = "-" if math.isnan(r.images_per_second) else f"{r.images_per_second:.1f}"
        row = [r.backbone, r.stages, r.head, *cv, speed]
        row += [f"{r.few_shot[s].balanced:.1%} ± {r.few_shot[s].balanced_std:.1%}" if s in r.few_shot else "-"
                for s in shots]
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(± is the standard deviation over folds or draws. extract img/s: the speed of the run that "
                 "computed the clean features into the cache, which may be an earlier run on another device.)")
    return "\n".join(lines)


def backbone_features(images, backbone: str, *, weights: str | Path | None = None,
                      pretrained: bool = True, stages=None, image_size=None, views: int = 1,
                      augment="inspection", cache_dir: str | Path | None = None, batch_size: int = 8,
                      num_workers: int | None = None, device: str | None = None,
                      progress: bool = True, seed: int = 0, skip_bad: bool = False) -> tuple[np.ndarray, float, str]:
    """Cached features of every image for one backbone: ``[N, F]``, or ``[N, K, F]`` for K views.

    ``seed`` fixes the weights of a randomly initialised backbone (``pretrained=False``).
    ``skip_bad``: images that cannot be decoded are dropped from ``images`` (with a warning)
    instead of stopping; the features are those of the images left.

    Returns:
        (features, images/s of the extraction that filled the cache, stages label).
    """
    import torch

    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.data.device import resolve_device
    from vision_tl.features.api import handle_failures
    from vision_tl.features.cache import FeatureCache
    from vision_tl.features.extractor import FeatureExtractor

    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # random-init weights: the same for a seed (and one cache entry)
        torch.manual_seed(seed)
        model = create_backbone(backbone, pretrained=pretrained, weights=weights, img_size=image_size).to(device)
    prep = resolve_preprocessing(backbone, image_size)
    cache = FeatureCache(cache_dir)
    extractors = []
    for view in range(views):
        extractor = FeatureExtractor(model, backbone, prep, stages, augment, view)
        desc = f"{backbone} view {view}" if views > 1 else backbone
        report = cache.ensure(extractor, images.paths, images.hashes, batch_size=batch_size,
                              num_workers=num_workers, device=device, progress=desc if progress else False)
        handle_failures(images, report, skip_bad)  # (with skip_bad, they leave ``images``)
        extractors.append(extractor)
    speed = cache.throughput(extractors[0])
    per_view = [cache.read(extractor, images.hashes) for extractor in extractors]  # the images left
    feats = per_view[0] if views == 1 else np.stack(per_view, 1)
    return feats, speed, ",".join(extractor.stages)


def probe(root: str | Path, backbones: str | Sequence[str], *, heads: str | Sequence[str] = ("logreg", "knn"),
          folds: int = 5, shots: Sequence[int] = (), draws: int = 10, seed: int = 0,
          plot_dir: str | Path | None = None, skip_bad: bool = False, **feature_kwargs) -> list[ProbeResult]:
    """Extract (through the cache) and score quick heads per backbone.

    Args:
        root: a class-per-folder image folder.
        backbones: timm names to compare (one name: a str).
        heads: any of ``logreg``, ``knn``, ``logreg-l2`` (one head: a str).
        folds: k of the stratified k-fold cross-validation (0 skips it).
        shots: few-shot settings (images per class for training), each repeated ``draws`` times.
        seed: seed of the folds and draws.
        plot_dir: write ``pca_<backbone>.png`` scatters there.
        skip_bad: leave unreadable images out instead of stopping.
        **feature_kwargs: passed to :func:`backbone_features` (weights, stages, image_size,
            views, augment, cache_dir, batch_size, device, progress...).

    Example:
        >>> from vision_tl.features import format_table, probe
        >>> rows = probe("../shared/datasets/neu", ["tf_efficientnet_lite0"], shots=[5, 10])
        >>> print(format_table(rows, folds=5))
    """
    from vision_tl.features.api import scan_images

    backbones, heads = _checked_arguments(backbones, heads, folds, shots, draws, seed, feature_kwargs)
    if plot_dir is not None:
        if Path(plot_dir).exists() and not Path(plot_dir).is_dir():
            raise ValueError(f"plot directory {plot_dir} is a file; give a directory for the PCA plots")
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
    images = scan_images(root, skip_bad)
    if len(images.classes) < 2:
        raise ValueError(f"{root}: probing needs at least two class folders, found {images.classes}")
    labels = np.asarray(images.labels)
    groups = np.asarray(images.hashes)  # byte-identical copies never sit on both sides of a fold
    check_folds_and_shots(labels, groups, folds, shots, images.classes, images.paths)  # before the slow part
    _warn_classes_left_without_images(labels, images.classes)
    results = []
    for backbone in backbones:
        before = len(images.paths)
        feats, speed, stages = backbone_features(images, backbone, seed=seed, skip_bad=skip_bad, **feature_kwargs)
        if len(images.paths) < before:  # undecodable images left out (skip_bad): the folds again
            labels, groups = np.asarray(images.labels), np.asarray(images.hashes)
            check_folds_and_shots(labels, groups, folds, shots, images.classes, images.paths)
            _warn_classes_left_without_images(labels, images.classes)
            if results:  # the earlier backbones' rows were scored on images since left out
                raise ValueError(f"{before - len(images.paths)} image(s) failed to decode only with {backbone}; "
                                 "probe it on its own, or remove the files named above")
        for head in heads:
            row = ProbeResult(backbone, head, stages, feats.shape[-1], speed)
            row.cv = cross_validate(feats, labels, head, folds, seed, groups) if folds else None
            row.few_shot = {n: few_shot(feats, labels, n, head, draws, seed, groups) for n in shots}
            results.append(row)
        if plot_dir is not None:
            pca_scatter(feats, labels, images.classes, Path(plot_dir) / f"pca_{backbone}.png",
                        title=f"{backbone} ({stages}) on {Path(root).name}")
    return results


def _checked_arguments(backbones: str | Sequence[str], heads: str | Sequence[str], folds: int,
                       shots: Sequence[int], draws: int, seed: int,
                       feature_kwargs: dict) -> tuple[list[str], list[str]]:
    """:func:`probe`'s backbones and heads as lists (each head once), refused with what would be
    valid before any image is read."""
    backbones = [backbones] if isinstance(backbones, str) else list(backbones)  # one name, not its letters
    heads = list(dict.fromkeys([heads] if isinstance(heads, str) else heads))  # each head once
    if not heads:
        raise ValueError("--heads is empty; give one or more of logreg, knn, logreg-l2 (comma-separated)")
    for head in heads:
        make_head(head)  # validate names before the slow part
    if feature_kwargs.get("pretrained", True) and feature_kwargs.get("weights") is None:
        from vision_tl.backbones import check_pretrained_weights

        for backbone in backbones:  # every one before the first is embedded, not after
            check_pretrained_weights(backbone)
    if not folds and not shots:
        raise ValueError("nothing to evaluate: --folds 0 skips cross-validation and no --shots were given; "
                         "leave --folds at its default (5) or pass --shots N")
    if shots and draws < 1:
        raise ValueError(f"--draws {draws}: each few-shot setting needs at least 1 random draw (default 10)")
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed}: give a whole number from 0 to 2**32 - 1")
    return backbones, heads
