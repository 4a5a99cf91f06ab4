"""The examples double as smoke tests: each runs and prints what it promises."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "image ROC AUC" in out
    assert "reloaded scores identical: True" in out
    auc = float(out.split("image ROC AUC (normal vs defect): ")[1].split()[0])
    assert auc > 0.9


@pytest.mark.slow
def test_image_pipeline_runs(capsys, monkeypatch):
    import skdfm._imaging.backbone

    # Tests never download: take the example's offline path (random weights).
    monkeypatch.setattr(skdfm._imaging.backbone, "_cached_weights", lambda cfg: None)
    monkeypatch.setattr(
        skdfm._imaging.backbone, "_download_blocker", lambda cfg: "tests never download"
    )
    runpy.run_path(str(EXAMPLES / "image_pipeline.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "weights: random (The pretrained weights of backbone='resnet18'" in out
    assert "reloaded scores identical: True" in out
    auc = float(out.split("image ROC AUC (normal vs defect): ")[1].split()[0])
    assert auc > 0.9
