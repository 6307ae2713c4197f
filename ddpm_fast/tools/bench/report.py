"""Reporting: each row's standing against the fastest library provider in plain words, the
targets' verdicts, the text table, the README's Markdown table and the plot. Reads the run's JSON
dict only (so a committed run can be re-reported without measuring)."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from .specs import ALL_PROVIDERS, OPS, TRAFFIC, shape_str
from .timing import quantile, ratio_summary

# The issues' targets live beside the benchmarks, not in the library: benchmarks/targets.json of
# the source tree (found from the package's location), or --targets PATH.
_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir))  # ddpm_fast/tools/bench/
DEFAULT_TARGETS = os.path.join(_REPO,
                               "benchmarks", "targets.json")
NOISY_SPREAD = 0.25  # a provider's (p75 - p25) / median above this marks its row noisy ("~")


def words(ratio: float) -> str:
    """``ratio`` = the other's time over this one's: "3.10x faster" when > 1, "2.00x slower" when < 1."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    if abs(ratio - 1.0) < 0.005:
        return "as fast"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def words_range(low: float, high: float) -> str:
    """The quartiles of a ratio in the words of :func:`words`: "[2.9-3.3x faster]", "[1.8-2.2x
    slower]", or both words when the quartiles straddle 1."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
        return ""
    if low >= 1:
        return f"[{low:.2f}-{high:.2f}x faster]"
    if high <= 1:
        return f"[{1 / high:.2f}-{1 / low:.2f}x slower]"
    return f"[{1 / low:.2f}x slower to {high:.2f}x faster]"


def _paired(a: dict, b: dict) -> Optional[dict]:
    """Per-round ratios of row a's time over row b's (> 1: b is faster)."""
    sa, sb = a.get("samples_ms"), b.get("samples_ms")
    if not sa or not sb:
        return None
    return ratio_summary([x / y for x, y in zip(sa, sb) if y > 0])


def rank(group: List[dict]) -> None:
    """Mark the fastest library provider of a case (``best``) and, on every measured row, how the
    best stands against it: ``vs_best`` (per-round ratios of this row's time over the best's:
    median, p25, p75), ``words`` ("3.10x faster": the best against this row) and ``speedup``
    (this row's median over the best's). Without a fused provider the eager reference stands in."""
    ok = [r for r in group if r["status"] == "ok"]
    lib = [r for r in ok if r["kind"] == "library"]
    pool = lib or [r for r in ok if r["provider"] == "reference"]
    if not pool:
        return
    best = min(pool, key=lambda r: r["ms"])
    for r in ok:
        r["best"] = best["provider"]
        r["speedup"] = r["ms"] / best["ms"]
        if r is best:
            r["vs_best"] = {"median": 1.0, "p25": 1.0, "p75": 1.0, "rounds": len(r.get("samples_ms", []))}
            r["words"] = "(fastest)"
            continue
        pr = _paired(r, best) or {"median": r["speedup"], "p25": r["speedup"], "p75": r["speedup"], "rounds": 0}
        r["vs_best"] = pr
        r["words"] = f"{best['provider']} {words(pr['median'])}"


def load_targets(path: Optional[str] = None) -> List[dict]:
    """The targets file (a JSON list under "targets"), or [] when there is none."""
    path = path or DEFAULT_TARGETS
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(json.load(f).get("targets", []))


def _target_shape(t: dict):
    return "large" if t["shape"] == "large" else tuple(t["shape"])


def verdict(low: float, high: float, threshold: float) -> str:
    """"met" when the lower quartile clears the target, "NOT met" when the upper quartile misses
    it, "undecided" when the spread straddles it (the run cannot tell: measure again, quieter)."""
    if low >= threshold:
        return "met"
    if high < threshold:
        return "NOT met"
    return "undecided"


def check_targets(data: dict, targets: Optional[Sequence[dict]] = None) -> List[dict]:
    """The targets this run measured, each with its figure, spread and verdict."""
    if targets is None:
        targets = data.get("target_specs", [])
    out = []
    dev = data["machine"]["device"]
    rows = [r for r in data["results"] if r["status"] == "ok"]
    for t in targets:
        if t.get("device") != dev:
            continue
        op, dt, shape = t["op"], t["dtype"], _target_shape(t)
        group = [r for r in rows if r["op"] == op and r["dtype"] == dt
                 and (r["numel"] >= 16 * 2 ** 20 if shape == "large" else tuple(r["shape"]) == shape)]
        lib = [r for r in group if r["kind"] == "library"]
        if not lib:
            continue
        best = min(lib, key=lambda r: r["ms"])
        shape_txt = shape_str(best["shape"])
        entry = {"op": op, "shape": best["shape"], "dtype": dt, "provider": best["provider"], "issue": t.get("issue")}
        if "min_pct_copy" in t:
            threshold = float(t["min_pct_copy"])
            value, low, high = best["pct_copy"], best["pct_copy_p25"], best["pct_copy_p75"]
            what = "%copy"
            text = (f"{op} {shape_txt} {dt}: {best['provider']} at {value:.1f}% of a same-size copy "
                    f"[{low:.1f}-{high:.1f}] (target >= {threshold:g}%)")
        else:
            threshold = float(t["min_ratio"])
            base = [r for r in group if r["provider"] == t["baseline"] and r["shape"] == best["shape"]]
            if not base:
                continue
            pr = _paired(base[0], best) or {"median": base[0]["ms"] / best["ms"], "p25": base[0]["ms"] / best["ms"],
                                            "p75": base[0]["ms"] / best["ms"]}
            value, low, high = pr["median"], pr["p25"], pr["p75"]
            what = f"x {t['baseline']}"
            text = (f"{op} {shape_txt} {dt}: {best['provider']} {words(value)} than {t['baseline']} "
                    f"{words_range(low, high)} (target >= {threshold:g}x faster)")
        v = verdict(low, high, threshold)
        entry.update(what=what, value=value, low=low, high=high, target=threshold, verdict=v,
                     met=None if v == "undecided" else v == "met", text=text)
        out.append(entry)
    return out


def _load_note(m: dict) -> str:
    load = m.get("load_average")
    cores = m.get("cpu_count") or 1
    if not load:
        return ""
    busy = load[0] > 0.5 * cores
    return (f"; load average {load[0]:.1f} on {cores} cores" +
            (" (the machine was shared with other jobs: read the ratios, which pair the providers per round, "
             "not the absolute times)" if busy else ""))


def format_table(data: dict) -> str:
    copy = data["copy"]
    m = data["machine"]
    s = data.get("settings", {})
    lines = [f"ddpm_fast bench: {m['device']} ({m['device_name']}), torch {m['torch']}, {m['threads']} thread(s)"
             f"{_load_note(m)}",
             f"large copy {copy['gbps']:.2f} GB/s (dst.copy_(src), {copy['bytes'] / 2**20:.0f} MiB moved, past the "
             "caches)",
             f"each case: {s.get('repeats', '?')} rounds (fewer when slow), one sample of every provider per round, "
             f"the order rotating; a sample = the fastest of {s.get('best_of', 1)} timing(s) on "
             f"{s.get('clock', 'perf_counter')}; ms = median per call [p25-p75]",
             f"allocator: {s.get('malloc', 'as it was')}",
             "GB/s = the op's minimal traffic (bench.TRAFFIC) / median; %copy = that over dst.copy_(src) of one "
             "tensor of the same size timed in the same rounds (in cache where the op's tensors are)",
             "last column: the fastest library provider against this row, the median of the per-round ratios "
             "[p25-p75]; ~ = this row's p25-p75 spans more than 25% of its median (noisy)", ""]
    hdr = (f"{'op':14s} {'shape':11s} {'dtype':5s} {'provider':24s} {'ms':>9s} {'[p25-p75]':>19s} {'GB/s':>7s} "
           f"{'%copy':>6s}  fastest vs this")
    lines += [hdr, "-" * (len(hdr) + 12)]
    prev = None
    for r in data["results"]:
        key = (r["op"], tuple(r["shape"]), r["dtype"])
        head = (f"{r['op']:14s} {shape_str(r['shape']):11s} {r['dtype']:5s}" if key != prev else " " * 32)
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        if r["status"] == "ok":
            spread = f"[{r['ms_p25']:.4g}-{r['ms_p75']:.4g}]"
            vs = r.get("words", "")
            pr = r.get("vs_best")
            if pr and r.get("best") != r["provider"]:
                vs += " " + words_range(pr["p25"], pr["p75"])
            mark = " ~" if r.get("noisy") else ""
            lines.append(f"{head} {r['provider']:24s} {r['ms']:9.4f} {spread:>19s} {r['gbps']:7.2f} "
                         f"{r['pct_copy']:6.1f}  {vs}{mark}")
        else:
            lines.append(f"{head} {r['provider']:24s} {r['status']}: {r['reason'][:90]}")
    targets = data.get("targets")
    if targets is None:
        targets = check_targets(data)
    if targets:
        lines += ["", f"targets ({data.get('targets_file') or 'targets'}): met when the lower quartile of the "
                      "per-round ratios clears the target, NOT met when the upper quartile misses it, else undecided "
                      "(the spread straddles the target)"]
        lines += [f"  [{t['verdict']}] {t['text']}" for t in targets]
    return "\n".join(lines)


def format_markdown(data: dict, targets: Optional[List[dict]] = None) -> str:
    """The README's table: each target's ratio (median [p25-p75] of the per-round ratios) and verdict,
    ratios only; the machine in one line above it."""
    m = data["machine"]
    if targets is None:
        targets = data.get("targets") or check_targets(data)
    load = m.get("load_average")
    shared = load and load[0] > 0.5 * (m.get("cpu_count") or 1)
    flags = m.get("cpu_flags")
    isa = ""
    if m["device"] == "cpu" and flags is not None:
        isa = ", " + (" ".join(f for f in flags if f in ("avx2", "fma", "avx512f")) or "no AVX2") \
            + ("" if "avx512f" in flags else ", no AVX-512")
    lines = [f"Measured on {m['device_name']} ({m['device']}{isa}, {m['threads']} thread(s), torch {m['torch']}), "
             f"{data.get('created', '')[:10]}"
             + (f"; the machine was shared with other jobs (load average {load[0]:.1f} on {m.get('cpu_count')} cores),"
                " so only ratios are given, each the median of ratios paired within a round" if shared else
                "; ratios only, each the median of ratios paired within a round") + ".", "",
             "| op | shape | fused | against | ratio [p25-p75] | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for t in targets:
        against = t["what"][2:] if t["what"].startswith("x ") else "same-size copy"
        if t["what"] == "%copy":
            ratio = f"{t['value']:.1f}% [{t['low']:.1f}-{t['high']:.1f}]"
            tgt = f">= {t['target']:g}%"
        else:
            ratio = f"{words(t['value'])} {words_range(t['low'], t['high'])}"
            tgt = f">= {t['target']:g}x faster"
        lines.append(f"| `{t['op']}` | {shape_str(t['shape'])} {t['dtype']} | {t['provider']} | {against} | {ratio} | "
                     f"{tgt} | {t['verdict']} |")
    return "\n".join(lines)


def plot(data: dict, path: str) -> str:
    """Achieved GB/s per op and provider across sizes (log-log), one panel per op, the large copy
    bandwidth of the same run as the ceiling. One legend for the figure: colour = provider,
    line style = dtype. Writes a PNG to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in data["results"] if r.get("status") == "ok"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    ops += [op for op in dict.fromkeys(r["op"] for r in rows) if op not in ops]
    ops = ops or ["(no results)"]
    ncols = min(3, len(ops))
    nrows = int(math.ceil(len(ops) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows + 1.2), squeeze=False)
    copy_gbps = data["copy"]["gbps"]
    providers = [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in rows)]
    providers += [p for p in dict.fromkeys(r["provider"] for r in rows) if p not in providers]
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    styles = dict(zip(dtypes, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "d")]))
    for ax, op in zip(axes.flat, ops):
        for p in providers:
            for dt in dtypes:
                pts = sorted((r["numel"], r["gbps"]) for r in rows if r["op"] == op and r["provider"] == p
                             and r["dtype"] == dt)
                if not pts:
                    continue
                ls, mk = styles[dt]
                ax.plot([x for x, _ in pts], [y for _, y in pts], linestyle=ls, marker=mk, color=colors[p])
        ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op}: {TRAFFIC[op].reads + TRAFFIC[op].writes} tensors moved" if op in TRAFFIC else op,
                     fontsize=10)
        ax.set_xlabel("elements per sample tensor")
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[p], linewidth=2.5, label=p) for p in providers]
    if len(dtypes) > 1:
        handles += [Line2D([], [], color="gray", linestyle=styles[d][0], marker=styles[d][1], label=d) for d in dtypes]
    handles.append(Line2D([], [], color="black", linestyle="--", label=f"large copy {copy_gbps:.1f} GB/s"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    m = data.get("machine", {})
    load = m.get("load_average")
    load_txt = f", load {load[0]:.1f}" if load else ""
    fig.suptitle(f"ddpm_fast bench: {m.get('device', '?')} {m.get('device_name', '')}, torch {m.get('torch', '?')}, "
                 f"{m.get('threads', '?')} threads{load_txt} ({data.get('created', '')})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if nrows > 1 else 0.12, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pct_quartiles(pct_samples: Sequence[float]) -> tuple:
    return quantile(pct_samples, 0.25), quantile(pct_samples, 0.75)
