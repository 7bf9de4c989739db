"""``export_onnx``: checkpoint -> checked fp32 ONNX (+ optional INT8/FP16), all writes atomic."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_tl.deploy import DeployError, ModelMetadata
from vision_tl.deploy.metadata import sibling
from vision_tl.deploy.speed import onnx_speed
from vision_tl.export.onnx_export import (
    LoadedCheckpoint,
    build_metadata,
    check_opset,
    check_output_path,
    load_checkpoint,
    rewrite_metadata,
    write_json_atomic,
    write_onnx,
)
from vision_tl.export.options import ExportError, ExportOptions, ParityError, VariantRejected
from vision_tl.export.parity import (
    AUTO,
    DecodedImages,
    ImageSet,
    ParityReport,
    check_parity,
    compare,
    compare_unfamiliarity,
    count_decision_changes,
    folder_images,
    onnx_outputs,
    resolve_parity_images,
    split_images,
)
from vision_tl.export.quantize import convert_fp16, quantize_int8
from vision_tl.export.unfamiliar import (
    BankPlan,
    build_bank,
    no_threshold_note,
    plan_bank,
    threshold_images,
    threshold_note,
    with_threshold,
)
from vision_tl.imaging import check_settings
from vision_tl.utils.files import atomic_path, file_sha256

# a copy whose unfamiliarity threshold is this many times the fp32 model's misses much of what the
# fp32 model flags: said with a warning (the copy is not refused for it: its classes passed their
# check, and its own threshold keeps the false-flag bound; NEU's INT8 copy at 224 px: 1.45)
VARIANT_WARN_THRESHOLD_RATIO = 1.5


@dataclass
class ExportResult:
    """Paths written and their parity reports (``None`` when the check was skipped)."""

    model: Path
    report: ParityReport | None
    variants: dict[str, tuple[Path, ParityReport | None]] = field(default_factory=dict)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_onnx(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None,
                *, log: Callable[[str], None] = _say) -> ExportResult:
    """Export a vision_tl checkpoint to ONNX and prove it reproduces PyTorch.

    Writes ``out`` and ``<out stem>.parity.json`` (plus ``.int8.onnx`` /
    ``.fp16.onnx`` and their reports when asked). Every file goes through a
    temporary file and ``os.replace``: a failed or killed export never leaves
    a file under a final name.

    Example:
        >>> from vision_tl.export import export_onnx
        >>> result = export_onnx("runs/frozen/version_0/checkpoints/best.ckpt",
        ...                      "model.onnx")  # doctest: +SKIP
        >>> result.report.max_abs_diff < 1e-4  # doctest: +SKIP
        True

    Raises:
        ExportError: bad checkpoint, output path, option or images (message names it).
        ParityError: the ONNX model disagrees with PyTorch; nothing was written
            under ``out`` and the report is saved as ``<stem>.parity-failed.json``.
        VariantRejected: ``out`` passed and was written, but an INT8/FP16 variant failed its
            check, or could not be made or run; nothing was written under that variant's name
            (the other variant was still made: its file and report are written).
    """
    opts = _checked_options(options)
    out, earlier = _check_outputs(out, opts)
    ckpt = load_checkpoint(checkpoint)
    for note in ckpt.notes:
        log(f"note: {note}")
    metadata = build_metadata(ckpt, opts.normalize_in_graph)
    images = resolve_parity_images(checkpoint, opts.parity_images, ckpt.classes, opts.data_root)
    training, reason = _training_images(ckpt, opts)  # (listed and checked once, for both uses)
    calibration = _calibration_images(ckpt, opts, training) if opts.int8 else None
    if calibration is not None and images is not None:
        _warn_shared_images(calibration, images, opts, log)
    if images is None:
        log("WARNING: --parity-images none (parity_images='none'): the ONNX model is NOT checked against PyTorch")
    plan = plan_bank(training, images, reason, log) if opts.unfamiliar else None
    bank = None if plan is None else build_bank(ckpt.net, metadata, plan, out.parent, log)
    report, decoded, fp32 = None, None, (None, None, None)
    with atomic_path(out, overwrite=opts.overwrite) as tmp:
        write_onnx(ckpt, tmp, metadata, opts.opset, shown=out, bank=bank)
        log(f"exported {ckpt.path} -> {out} (opset {opts.opset}, input {_input_text(metadata)})")
        if images is not None:
            report, decoded, fp32, metadata, plan = _check_fp32(ckpt, tmp, out, metadata, images, plan, bank,
                                                                 opts.opset, log)
        _save_report(report, out, log)  # before the model takes its name: never a model without its record
    log(f"wrote {out}")
    for path in earlier:
        path.unlink(missing_ok=True)
        log(f"removed {path} (from an earlier export)")
    # The fp32 model is committed once it passed; each variant is a separate, atomic file.
    return ExportResult(out, report, _write_variants(out, metadata, opts, calibration, decoded, fp32, log,
                                                     plan=plan))


def _checked_options(options: ExportOptions | dict | None) -> ExportOptions:
    """The options (a dict: the same names), refused before anything is read or written."""
    if isinstance(options, dict):  # ExportOptions(**options): the same names
        options = ExportOptions(**options)
    opts = options or ExportOptions()
    check_opset(opts.opset)
    try:
        check_settings()  # a bad image-loading variable stops here, not at the first parity image
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if not _is_number(opts.max_accuracy_drop) or not 0 <= opts.max_accuracy_drop < float("inf"):  # nan too
        raise ExportError(f"max_accuracy_drop must be a number >= 0 of percentage points, got {opts.max_accuracy_drop!r}")
    if opts.max_decision_changes is not None and not (
            _is_number(opts.max_decision_changes) and 0 <= opts.max_decision_changes <= 100):  # nan too
        raise ExportError(f"max_decision_changes must be a percentage of the check images (0 to 100) or None "
                          f"(not checked), got {opts.max_decision_changes!r}")
    if opts.fp16 and not opts.normalize_in_graph:
        raise ExportError("--fp16 needs the default uint8 input: with --no-normalize-in-graph the float32 input "
                          "would have to be cast in the graph; drop one of the two options")
    return opts


def _check_outputs(out: str | Path, opts: ExportOptions) -> tuple[Path, list[Path]]:
    """The checked output path, and the files of an earlier export beside it that go once the
    new model is in place (refused without ``--overwrite``)."""
    out = check_output_path(out, opts.overwrite)
    models = [out] + [sibling(out, v) for v in ("int8", "fp16") if getattr(opts, v)]
    for model in models:
        check_output_path(model, opts.overwrite)
        for report_name in _reports_of(model):  # a report must never describe another model
            if os.path.lexists(report_name) and not opts.overwrite:
                raise ExportError(f"{report_name} already exists (the check report of an earlier export); "
                                  "pass --overwrite to replace the export and its reports, or choose another --out")
    # A variant this export does not write, left by an earlier one, would sit beside the new
    # model as if it were its INT8/FP16 twin: refused, or removed with --overwrite. (One this
    # export does write is removed too once the new model is in place, with --overwrite: should
    # its own check fail or be interrupted, the earlier model's variant must not remain.)
    stale = [path for v in ("int8", "fp16") if not getattr(opts, v)
             for path in (sibling(out, v), *_reports_of(sibling(out, v))) if os.path.lexists(path)]
    replaced = [path for model in models[1:] for path in (model, *_reports_of(model)) if os.path.lexists(path)]
    if stale and not opts.overwrite:
        raise ExportError(f"{', '.join(str(p) for p in stale)} {'exists' if len(stale) == 1 else 'exist'} beside "
                          f"{out}, from an earlier export "
                          "of possibly another model; pass --overwrite to replace the export and remove them, or "
                          "choose another --out")
    return out, stale + replaced


def _check_fp32(ckpt: LoadedCheckpoint, tmp: Path, out: Path, metadata, images: ImageSet,
                plan: BankPlan | None, bank, opset: int, log: Callable[[str], None]):
    """Check the fp32 model written at ``tmp`` against PyTorch, give it its unfamiliarity
    threshold, and judge it (:class:`ParityError` when it fails). Returns its report, the
    decoded check images, ``(probabilities, unfamiliarity scores, which check images set the
    threshold)`` for the copies' checks, and the metadata and bank plan it was written with."""
    # (a minute or more for thousands of images: say what runs)
    log(f"checking it against PyTorch on {len(images.paths)} images, {images.source} ...")
    report, decoded, fp32_probs, fp32_scores = check_parity(ckpt.net, tmp, metadata, images,
                                                            scratch=out.parent, bank=bank)
    if fp32_scores is not None and not threshold_images(decoded, plan, fp32_scores).any():
        # every readable check image is a bank image (the others could not be read): no
        # threshold, so the model is written and checked again without the output
        log(no_threshold_note(decoded, plan))
        bank = plan = None
        write_onnx(ckpt, tmp, metadata, opset, shown=out)
        report, decoded, fp32_probs, fp32_scores = check_parity(ckpt.net, tmp, metadata, images,
                                                                scratch=out.parent)
    keep = None
    if fp32_scores is not None:
        keep = threshold_images(decoded, plan, fp32_scores)
        metadata = with_threshold(metadata, fp32_scores, keep, len(bank))
        rewrite_metadata(tmp, metadata, out)  # (the graph stays as checked)
        report.details["unfamiliar"] = _unfamiliar_details(metadata, plan)
        report.unfamiliar_threshold = metadata.unfamiliar_threshold  # (as a copy's report has it)
    report.model = str(out)
    report.model_sha256 = file_sha256(tmp)
    _judge(report, out, log)
    if fp32_scores is not None:
        log(threshold_note(metadata, len(decoded.paths)))
    return report, decoded, (fp32_probs, fp32_scores, keep), metadata, plan


