"""`python -m ddpm_fast bench`: the run, its JSON, its plot, and the benchmark suite's collection.

These protect the tooling (every provider of the table runs or says why not, the figures are
consistent with each other, the verdicts follow the spread, the README's table is the committed
run's), not the speed: no timing threshold is asserted here.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from ddpm_fast.tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --no-pin-malloc: the test process's allocator stays as it was
TINY = ["--shapes", "8x2", "4x2x4x4", "--repeats", "3", "--warmup", "1", "--no-pin-malloc"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench.json"
    t0 = time.perf_counter()
    rc = bench.main(["--quick", "--device", "cpu", "--json", str(path), *TINY])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    with open(path) as f:
        return json.load(f), elapsed, out


def test_quick_json_has_the_expected_keys(quick_run):
    data, _, _ = quick_run
    for key in ("schema", "created", "machine", "settings", "copy", "traffic", "ops", "results", "targets",
                "target_specs"):
        assert key in data, key
    m = data["machine"]
    for key in ("device", "device_name", "torch", "threads", "cpu_count", "backends"):
        assert key in m, key
    assert m["device"] == "cpu" and m["torch"] == torch.__version__
    assert data["copy"]["gbps"] > 0 and data["copy"]["bytes"] > 0
    assert set(data["traffic"]) == set(bench.OPS)


def test_quick_covers_every_op_provider_shape(quick_run):
    data, _, _ = quick_run
    seen = {(r["op"], tuple(r["shape"]), r["dtype"], r["provider"]) for r in data["results"]}
    for op in bench.OPS:
        for shape in ((8, 2), (4, 2, 4, 4)):  # --shapes applies to every op, training_loss included
            for provider in bench.PROVIDERS[op]:
                assert (op, shape, "fp32", provider) in seen, (op, shape, provider)
    for r in data["results"]:
        assert r["status"] in ("ok", "skipped"), f"{r['op']} {r['provider']}: {r.get('reason')}"
        if r["status"] == "skipped":
            assert r["reason"], r


def test_quick_measures_the_baselines_and_reference(quick_run):
    """The eager reference and the users' baselines must run here (diffusers is a test dependency)."""
    data, _, _ = quick_run
    ok = {(r["op"], r["provider"]) for r in data["results"] if r["status"] == "ok"}
    for op in bench.OPS:
        assert (op, "reference") in ok, op
    for op, provider in [("gaussian_noise", "torch.randn"), ("q_sample", "randn_like+add_noise"),
                         ("ddpm_step", "diffusers DDPM.step"), ("ddim_step", "diffusers DDIM.step"),
                         ("train", "randn+add_noise+mse+bwd"), ("train", "native, noise once"),
                         ("training_loss", "plain torch loop"), ("training_loss", "native")]:
        assert (op, provider) in ok, (op, provider)


