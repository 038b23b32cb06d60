"""The package is the library and the lab sits beside it: nothing in ``tplightning/`` imports the benchmarks or the
experiments, and every lab command runs as ``python -m ...`` from any folder of the checkout, writing into the
checkout's docs/ by default."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

LAB = ("benchmarks", "experiments")
# ``import benchmarks``, ``from experiments.x import``, ``from ..benchmarks import``, ``importlib.import_module("benchmarks...``
LAB_IMPORT = re.compile(r"^\s*(from\s+\.*|import\s+)(benchmarks|experiments)\b|import_module\(\s*['\"](benchmarks|experiments)\b", re.M)
COMMANDS = (["experiments." + m for m in ("block_diagonal", "factorisation", "pseudo_inverse", "sherman_morrison", "student_teacher", "toy")]
            + ["experiments.dynamics." + m for m in ("signals", "stability", "training")]
            + ["benchmarks." + m for m in ("mnist", "speed", "student_teacher", "syncs", "tune")])  # fmt: skip


def test_the_package_imports_no_lab_code():
    sources = sorted((REPO / "tplightning").rglob("*.py"))
    assert len(sources) > 20
    found = [f"{p.relative_to(REPO)}: {m.group(0).strip()}" for p in sources for m in LAB_IMPORT.finditer(p.read_text())]
    assert found == []
    assert LAB_IMPORT.search("from ..benchmarks.common import quiet") and LAB_IMPORT.search("    import experiments.toy")
    assert not LAB_IMPORT.search("from tplightning.benchmarking import x")


def test_every_lab_command_runs_from_another_folder_of_the_checkout():
    """Each command's ``--help`` as ``python -m <module>`` (run as ``__main__``) from docs/, in one interpreter."""
    code = (
        "import contextlib, io, runpy, sys\n"
        "for module in sys.argv[1:]:\n"
        "    sys.argv, out = [module, '--help'], io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "            code = None\n"
        "        except SystemExit as exc:\n"
        "            code = exc.code\n"
        "    print(module, code, repr(out.getvalue()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "10000"}  # help lines unwrapped
    done = subprocess.run([sys.executable, "-c", code, *COMMANDS], cwd=REPO / "docs", env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert sorted(lines) == sorted(COMMANDS)
    for module, rest in lines.items():
        code, text = rest.split(" ", 1)
        assert code == "0" and f"usage: python -m {module}" in text, (module, rest[:300])
    results = str(REPO / "docs" / "RESULTS.md")
    for module in ("benchmarks.mnist", "benchmarks.speed", "benchmarks.syncs", "benchmarks.student_teacher", "benchmarks.tune"):
        assert f"(default: {results})" in lines[module], module
    assert f"(default: {REPO / 'out' / 'toy'})" in lines["experiments.toy"]