def _write_variants(out: Path, metadata, opts: ExportOptions, calibration: ImageSet | None,
                    decoded: DecodedImages | None,
                    fp32: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None],
                    log: Callable[[str], None], *,
                    plan: BankPlan | None) -> dict[str, tuple[Path, ParityReport | None]]:
    """Write the INT8/FP16 variants asked for; raise :class:`VariantRejected` for those that
    failed once the others are written."""
    variants: dict[str, tuple[Path, ParityReport | None]] = {}
    rejected: list[VariantRejected] = []
    for variant in ("int8", "fp16"):
        if getattr(opts, variant):
            try:
                variants[variant] = _write_variant(variant, out, metadata, opts, calibration, decoded, fp32, log,
                                                   plan=plan)
            except VariantRejected as exc:  # the other variant may still pass
                rejected.append(exc)
    if rejected:
        raise VariantRejected(" | ".join(map(str, rejected)), rejected[0].report)
    return variants


def _input_text(metadata) -> str:
    h, w = metadata.input_size
    if metadata.normalize_in_graph:
        return f"'image' uint8 [N, {h}, {w}, 3] RGB 0..255"
    return f"'image' float32 [N, 3, {h}, {w}] normalised"


def _reports_of(model: Path) -> list[Path]:
    return [sibling(model, "parity", ".json"), sibling(model, "parity-failed", ".json")]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _judge(report: ParityReport, model_path: Path, log: Callable[[str], None]) -> None:
    """Print the report; when it failed, save it as ``<stem>.parity-failed.json`` and raise
    :class:`ParityError` (a model and report already under the final names stay as they were)."""
    log(report.summary())
    if report.passed is False:
        failed = sibling(model_path, "parity-failed", ".json")
        write_json_atomic(failed, report.to_dict())
        raise ParityError(
            f"{model_path}: the export does not reproduce the reference ({'; '.join(report.failures)}); "
            f"nothing was written under {model_path.name}. Report: {failed}", report)


