"""The README's Python section runs as written: the five main jobs through `import slimformer` on real MiniLM
and real SST-2 (fine-tune, prune to a budget, distill, measure, export)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
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


def test_the_python_section_shows_the_main_jobs():
    code = python_section_code()
    for call in ("finetune(", "prune(", "distill(", "measure(", "export_onnx(", "quantize(", "compress("):
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
        for name in ("fine-tuned", "distilled", "int8", "compressed")
    }
    assert all(score > 0.7 for score in scores.values()), scores  # it learned SST-2; so did every smaller model
    assert (tmp_path / "runs" / "sst2-int8" / "report.md").is_file()
    assert (tmp_path / "runs" / "sst2-half-kd.onnx").stat().st_size > 0
    assert (tmp_path / "runs" / "sst2-half" / "metrics.json").is_file()
    # the pruned MiniLM (heads per layer differ) loads with plain transformers where slimformer is not installed
    folder = tmp_path / "runs" / "sst2-half"
    receiver = (
        "import sys; sys.modules['slimformer'] = None\n"
        "import torch, transformers as hf\n"
        f"tok = hf.AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"model = hf.AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "batch = tok(['a gripping, funny film', 'dull and far too long'], padding=True, return_tensors='pt')\n"
        f"torch.save(model.eval()(**batch).logits.detach(), {str(tmp_path / 'plain.pt')!r})\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", receiver], check=True, env=env, timeout=300)
    import torch

    import slimformer

    loaded = slimformer.load_model(folder)
    assert len(set(loaded.model.config.slimformer_layout["heads"])) > 1  # an uneven layout, really
    batch = loaded.tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    torch.testing.assert_close(torch.load(tmp_path / "plain.pt"), expected, atol=1e-5, rtol=0)
