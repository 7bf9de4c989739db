"""The README's Python API example runs as printed (on a tiny folder, a tiny backbone, 1 epoch)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_api_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_example_trains_loads_and_exports(inspection_folder, tmp_path, monkeypatch):
    code = _python_api_example()
    swaps = {  # only what makes it small and offline; the calls stay the README's
        '"path/to/images"': repr(str(inspection_folder)),
        'BACKBONE, SIZE = "tf_efficientnet_lite0", 224': 'BACKBONE, SIZE = "test_efficientnet", 32',
        'mode="partial")': 'mode="partial", pretrained=False)',
        "L.Trainer(max_epochs=10,": "L.Trainer(max_epochs=1, enable_progress_bar=False, default_root_dir=str(WORK),",
        '"model.onnx"': 'str(WORK / "model.onnx")',
    }
    for old, new in swaps.items():
        assert old in code, f"the README's Python API example no longer has {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope = {"WORK": tmp_path, "__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own example
    assert Path(scope["best"].best_model_path).name == "best.ckpt"
    assert scope["meta"]["classes"] == ["crack", "good", "scratch", "spot"]
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.parity.json").is_file()
    assert os.path.isfile(Path(scope["trainer"].log_dir) / "split.json")