def _save_report(report: ParityReport | None, model_path: Path, log: Callable[[str], None]) -> None:
    """Just before ``model_path`` is replaced: its report, and no report about an earlier model
    (each one removed is logged). Where this fails (a full disk), the model is not replaced; where
    the replacing fails after it, the earlier model no longer matches the report's sha256, and
    ``Predictor`` refuses it rather than running a model whose check is not on record."""
    passed, failed = _reports_of(model_path)
    for earlier in (failed, passed) if report is None else (failed,):
        with contextlib.suppress(FileNotFoundError):  # (gone meanwhile: nothing to say)
            earlier.unlink()
            log(f"removed {earlier} (the check report of an earlier export)")
    if report is not None:
        write_json_atomic(passed, report.to_dict())


def _training_images(ckpt: LoadedCheckpoint, opts: ExportOptions) -> tuple[ImageSet | None, str | None]:
    """The run's training images (``--calibration-dir``, else its split.json's train list or
    ROOT/train/), for INT8 calibration and the unfamiliarity bank, or None with why (for
    ``--int8`` that is an error, raised here; without it the model is exported without the bank)."""
    if not (opts.int8 or opts.unfamiliar):
        return None, None
    try:
        if opts.calibration_dir is not None:
            return folder_images(opts.calibration_dir, ckpt.classes, "--calibration-dir"), None
        return split_images(ckpt.path, "train", ckpt.classes, opts.data_root), None
    except ExportError as exc:
        if opts.int8:
            raise
        return None, str(exc)


