"""The real-data example (ddpm_fast/tools/digits.py): the --quick run trains (the loss falls) and its
samples pass the quick quality check; the scorer separates real digits from noise; the entry points."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    import sklearn  # noqa: F401
except ImportError:
    pytest.skip("scikit-learn is not installed: the digits example needs sklearn.datasets.load_digits",
                allow_module_level=True)

from ddpm_fast.tools import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


@pytest.fixture(scope="module")
def scorer(split):
    x_tr, y_tr, _, _ = split
    return digits.DigitScorer(x_tr, y_tr)


def test_split_and_scaling(split):
    x_tr, y_tr, x_te, y_te = split
    assert x_tr.shape == (1257, 64) and x_te.shape == (540, 64)
    assert np.bincount(y_te, minlength=10).min() >= 52 and np.bincount(y_te, minlength=10).max() <= 55  # stratified
    x = digits.to_model_space(x_tr)
    assert x.shape == (1257, 1, 8, 8) and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(digits.to_pixels(x), x_tr, atol=1e-5)


def test_scorer_separates_real_digits_from_noise(scorer, split):
    x_tr, _, x_te, y_te = split
    real = scorer.score(x_te)
    assert scorer.accuracy(x_te, y_te) > 0.95
    assert real["n"] == 540 and sum(real["class_counts"]) == 540
    assert 0.85 < real["mean_confidence"] < 0.95
    assert real["histogram_entropy"] > 0.99 * real["histogram_entropy_max"]
    assert real["inception_score"] > 6
    # the training digits scored as if they were samples pass the full check ...
    full = digits.CHECKS["full"]
    assert all(digits.check(scorer.score(x_tr), real, full).values())
    # ... noise fails it, and the quick one (the classifier is fairly confident on noise: the
    # histogram is what catches it)
    noise = digits.to_pixels(torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    s = scorer.score(noise)
    assert not any(digits.check(s, real, full).values())
    assert not all(digits.check(s, real, digits.CHECKS["quick"]).values())
    assert s["chi2_uniform_p"] < 1e-6 and s["inception_score"] < 3
    # one digit repeated: a collapsed sampler
    one = np.repeat(x_te[y_te == 3][:1], 400, axis=0)
    c = scorer.score(one)
    assert c["class_counts"][3] == 400 and c["histogram_entropy"] == 0.0
    assert not digits.check(c, real, digits.CHECKS["quick"])["every_class_in_[0.4,1.8]x_uniform"]
    with pytest.raises(ValueError, match="pixels"):
        scorer.score(x_te.reshape(-1, 8, 8))


def test_tiny_unet_fallback_trains():
    """The built-in conv net (used where diffusers is absent) has the UNet's interface and learns."""
    import ddpm_fast

    torch.manual_seed(0)
    net = digits.TinyUNet()
    x = torch.randn(6, 1, 8, 8)
    assert net(x, torch.arange(6)).shape == (6, 1, 8, 8)
    sched = ddpm_fast.DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    data = digits.to_model_space(digits.load_split()[0][:64])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for it in range(40):
        loss = ddpm_fast.training_loss(net, data, sched, seed=0, offset=it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    with pytest.raises(ValueError, match="model"):
        digits.make_model("mlp")


def test_auto_model_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    net, name = digits.make_model("auto")
    assert isinstance(net, digits.TinyUNet) and "TinyUNet" in name
    with pytest.raises(ImportError):
        digits.make_model("unet")


def test_quick_run_trains_and_passes_the_quick_check(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc = digits.main(["--quick", "--out", str(tmp_path), "--no-progress", "--check"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # restored
    report = json.loads((tmp_path / "digits.json").read_text())
    print(out)
    assert rc == 0, out
    cfg = report["config"]
    assert cfg["quick"] is True and cfg["samples"] == digits.QUICK["samples"] and cfg["world_size"] == 1
    assert report["loss"]["last_tenth"] < 0.5 * report["loss"]["first_tenth"]
    assert len(report["loss"]["curve"]) > 10
    assert report["passed"] is True
    real = report["real_heldout"]
    for name in ("ddim", "ddpm"):
        s = report["samplers"][name]
        assert s["n"] == digits.QUICK["samples"]
        assert s["confidence_ratio"] >= digits.CHECKS["quick"]["min_confidence_ratio"]
        assert 0.4 <= min(s["class_ratio_to_uniform"]) and max(s["class_ratio_to_uniform"]) <= 1.8
        assert s["mean_confidence"] > report["baseline_noise"]["mean_confidence"]
        assert s["histogram_entropy"] > report["baseline_noise"]["histogram_entropy"]
        assert abs(s["mean_confidence"] / real["mean_confidence"] - s["confidence_ratio"]) < 1e-12
        x = np.load(tmp_path / f"samples_{name}.npy")
        assert x.shape == (digits.QUICK["samples"], 64) and x.min() >= 0 and x.max() <= 16
    for png in ("digits.png", "digits_loss.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert "held-out real" in out and "DDIM" in out and "DDPM" in out and "CPU" in out


def test_entry_points_and_bad_arguments(capsys):
    from ddpm_fast.tools import demo

    with pytest.raises(SystemExit) as e:
        demo.main(["--digits", "--help"])
    assert e.value.code == 0
    assert "demo --digits" in capsys.readouterr().out
    for bad in (["--iterations", "0"], ["--samples", "-1"], ["--timesteps", "10", "--ddim-steps", "20"],
                ["--ema", "1.5"], ["--model", "mlp"]):
        with pytest.raises(SystemExit) as e:
            digits.main(bad)
        assert e.value.code != 0
    # the thin script in examples/ runs the same main
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "digits.py"), "--help"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout, r.stderr


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_ranks_match_one_process(tmp_path):
    """Two gloo ranks on the CPU (DDP training on each rank's block of the global batch, each rank
    sampling its block, rank 0 gathering) give one process's run: the rows are keyed by their
    global index, so only fp32 reduction order differs."""
    small = ["--iterations", "6", "--batch", "16", "--timesteps", "8", "--ddim-steps", "4", "--samples", "21",
             "--no-progress", "--no-plot"]
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(ROOT, "examples", "digits.py"), *small, "--out", str(two)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert digits.main([*small, "--out", str(one)]) == 0
    a, b = (json.loads((d / "digits.json").read_text()) for d in (one, two))
    assert a["config"]["world_size"] == 1 and b["config"]["world_size"] == 2
    np.testing.assert_allclose(b["loss"]["curve"], a["loss"]["curve"], rtol=1e-5, atol=1e-6)
    for name in ("ddim", "ddpm"):
        assert b["samplers"][name]["n"] == 21
        x1, x2 = (np.load(d / f"samples_{name}.npy") for d in (one, two))
        assert x2.shape == (21, 64)
        np.testing.assert_allclose(x2, x1, atol=0.02)  # pixels in [0, 16]; measured 6e-4 after 6 Adam steps
