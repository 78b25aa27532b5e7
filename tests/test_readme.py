"""Every command in README.md, and in the docs/*.md code blocks marked ``<!-- runnable -->``, works as
typed, the way a new user runs it on a fresh clone after ``make demo``.

How each command is run (one test per command, in document order: README.md, then docs/*.md):

- The working directory is a fresh copy of the repository (``conftest.copy_repo``: no outputs/,
  data_cache/ or .venv), shared by all commands of this module, so later commands see what earlier
  ones wrote, as a user's clone does. The environment is a user's after ``. .venv/bin/activate``
  (``conftest.user_env``: this interpreter's bin directory first on PATH, no PROJECT_ROOT).
- The only thing appended is a small-size override group, ``SMALL`` below: ``debug=fast`` for
  train.py, ``debug=fast_eval`` for evaluate.py. Never ``hydra.sweep.dir``, ``hydra.run.dir`` or
  ``paths.*`` (asserted), so the default output and cache locations are what is tested.
- Placeholders: ``outputs/<task>/runs/<time>`` and ``outputs/<task>/multiruns/<time>`` (or
  ``<stamp>``) become the newest such directory an earlier command produced (names are sortable
  time stamps), which is what a reader of the README would pick.
- ``make <target>``: the target's recipe from the Makefile, ``$(PY)`` read as ``python`` (its
  ``setup`` prerequisite is the venv these tests run in). A recipe that runs pytest is this suite
  (``make test``) and is skipped rather than run recursively.
- ``. .venv/bin/activate``: checked, not run: ``python`` must be this interpreter.
- A command whose trailing comment contains ``needs: <reason>`` (COSMOS download, GPU, ...) is
  skipped with that reason.
- Python blocks run as a script in the same directory after the same substitution; the arrays they
  leave behind must be finite.

After each command its outputs are checked: the new run or sweep directory under the copy's
``outputs/`` with each job's result file, ``out=`` files of ``python -m wlshear.tasks.<name>``, summary
tables with every job ``ok``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, copy_repo, user_env

SMALL = {"train.py": ["debug=fast"], "evaluate.py": ["debug=fast_eval"]}
# result file of every job of a Hydra entry point (task name = script stem)
RESULT = {"train.py": "metrics.json", "evaluate.py": "results.json", "infer_clash.py": "run_summary.json"}
FORBIDDEN = ("hydra.sweep.dir=", "hydra.run.dir=", "paths.", "+paths.", "hydra.sweep.subdir=")
PLACEHOLDER = re.compile(r"outputs/(\w+)/(runs|multiruns)/<(?:time|stamp)>")
NEEDS = re.compile(r"#.*\bneeds:\s*(.+?)\s*$")
RUNNABLE = re.compile(r"<!--\s*runnable\b")
TIMEOUT = 900


@dataclass
class Command:
    source: str   # file:line
    lang: str     # bash or python
    text: str     # the command (continuation lines joined) or the python block

    @property
    def needs(self) -> str | None:
        m = NEEDS.search(self.text) if self.lang == "bash" else None
        return m.group(1) if m else None


def _blocks(path: Path, need_marker: bool):
    """(language, first line number, lines) of each fenced block; with ``need_marker`` only the blocks
    whose preceding non-blank line is a ``<!-- runnable -->`` comment."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang = lines[i][3:].strip()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        if lang and (not need_marker or RUNNABLE.search(before)):
            yield lang, i + 2, lines[i + 1:j]
        i = j + 1


def collect() -> list[Command]:
    docs = [(REPO / "README.md", False)] + [(p, True) for p in sorted((REPO / "docs").glob("*.md"))]
    out = []
    for path, need_marker in docs:
        rel = path.relative_to(REPO)
        for lang, first, lines in _blocks(path, need_marker):
            if lang == "python":
                out.append(Command(f"{rel}:{first}", "python", "\n".join(lines)))
            elif lang in ("bash", "sh", "shell"):
                k = 0
                while k < len(lines):
                    start, text = k, lines[k]
                    while text.rstrip().endswith("\\") and k + 1 < len(lines):
                        k += 1
                        text = text.rstrip()[:-1] + " " + lines[k].strip()
                    k += 1
                    if text.strip() and not text.lstrip().startswith("#"):
                        out.append(Command(f"{rel}:{first + start}", "bash", text.strip()))
    return out


COMMANDS = collect()


def test_the_readme_has_commands_to_run():
    """The collection itself: the README's commands are found, and the ones that need data are marked."""
    readme = [c for c in COMMANDS if c.source.startswith("README.md")]
    texts = [c.text for c in readme]
    assert any(t.startswith("make demo") for t in texts) and any(c.lang == "python" for c in readme)
    sweeps = [c for c in readme if " -m " in f" {c.text} " and "train.py" in c.text]
    assert any(c.needs is None for c in sweeps), "the README needs a sweep that runs on the embedded default"
    assert all(c.needs for c in readme if "paper_clash" in c.text or "data/source=cosmos" in c.text)
    assert any(c.source.startswith("docs/") for c in COMMANDS), "no runnable block in docs/*.md"


# -- running ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    repo = copy_repo(root / "wlshear")
    return repo, user_env(root)


def _newest(repo: Path, task: str, kind: str) -> Path:
    d = repo / "outputs" / task / kind
    dirs = sorted(p for p in d.glob("*") if p.is_dir()) if d.is_dir() else []
    if not dirs:
        pytest.fail(f"placeholder needs a directory in {d.relative_to(repo)}, but no earlier command made one")
    return dirs[-1]


def substitute(text: str, repo: Path) -> str:
    """``outputs/<task>/<runs|multiruns>/<time>`` -> the newest such directory (relative, as typed)."""
    return PLACEHOLDER.sub(lambda m: str(_newest(repo, m.group(1), m.group(2)).relative_to(repo)), text)