def _unfamiliar_details(metadata, plan: BankPlan) -> dict[str, object]:
    return {"threshold": metadata.unfamiliar_threshold, "bank_images": metadata.unfamiliar_bank_images,
            "val_images": metadata.unfamiliar_val_images, "check_images_in_bank_left_out": len(plan.in_bank),
            "bank_source": plan.images.source}


def _calibration_images(ckpt: LoadedCheckpoint, opts: ExportOptions, found: ImageSet | None) -> ImageSet:
    if found is None:
        raise ExportError(
            f"{ckpt.path}: --int8 needs calibration images from the training data, but the run has "
            "no split.json with a train list and no ROOT/train/ folder; pass --calibration-dir DIR (training images; "
            "Python: ExportOptions(calibration_dir=DIR)), or write the split at training with "
            "datamodule.save_split(RUN_DIR/'split.json') (RUN_DIR holds checkpoints/)"
        )
    return found.subsample(opts.int8_config.calibration_images)


def _warn_shared_images(calibration: ImageSet, checked: ImageSet, opts: ExportOptions,
                        log: Callable[[str], None]) -> None:
    """Calibrating on images the INT8 copy is then checked on makes the check's accuracy
    optimistic: say so (by content, so copies of a file count), and which set to change: the one
    the user gave (``--calibration-dir`` holding validation images, ``--parity-images`` holding
    training images), or, where the run gave both, its data, whose train and val splits share
    images (copies of a file under another name)."""
    shared = len(calibration.content_hashes() & checked.content_hashes())
    if not shared:
        return
    own_calibration = opts.calibration_dir is not None
    own_check = opts.parity_images is not None and str(opts.parity_images).lower() != AUTO  # (None: auto)
    if own_calibration and own_check:
        advice = ("keep the two folders apart: --calibration-dir with training images only, --parity-images with "
                  "images the model was neither trained nor calibrated on")
    elif own_calibration:
        advice = "calibrate on training images only (--calibration-dir with no validation or test images)"
    elif own_check:
        advice = ("check on images the model was neither trained nor calibrated on (--parity-images with no "
                  "training images)")
    else:
        advice = ("the run's train and val splits hold the same images (copies of a file under other names): "
                  "remove the copies from the data and train again, or check on other images (--parity-images DIR)")
    log(f"WARNING: {shared} of the {len(checked.paths)} images the INT8 copy is checked on are among its "
        f"{len(calibration.paths)} calibration images ({calibration.source}): its accuracy there is optimistic; "
        f"{advice}")


