"""The demo (ddpm_fast/tools/demo.py): a short run writes its PNG and JSON; the evaluation is right."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ddpm_fast.tools import demo


def test_quick_demo_writes_png_and_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc = demo.main(["--quick", "--iterations", "150", "--samples", "3000", "--out", str(tmp_path)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    assert "weight A" in out and "weight B" in out and "mean B" in out and "std A" in out and "final loss" in out
    png = tmp_path / "demo.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["true"]["weights"] == [0.8, 0.2]
    rec = report["recovered"]
    assert rec["n"] == 3000 and abs(sum(rec["weights"]) - 1) < 1e-9
    assert len(rec["means"]) == 2 and len(rec["stds"]) == 2
    assert report["config"]["iterations"] == 150 and report["config"]["quick"] is True
    assert math.isfinite(report["final_loss"]) and len(report["loss_curve"]) > 0
    assert set(report["checks"]) == {"weights_within_0.01", "means_within_0.05", "stds_within_10pct"}


def test_demo_without_matplotlib_skips_the_plot_and_writes_the_json(tmp_path, capsys, monkeypatch):
    """A plain install has no matplotlib (it is the [plot] extra): the demo says so and finishes."""
    find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    rc = demo.main(["--iterations", "20", "--samples", "200", "--out", str(tmp_path)])
    assert rc == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "demo.png").exists()
    assert json.loads((tmp_path / "demo.json").read_text())["recovered"]["n"] == 200


def test_evaluate_on_the_true_distribution():
    """evaluate() on data drawn from the truth recovers it (binomial SE 0.0018 at 50,000)."""
    x = demo.draw_data(50_000, torch.Generator().manual_seed(0), "cpu")
    r = demo.evaluate(x)
    assert abs(r["weight_se"] - 0.00179) < 1e-5
    assert r["max_weight_error"] < 4 * r["weight_se"]
    assert r["max_mean_error"] < 0.01 and r["max_std_rel_error"] < 0.03
    # a sample with the wrong ratio is reported as such
    k = torch.arange(10_000) < 5_000
    wrong = torch.where(k[:, None], torch.tensor(demo.TRUE_CENTRES[0]), torch.tensor(demo.TRUE_CENTRES[1]))
    assert abs(demo.evaluate(wrong)["weights"][0] - 0.5) < 1e-12


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        demo.main(["--iterations", "0"])
    assert e.value.code != 0
