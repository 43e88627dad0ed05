"""`dvc plots show` with the project's dvc.yaml writes a page that renders offline.

A Vega plot (a CSV with a template) makes DVC's page load Vega, Vega-Lite and Vega-Embed from
a CDN, so offline it shows nothing; dvc.yaml declares the confusion matrix as an image plot.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.browser import remote_resources, render_offline, requires_chromium
from tests.conftest import REPO_ROOT


def evaluate_outputs(root: Path) -> Path:
    """A tiny confusion.png and confusion.csv where the evaluate stage writes them."""
    from matplotlib.image import imsave

    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    out = root / params["evaluate"]["output_dir"]
    out.mkdir(parents=True)
    imsave(out / "confusion.png", [[3, 1], [0, 4]], cmap="Blues")
    frame = pd.DataFrame({"actual": ["a", "a", "b"], "predicted": ["a", "b", "b"]})
    frame.to_csv(out / "confusion.csv", index=False)
    return out


def dvc(root: Path, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg"}


def declared_plots(dvc_yaml: dict) -> list[str]:
    """Every plot path in a dvc.yaml: top-level `plots` and each stage's."""
    entries = list(dvc_yaml.get("plots") or [])
    for stage in dvc_yaml["stages"].values():
        entries += stage.get("plots") or []
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def test_every_dvc_plot_is_an_image_so_its_page_needs_no_script():
    plots = declared_plots(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8")))
    assert plots, "dvc.yaml declares no plot"
    assert [path for path in plots if Path(path).suffix not in IMAGE_SUFFIXES] == []


@pytest.mark.slow
@requires_chromium
def test_dvc_plots_show_renders_the_confusion_matrix_offline(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    evaluate_outputs(tmp_path)
    dvc(tmp_path, "init", "--no-scm", "--quiet")
    dvc(tmp_path, "plots", "show", "-o", "plots")
    page = tmp_path / "plots" / "index.html"
    assert remote_resources(page.read_text(encoding="utf-8")) == []
    dom = render_offline(page.as_uri())
    assert remote_resources(dom) == []
    assert '<img src="static/workspace_data_evaluate_confusion.png">' in dom
    assert (tmp_path / "plots" / "static" / "workspace_data_evaluate_confusion.png").is_file()