def _write_variant(variant: str, out: Path, metadata, opts: ExportOptions,
                   calibration: ImageSet | None, decoded: DecodedImages | None,
                   fp32: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None],
                   log: Callable[[str], None], *, plan: BankPlan | None):
    """Write one INT8/FP16 variant atomically, judge it against the fp32 model (``fp32``: its
    probabilities, unfamiliarity scores and which check images set its threshold; ``plan``: its
    bank's), time both."""
    target = sibling(out, variant)
    fp32_probs, fp32_scores, keep = fp32
    with atomic_path(target, overwrite=opts.overwrite) as tmp, _named_as(target, tmp, out, variant):
        if variant == "int8":
            log(f"quantizing to INT8 with {len(calibration.paths)} calibration images from "
                f"{calibration.source} ({opts.int8_config.method}, per_channel="
                f"{opts.int8_config.per_channel}, keep_float={opts.int8_config.keep_float})")
            details = quantize_int8(out, tmp, calibration.paths, metadata, opts.int8_config)
        else:
            details = convert_fp16(out, tmp, metadata)
        report = None
        if decoded is not None:
            probs, scores = onnx_outputs(tmp, decoded.pixels)  # (scores: None for a model without them)
            report = compare(fp32_probs, probs, decoded, model=str(target),
                             reference_name=f"fp32 ONNX {out.name}", source=opts_source(decoded))
            count_decision_changes(report, fp32_probs, probs, metadata)
            report.details = details
            if fp32_scores is not None:  # beside the quantiser's details, as the fp32 model's report has it
                own = _copy_threshold(report, tmp, target, metadata, (fp32_scores, keep), scores, log)
                report.details["unfamiliar"] = _unfamiliar_details(own, plan)
            report.judge(max_accuracy_drop=opts.max_accuracy_drop, max_decision_changes=opts.max_decision_changes)
            report.speed = _speeds(out, tmp, metadata, opts.threads)
            report.model_sha256 = file_sha256(tmp)
            try:
                _judge(report, target, log)
            except ParityError as exc:
                raise VariantRejected(f"{exc}. The fp32 model {out} passed its check and was written",
                                      exc.report) from exc
        else:
            log(f"WARNING: {target.name} was not checked (no parity images)")
        _save_report(report, target, log)  # (as for the fp32 model: the record first)
    log(f"wrote {target}")
    return target, report


@contextlib.contextmanager
def _named_as(target: Path, tmp: Path, out: Path, variant: str) -> Iterator[None]:
    """A variant that cannot be made or run (the quantizer fails, onnxruntime refuses the
    quantized graph) is a rejected variant, named by its final name, not by its temporary file."""
    try:
        yield
    except (ExportError, DeployError) as exc:
        if isinstance(exc, ParityError):
            raise
        message = str(exc).replace(str(tmp), str(target))
        raise VariantRejected(f"{target}: the {variant.upper()} copy could not be made or run ({message}). "
                              f"The fp32 model {out} passed its check and was written") from exc


def _copy_threshold(report: ParityReport, tmp: Path, target: Path, metadata,
                    fp32: tuple[np.ndarray, np.ndarray], scores: np.ndarray,
                    log: Callable[[str], None]) -> ModelMetadata:
    """Compare the copy's unfamiliarity (``scores``, on the check images) with the fp32 model's and
    give the copy its own threshold (the highest of its scores on the same check images) in its
    metadata, which is returned. Quantised features move
    the scores (on NEU's INT8 copy by up to 0.12, with a threshold of 0.32): with the fp32 model's
    threshold the copy would flag some of the very images that set it."""
    fp32_scores, keep = fp32
    compare_unfamiliarity(report, fp32_scores, scores, metadata.unfamiliar_threshold)
    own = with_threshold(metadata, scores, keep, metadata.unfamiliar_bank_images)
    rewrite_metadata(tmp, own, target)
    report.unfamiliar_threshold = own.unfamiliar_threshold
    report.reference_unfamiliar_threshold = metadata.unfamiliar_threshold
    if own.unfamiliar_threshold > VARIANT_WARN_THRESHOLD_RATIO * metadata.unfamiliar_threshold:
        log(f"WARNING: {target.name}: its unfamiliarity threshold {own.unfamiliar_threshold:.4g} is over "
            f"{VARIANT_WARN_THRESHOLD_RATIO:g} times the fp32 model's {metadata.unfamiliar_threshold:.4g}: its features "
            "moved the scores so far that it flags much less of what the fp32 model flags; where that flag matters, "
            "deploy the fp32 model")
    return own


def opts_source(decoded: DecodedImages) -> str:
    return "the fp32 parity check's images"


def _speeds(fp32: Path, variant: Path, metadata, threads: int | None) -> dict[str, object]:
    base = onnx_speed(fp32, metadata, threads=threads)
    new = onnx_speed(variant, metadata, threads=threads)
    ratio = {k: round(new[k] / base[k], 3) for k in base}
    return {"fp32": base, "variant": new, "variant_over_fp32": ratio,
            "threads": threads or "onnxruntime default"}