def test_quick_figures_are_consistent(quick_run):
    data, _, _ = quick_run
    copy = data["copy"]["gbps"]
    groups = {}
    for r in data["results"]:
        if r["status"] != "ok":
            continue
        assert r["bytes"] == bench.op_bytes(r["op"], r["shape"], bench.DTYPES[r["dtype"]])
        assert r["ms"] > 0 and r["ms_min"] <= r["ms_p25"] <= r["ms"] <= r["ms_p75"] <= r["ms_max"]
        assert len(r["samples_ms"]) == r["repeats"] and math.isclose(statistics.median(r["samples_ms"]), r["ms"])
        assert math.isclose(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        # %copy: against the same-size copy timed in the same rounds
        copy_bytes = bench.op_bytes("copy", r["shape"], bench.DTYPES[r["dtype"]])
        want = 100 * r["gbps"] / (copy_bytes / (r["copy_ms"] * 1e-3) / 1e9)
        assert math.isclose(r["pct_copy"], want, rel_tol=1e-9)
        assert r["pct_copy_p25"] <= r["pct_copy_p75"]
        groups.setdefault((r["op"], tuple(r["shape"]), r["dtype"]), []).append(r)
    assert copy > 0
    for rows in groups.values():
        best = [r for r in rows if r.get("best") == r["provider"]]
        assert len(best) == 1
        assert best[0]["speedup"] == 1.0 and best[0]["words"] == "(fastest)"
        if any(r["kind"] == "library" for r in rows):
            assert best[0]["kind"] == "library"
        for r in rows:
            assert math.isclose(r["speedup"], r["ms"] / best[0]["ms"], rel_tol=1e-9)
            if r is best[0]:
                continue
            # vs_best: the per-round ratios of this row's time over the best's, in words
            ratios = [a / b for a, b in zip(r["samples_ms"], best[0]["samples_ms"])]
            assert math.isclose(r["vs_best"]["median"], statistics.median(ratios), rel_tol=1e-9)
            assert r["words"] == f"{best[0]['provider']} {bench.words(r['vs_best']['median'])}"


def test_quick_is_quick(quick_run):
    _, elapsed, _ = quick_run
    assert elapsed < 60, f"bench --quick on tiny shapes took {elapsed:.1f} s"


def test_traffic_table():
    n = 64 * 3 * 32 * 32
    assert bench.op_bytes("q_sample", (64, 3, 32, 32), torch.float32) == 2 * n * 4
    assert bench.op_bytes("q_sample", (64, 3, 32, 32), torch.bfloat16) == 2 * n * 2
    assert bench.op_bytes("ddpm_step", (64, 3, 32, 32), torch.float32) == 3 * n * 4
    assert bench.op_bytes("gaussian_noise", (10, 2), torch.float32) == 20 * 4
    assert bench.op_bytes("train", (10, 2), torch.float32) == 7 * 20 * 4
    assert bench.op_bytes("copy", (10, 2), torch.float32) == 2 * 20 * 4


def test_table_prints_every_row(quick_run):
    data, _, _ = quick_run
    text = bench.format_table(data)
    assert "large copy" in text and "same size" in text
    for op in bench.OPS:
        assert op in text
    assert text.count("(fastest)") >= len(bench.OPS)
    assert "faster" in text and "speedup" not in text


def test_words_read_the_right_way_round():
    assert bench.words(3.1) == "3.10x faster"
    assert bench.words(0.5) == "2.00x slower"
    assert bench.words(1.001) == "as fast"
    assert bench.report.words_range(2.9, 3.3) == "[2.90-3.30x faster]"
    assert bench.report.words_range(0.4, 0.5) == "[2.00-2.50x slower]"
    assert bench.report.words_range(0.5, 2.0) == "[2.00x slower to 2.00x faster]"


def test_verdict_needs_the_spread_on_one_side():
    assert bench.verdict(4.2, 4.6, 4.0) == "met"
    assert bench.verdict(3.1, 3.6, 4.0) == "NOT met"
    assert bench.verdict(3.5, 4.5, 4.0) == "undecided"


def _case(samples_lib, samples_base, shape=(64, 3, 32, 32)):
    """A synthetic run of one ratio-target case: native and diffusers' step, paired per round."""
    rows = []
    for provider, kind, samples in (("native", "library", samples_lib), ("diffusers DDPM.step", "baseline",
                                                                          samples_base)):
        ms = statistics.median(samples)
        rows.append({"op": "ddpm_step", "shape": list(shape), "numel": math.prod(shape), "dtype": "fp32",
                     "provider": provider, "kind": kind, "status": "ok", "ms": ms, "samples_ms": list(samples)})
    return {"machine": {"device": "cpu"}, "results": rows}


def test_a_target_gets_a_verdict_only_when_the_spread_allows():
    target = [{"device": "cpu", "op": "ddpm_step", "shape": [64, 3, 32, 32], "dtype": "fp32",
               "baseline": "diffusers DDPM.step", "min_ratio": 4.0}]
    steady = _case([1.0] * 9, [4.5, 4.4, 4.6, 4.5, 4.5, 4.3, 4.7, 4.5, 4.5])
    (t,) = bench.check_targets(steady, target)
    assert t["verdict"] == "met" and t["met"] is True and "4.50x faster than diffusers DDPM.step" in t["text"]
    slow = _case([1.0] * 9, [3.0, 3.1, 2.9, 3.0, 3.0, 3.2, 2.8, 3.0, 3.0])
    (t,) = bench.check_targets(slow, target)
    assert t["verdict"] == "NOT met" and t["met"] is False
    # a load burst hitting some rounds: the median alone says met, the quartiles straddle 4x
    swinging = _case([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [17.0, 3.0, 4.8, 3.2, 6.0, 3.1, 5.5, 3.3, 4.4])
    (t,) = bench.check_targets(swinging, target)
    assert t["value"] > 4.0 and t["verdict"] == "undecided" and t["met"] is None
    # the ratio is paired within a round: a burst slowing both providers of a round cancels out
    paired = _case([1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0], [4.5, 13.5, 4.5, 4.5, 9.0, 4.5, 4.5, 4.5, 4.5])
    (t,) = bench.check_targets(paired, target)
    assert t["verdict"] == "met" and math.isclose(t["value"], 4.5)


def test_the_targets_live_beside_the_benchmarks():
    path = os.path.join(REPO, "benchmarks", "targets.json")
    assert os.path.abspath(bench.report.DEFAULT_TARGETS) == os.path.abspath(path)
    targets = bench.load_targets()
    assert targets, "benchmarks/targets.json holds the issues' targets"
    for t in targets:
        assert t["op"] in bench.OPS and t["device"] in ("cpu", "cuda")
        assert ("min_ratio" in t) != ("min_pct_copy" in t), t
        if "min_ratio" in t:
            assert t["baseline"] in bench.PROVIDERS[t["op"]], t
    cpu = {(t["op"], tuple(t["shape"])): t["min_ratio"] for t in targets if t["device"] == "cpu"}
    assert cpu[("ddpm_step", (64, 3, 32, 32))] == 4.0 and cpu[("train", (64, 3, 32, 32))] == 2.0
    assert cpu[("training_loss", (1024, 2))] == 1.5
    assert not hasattr(bench, "TARGETS"), "the targets are not part of the library"


def _readme_table():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start, end = "<!-- bench-table: ", "<!-- /bench-table -->"
    i = text.index(start)
    src = text[i + len(start):text.index("-->", i)].strip()
    body = text[text.index("-->", i) + 3:text.index(end)].strip()
    return src, body


def test_readme_table_is_the_committed_run():
    """The README's performance table is format_markdown of the committed run it names."""
    src, body = _readme_table()
    assert src.startswith("benchmarks/results/") and src.endswith(".json"), src
    with open(os.path.join(REPO, src)) as f:
        data = json.load(f)
    assert body == bench.format_markdown(data).strip()
    assert data["machine"]["threads"] == 1 and data["targets"]


def test_markdown_from_json(tmp_path):
    src, _ = _readme_table()
    out = tmp_path / "table.md"
    assert bench.main(["--from-json", os.path.join(REPO, src), "--markdown", str(out)]) == 0
    assert out.read_text().startswith("Measured on ")


def test_time_group_rotates_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    tms = bench.time_group(fns, "cpu", warmup=1, repeats=6, min_sample_s=0.0, budget_s=10.0, min_rounds=6)
    timed = calls[6:]  # after two warm-up calls each (a, a, b, b, c, c)
    firsts = [timed[3 * r] for r in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert all(len(t["samples"]) == t["repeats"] == 6 for t in tms.values())


def test_time_fn_measures_what_it_runs():
    def sleepy():
        time.sleep(0.002)
    tm = bench.time_fn(sleepy, "cpu", warmup=1, repeats=3, min_sample_s=0.0, budget_s=1.0)
    assert 0.0019 < tm["median_s"] < 0.05


def test_round_robin_keeps_ratios():
    fast = lambda: time.sleep(0.001)  # noqa: E731
    slow = lambda: time.sleep(0.004)  # noqa: E731
    tms = bench.time_group({"fast": fast, "slow": slow}, "cpu", warmup=1, repeats=3, min_sample_s=0.0)
    assert tms["slow"]["median_s"] > 2 * tms["fast"]["median_s"]


def test_unavailable_providers_skip_with_a_reason():
    with pytest.raises(bench.ProviderSkip, match="interpreter"):
        bench.make_runner("q_sample", "triton", (4, 2), torch.float32, "cpu")
    av = bench.machine_info("cpu")["backends"]["native"]["available"].get("cpu")
    if not av:
        with pytest.raises(bench.ProviderSkip, match="native"):
            bench.make_runner("q_sample", "native", (4, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match="provider"):
        bench.make_runner("vlb_loss", "torch.randn", (4, 2), torch.float32, "cpu")


def test_runners_compute_the_op():
    """The reference runner of q_sample returns x_t of the sample's shape, the same as the public op."""
    from ddpm_fast import NoiseSchedule, q_sample
    run = bench.make_runner("q_sample", "reference", (4, 2, 3), torch.float32, "cpu")
    out = run()
    d = bench._inputs("q_sample", (4, 2, 3), torch.float32, torch.device("cpu"))
    want = q_sample(d["x0"], d["t_rows"], NoiseSchedule.from_name("linear"), seed=bench.SEED, offset=bench.OFFSET,
                    backend="reference")
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def _small_json(path):
    rows = []
    for op, scale in (("q_sample", 1.0), ("ddpm_step", 2.0)):
        for numel, ms in ((1000, 0.01), (100000, 0.2)):
            for provider, f in (("reference", 1.0), ("native", 0.1)):
                nbytes = bench.op_bytes(op, (numel,), torch.float32)
                t = ms * f * scale
                rows.append({"op": op, "shape": [numel], "numel": numel, "dtype": "fp32", "provider": provider,
                             "kind": "library" if provider == "native" else "baseline", "bytes": nbytes,
                             "status": "ok", "ms": t, "gbps": nbytes / (t * 1e-3) / 1e9, "pct_copy": 1.0})
    rows.append({"op": "q_sample", "shape": [10], "numel": 10, "dtype": "fp32", "provider": "triton",
                 "kind": "library", "bytes": 80, "status": "skipped", "reason": "no"})
    data = {"machine": {"device": "cpu", "device_name": "test", "torch": "x", "threads": 1},
            "copy": {"gbps": 20.0, "bytes": 1}, "created": "now", "results": rows}
    with open(path, "w") as f:
        json.dump(data, f)


def test_plot_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    src, png = tmp_path / "small.json", tmp_path / "out" / "plot.png"
    _small_json(src)
    assert bench.main(["--plot", str(png), "--from-json", str(src)]) == 0
    with open(png, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.shape[0] > 200 and img.shape[1] > 400


def test_plot_from_a_real_run(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, out = quick_run
    png = tmp_path / "run.png"
    assert bench.main(["--plot", str(png), "--from-json", str(out / "bench.json")]) == 0
    assert os.path.getsize(png) > 10_000


def test_from_json_needs_an_output(tmp_path, capsys):
    assert bench.main(["--from-json", str(tmp_path / "x.json")]) == 2


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "bench", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--quick", "--plot", "--json", "--device", "--markdown", "--targets", "--from-json"):
        assert flag in r.stdout, flag
    assert "skipped unless --compile" in " ".join(r.stdout.split())  # --quick's help says what it skips


def test_benchmark_suite_collects():
    """benchmarks/ (pytest-benchmark, outside the default run) imports and parametrises."""
    pytest.importorskip("pytest_benchmark")
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "--bench-device", "cpu", "--bench-dtype", "fp32"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    n_ops = sum(len(spec.providers) * len(bench.shapes_for(op, bench.DEFAULT_SHAPES)) for op, spec in bench.SPECS.items())
    assert f"{n_ops + len(bench.DEFAULT_SHAPES) + 1} tests collected" in r.stdout, r.stdout[-500:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_asked_for_without_cuda(capsys):
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_triton_provider_without_triton_says_it_is_not_installed(monkeypatch):
    from ddpm_fast.tools.bench import specs

    find_spec = specs.importlib.util.find_spec
    monkeypatch.setattr(specs.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(specs.ProviderSkip, match="triton is not installed"):
        specs._library_backend("triton", torch.device("cpu"), torch.float32)