def _make_recipe(target: str) -> list[str]:
    """The recipe lines of ``target`` in the Makefile, with ``$(PY)`` (the venv's python) -> python."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:", ln)), None)
    assert start is not None, f"README runs `make {target}` but the Makefile has no such target"
    recipe = []
    for ln in lines[start + 1:]:
        if not ln.startswith("\t"):
            break
        cmd = ln.strip().lstrip("@").replace("$(PY)", "python")
        assert "$(" not in cmd, f"cannot expand {cmd!r} of `make {target}`: teach tests/test_readme.py"
        recipe.append(cmd)
    assert recipe, f"`make {target}` has no recipe"
    return recipe


def _sweep_size(args: list[str]) -> int:
    """Jobs of a basic grid sweep: product of the comma-separated value counts."""
    n = 1
    for a in args:
        if "=" in a and not a.startswith("hydra/") and not any(c in a for c in "[]{}()"):
            n *= len(a.split("=", 1)[1].split(","))
    return n


def _run(argv: list[str], repo: Path, env: dict, where: str) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (f"{where}: `{shlex.join(argv)}` exited with {p.returncode}\n"
                               f"--- stdout (end)\n{p.stdout[-3000:]}\n--- stderr (end)\n{p.stderr[-6000:]}")
    return p


def run_python(argv: list[str], repo: Path, env: dict, where: str) -> None:
    """One ``python ...`` command as typed plus its small-size group, then check what it wrote."""
    script = argv[1] if len(argv) > 1 and argv[1].endswith(".py") else None
    argv = argv + [a for a in SMALL.get(script, []) if not any(x.startswith("debug=") for x in argv)]
    bad = [a for a in argv if a.startswith(FORBIDDEN)]
    assert not bad, f"{where}: the README must show default paths, not {bad}"
    if script in RESULT:
        kind = "multiruns" if ("-m" in argv or "--multirun" in argv) else "runs"
        base = repo / "outputs" / Path(script).stem / kind
        before = set(base.glob("*")) if base.is_dir() else set()
        _run(argv, repo, env, where)
        new = sorted(set(base.glob("*")) - before)
        assert len(new) == 1, f"{where}: expected one new directory in {base}, got {new}"
        jobs = [new[0]] if kind == "runs" else sorted(p for p in new[0].iterdir() if p.name.isdigit())
        if kind == "multiruns":
            assert len(jobs) == _sweep_size(argv[2:]), f"{where}: {len(jobs)} job dirs in {new[0]}"
        for job in jobs:
            assert (job / RESULT[script]).is_file(), f"{where}: {job / RESULT[script]} missing"
        if script == "infer_clash.py":
            assert json.loads((jobs[0] / "run_summary.json").read_text())["n_failed"] == 0
        return
    _run(argv, repo, env, where)
    args = dict(a.split("=", 1) for a in argv[3:] if "=" in a) if argv[1:2] == ["-m"] else {}
    if "out" in args:  # python -m wlshear.tasks.<name> ... out=PATH
        out = repo / args["out"]
        assert out.exists() and (out.is_file() or any(out.iterdir())), f"{where}: {out} not written"
    if argv[1:3] == ["-m", "wlshear.tasks.summarize"]:
        sweep = repo / args["dir"]
        rows = list(csv.DictReader(open(sweep / "summary.csv")))
        n_jobs = len([p for p in sweep.iterdir() if p.name.isdigit()])
        assert len(rows) == n_jobs >= 2 and {r["status"] for r in rows} == {"ok"}, rows
        assert all(math.isfinite(float(r["sigma"])) for r in rows)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.source for c in COMMANDS])
def test_command_runs_as_typed(cmd: Command, clone):
    repo, env = clone
    if cmd.needs:
        pytest.skip(f"`{cmd.text.split('#')[0].strip()}` needs {cmd.needs}")
    if cmd.lang == "python":
        code = substitute(cmd.text, repo)
        snippet = repo / f"readme_snippet_{cmd.source.split(':')[-1]}.py"
        snippet.write_text(code)
        check = ("import json, runpy, numpy as np; ns = runpy.run_path(%r); "
                 "print(json.dumps({k: bool(np.isfinite(v).all()) for k, v in ns.items() "
                 "if isinstance(v, np.ndarray) and v.dtype.kind == 'f'}))" % snippet.name)
        p = _run(["python", "-c", check], repo, env, cmd.source)
        arrays = json.loads(p.stdout.strip().splitlines()[-1])
        assert arrays and all(arrays.values()), f"{cmd.source}: non-finite results {arrays}"
        return
    argv = shlex.split(substitute(cmd.text, repo), comments=True)
    if argv[0] in (".", "source") and argv[1].endswith("bin/activate"):
        p = _run(["python", "-c", "import sys; print(sys.prefix)"], repo, env, cmd.source)
        assert p.stdout.strip() == sys.prefix, "python on PATH is not the venv these tests run in"
        return
    if argv[0] == "make":
        for line in _make_recipe(argv[1]):
            sub = shlex.split(line)
            if "pytest" in sub:
                pytest.skip(f"`make {argv[1]}` runs `{line}`: this test suite, not run from inside itself")
            assert sub[0] == "python", f"{cmd.source}: cannot run recipe line {line!r} of `make {argv[1]}`"
            run_python(sub, repo, env, f"{cmd.source} (make {argv[1]})")
        return
    assert argv[0] == "python", (f"{cmd.source}: tests/test_readme.py cannot run `{cmd.text}`; make it a "
                                 "python/make command or mark what it needs with `# needs: ...`")
    run_python(argv, repo, env, cmd.source)
