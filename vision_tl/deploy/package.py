"""``vision-tl deploy-wheel``: the torch-free predictor as its own small wheel, for line PCs.

An install extra can only add to the kit's dependencies (torch, Lightning, timm ...),
so the predictor ships as a separate distribution, ``vision-tl-deploy``: the
modules ``vision_tl.deploy`` needs (this sub-package, ``vision_tl.imaging``,
``vision_tl.utils.files`` and the light ``vision_tl`` root and command), with
numpy, Pillow, onnxruntime and simplejpeg (faster JPEG decoding) as its only requirements.
It is built from the installed kit with the standard library alone, so it works offline::

    vision-tl deploy-wheel --out dist/
    # on a machine with internet access and the line PC's OS and Python version: the wheel
    # and its requirements (numpy, Pillow, onnxruntime, simplejpeg and theirs) into one folder
    pip download dist/vision_tl_deploy-0.1.0-py3-none-any.whl -d wheelhouse/
    # copy wheelhouse/ to the line PC; there, offline:
    pip install --no-index --find-links wheelhouse vision-tl-deploy
    vision-tl predict-onnx model.onnx images/ --out predictions.csv

Install it instead of the kit, not beside it: both provide the ``vision_tl`` package.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import vision_tl
from vision_tl.utils.files import already_there, atomic_path, path_arg

NAME = "vision-tl-deploy"
REQUIRES = ("numpy>=1.24", "pillow>=10", "onnxruntime>=1.18", "simplejpeg>=1.8,<2")
# Package-relative module files; tests/unit/test_deploy.py runs the predictor from the built
# wheel alone, so a missing module fails there.
MODULES = ("__init__.py", "cli.py", "imaging.py", "utils/__init__.py", "utils/files.py",
           "deploy/__init__.py", "deploy/cli.py", "deploy/metadata.py", "deploy/predictor.py",
           "deploy/speed.py", "deploy/package.py")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata(version: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {NAME}", f"Version: {version}",
             "Summary: Torch-free inference for ONNX classifiers exported by vision-tl (numpy, Pillow, onnxruntime, simplejpeg).",
             "License: Apache-2.0", "Requires-Python: >=3.10"]
    lines += [f"Requires-Dist: {r}" for r in REQUIRES]
    return "\n".join(lines) + "\n"


def build_deploy_wheel(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``vision_tl_deploy-<version>-py3-none-any.whl`` into ``out_dir``; returns its path.

    Raises:
        FileExistsError: the wheel exists and ``overwrite`` is false.
    """
    version = vision_tl.__version__
    out = Path(out_dir) / f"{NAME.replace('-', '_')}-{version}-py3-none-any.whl"
    there = already_there(out)
    if there and not overwrite:
        raise FileExistsError(f"{out} {there}; pass --overwrite to replace it")
    root = Path(vision_tl.__file__).parent
    dist_info = f"{NAME.replace('-', '_')}-{version}.dist-info"
    files: list[tuple[str, bytes]] = [(f"vision_tl/{m}", (root / m).read_bytes()) for m in MODULES]
    files += [
        (f"{dist_info}/METADATA", _metadata(version).encode()),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: vision_tl.deploy.package\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt", b"[console_scripts]\nvision-tl = vision_tl.cli:console_main\n"),
        (f"{dist_info}/top_level.txt", b"vision_tl\n"),
    ]
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files]
    record.append(f"{dist_info}/RECORD,,")
    files.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=overwrite) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data,
                        compress_type=zipfile.ZIP_DEFLATED)
    return out


_EPILOG = """\
The wheel holds only vision_tl's predictor (under 100 kB): numpy, Pillow, onnxruntime and simplejpeg
are not inside it. For a line PC without internet access, gather everything in one folder
on a machine that has internet access and the line PC's OS and Python version:

  vision-tl deploy-wheel --out dist/
  pip download dist/vision_tl_deploy-*.whl -d wheelhouse/

then copy wheelhouse/ to the line PC and install from it, offline:

  pip install --no-index --find-links wheelhouse vision-tl-deploy
  vision-tl predict-onnx model.onnx images/ --out p.csv

Install it instead of the full kit, not beside it: both provide the vision_tl package.
"""


def main(argv: list[str] | None = None) -> int:
    # Plain text for --help: the module docstring's first paragraph without its RST markup.
    description = " ".join(__doc__.split("\n\n")[0].replace("``", "").split())
    parser = argparse.ArgumentParser(
        prog="vision-tl deploy-wheel", description=description, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=path_arg, default="dist", help="folder for the wheel (default: dist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing wheel of this version")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out {args.out} is a file; give the folder the wheel should go into", file=sys.stderr)
        return 2
    try:
        path = build_deploy_wheel(args.out, overwrite=args.overwrite)
    except (FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (requires {', '.join(REQUIRES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
