"""Every ```python block of README.md and docs/*.md runs as written.

The files are found when the tests are collected (a doc added later is covered without editing this
file). The blocks of one file run in one fresh interpreter (one torch import per file, not per
block), in order, each in a fresh namespace of its own (so a block cannot lean on an earlier one's
variables), from an empty temporary folder, with this checkout first on the path; a block passes when
it raises nothing. A block fenced ```python no-run (optionally followed by the reason, e.g.
```python no-run needs a CUDA device) is skipped with that reason. Blocks are meant to be small:
tiny shapes, sampling under torch.no_grad().
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def doc_files():
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                 recursive=True))
    return [f for f in files if os.path.isfile(f)]


def python_blocks(path):
    """(first line number, info string, code) for each fenced block whose language is python."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, info = m.group("fence"), m.group("indent"), m.group("info").strip()
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("info").strip():
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        words = info.split()
        if words and words[0].lower() in ("python", "py", "python3"):
            out.append((i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return out


def _params():
    params = []
    for path in doc_files():
        rel = os.path.relpath(path, ROOT)
        for line, info, code in python_blocks(path):
            words = info.split()
            marks = []
            if len(words) > 1 and words[1].lower() in ("no-run", "norun", "no_run"):
                reason = " ".join(words[2:]) or "fenced as no-run"
                marks = [pytest.mark.skip(reason=f"{rel}:{line}: {reason}")]
            params.append(pytest.param(rel, line, code, marks=marks, id=f"{rel}:{line}"))
    return params


PARAMS = _params()


def test_the_docs_hold_python_examples():
    """The discovery itself: README.md's example at least is found (an empty list would pass silently)."""
    assert any(p.values[0] == "README.md" for p in PARAMS), [p.id for p in PARAMS]


def test_block_parser_reads_fences_and_no_run(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\nprint(1)\n```\n\n```bash\nls\n```\n"
                   "- item:\n\n  ```python no-run needs a GPU\n  import nothing\n  ```\n"
                   "````python\n```\nnested fence stays code\n```\n````\n")
    blocks = python_blocks(str(doc))
    assert [(b[1], b[2]) for b in blocks] == [("python", "print(1)\n"),
                                             ("python no-run needs a GPU", "import nothing\n"),
                                             ("python", "```\nnested fence stays code\n```\n")]
    assert [b[0] for b in blocks] == [2, 11, 14]


# Runs the blocks given as JSON on stdin, each in a fresh namespace; one JSON result line per block.
_RUNNER = r"""
import json, sys, traceback, io, contextlib
blocks = json.load(sys.stdin)
for line, code in blocks:
    out = io.StringIO()
    ns = {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"<block at line {line}>", "exec"), ns)
        res = {"line": line, "ok": True}
    except BaseException:
        res = {"line": line, "ok": False, "error": traceback.format_exc()[-4000:]}
    res["stdout"] = out.getvalue()[-2000:]
    print("BLOCK-RESULT " + json.dumps(res), flush=True)
"""

_RESULTS = {}


def _run_file(doc, tmp_dir):
    """Run every runnable block of ``doc`` once (cached for the session); {line: result}."""
    if doc in _RESULTS:
        return _RESULTS[doc]
    blocks = [(p.values[1], p.values[2]) for p in PARAMS if p.values[0] == doc and not p.marks]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    try:
        r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks), cwd=tmp_dir,
                           capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        for ln in r.stdout.splitlines():
            if ln.startswith("BLOCK-RESULT "):
                res = json.loads(ln[len("BLOCK-RESULT "):])
                results[res["line"]] = res
        crash = f"the interpreter exited {r.returncode} before this block reported:\n{r.stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        crash = f"the blocks of {doc} ran past {TIMEOUT_S} s together (keep docs examples tiny)"
    for line, _ in blocks:
        results.setdefault(line, {"line": line, "ok": False, "error": crash, "stdout": ""})
    _RESULTS[doc] = results
    return results


@pytest.mark.parametrize("doc,line,code", PARAMS)
def test_python_block_runs(doc, line, code, tmp_path_factory):
    res = _run_file(doc, str(tmp_path_factory.mktemp("docs_examples")))[line]
    assert res["ok"], (f"{doc}:{line}: the example failed\n--- code ---\n{code}--- error ---\n{res['error']}"
                       f"\n--- stdout ---\n{res['stdout']}")
