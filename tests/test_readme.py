"""The README's Python section runs as written: the five main jobs through `import slimformer` on real MiniLM
and real SST-2 (fine-tune, prune to a budget, distill, measure, export)."""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
GLUE = Path(os.environ.get("GLUE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")


def python_section_code() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Python section has no python code block"
    return match.group(1)


def test_the_python_section_shows_the_five_jobs():
    code = python_section_code()
    for call in ("finetune(", "prune(", "distill(", "measure(", "export_onnx("):
        assert f"slimformer.{call}" in code, call
    assert code.lstrip().startswith("import slimformer")


@pytest.mark.integration
@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason="needs the GLUE files (../shared/data/glue or $GLUE_DIR)")
def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLUE_DIR", str(GLUE))
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "readme_example.py"
    script.write_text(python_section_code())
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    scores = {
        name: float(re.search(rf"^{name} ([0-9.]+)", printed, re.MULTILINE).group(1))
        for name in ("fine-tuned", "distilled")
    }
    assert scores["fine-tuned"] > 0.7 and scores["distilled"] > 0.7  # it learned SST-2, and the student too
    assert (tmp_path / "runs" / "sst2-half-kd.onnx").stat().st_size > 0
    assert (tmp_path / "runs" / "sst2-half" / "metrics.json").is_file()
