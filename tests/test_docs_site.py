"""The documentation site (mkdocs.yml, docs/): every code block on it runs, the strict build passes, and the built API
page of DTPAI shows its arguments in a browser.

Code blocks, by language (a ``<!-- docs-test: MODE -->`` line just before a block sets how its commands are checked):

* ``python``: executed in order, one namespace per page (a page reads like a notebook), in a temporary folder;
* ``bash``: each command is classified. ``python train.py``, the console scripts of pyproject.toml (``tplightning-train``,
  run through their entry point) and ``python -m tplightning`` are parsed (``--print_config``) by default, and run with
  quick overrides (one epoch of two batches, downloads forbidden; skipped when a MNIST config finds no MNIST in the data
  cache) under ``docs-test: run``; ``--help`` / ``--model.help`` commands run as written. A lab command (``python -m
  benchmarks.mnist ...``) runs its ``--help`` and every option the page gives must appear in it: the campaigns are
  long, so pages mark them ``docs-test: help``; a lab script (``python scripts/NAME.py ...``) is checked the same way,
  without a mark. ``pip install`` lines must name extras that pyproject.toml defines;
  environment set-up (``python -m venv``, ``. .venv/bin/activate``) and ``python -m pytest`` are not run;
* ``yaml``: ``docs-test: excerpt-of NAME`` -- every key and value of the block must be in the shipped config NAME.

The indented command lines of the results pages (docs/RESULTS.md, docs/experiments.md) are checked like bash blocks,
their lab commands by ``--help`` (those pages record campaigns and are written by the lab's commands, without marks).
All shell commands run in one subprocess, in a temporary folder (one import of torch and Lightning for all of them), started when the module
starts so that it overlaps the Python blocks.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+)\s*([\w-]*)\s*$")
SETUP = ("venv", "pytest")  # python -m venv: environment set-up; python -m pytest: the suite this test is part of
# the results pages record long runs; their lab commands are checked by --help without a mark
RECORD_PAGES = ("docs/RESULTS.md", "docs/experiments.md")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    mode: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Command:
    block: Block
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.block.where} {' '.join(self.argv)}"[:160]


def pages() -> list[Path]:
    """The site's pages and the README (the landing page's commands are checked as the site's are)."""
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "data")]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a page (with the mode of a ``docs-test`` line just before), and its indented command lines."""
    rel, lines, out, i, mode = str(path.relative_to(ROOT)), path.read_text().split("\n"), [], 0, ""
    while i < len(lines):
        line = lines[i]
        if m := MARK.match(line):
            mode = m.group(1)
        elif m := FENCE.match(line):
            indent, fence, lang = m.groups()
            body, start = [], i + 1
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            out.append(Block(rel, start, lang or "text", "\n".join(body), mode))
            mode = ""
        elif line.startswith("    python ") or line.startswith("    TPLIGHTNING"):  # an indented command line
            text, start = line.strip(), i + 1
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            out.append(Block(rel, start, "bash", text, mode))
            mode = ""
        elif line.strip():
            mode = ""
        i += 1
    return out


ALL_BLOCKS = [b for p in pages() for b in blocks(p)]


def commands(block: Block) -> list[Command]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&`` chains split, ``VAR=x``
    prefixes moved to the environment, a trailing ``&`` dropped."""
    text = re.sub(r"\\\n", " ", block.text)
    out = []
    for line in text.split("\n"):
        tokens = shlex.split(line, comments=True)
        part: list[str] = []
        for tok in [*tokens, "&&"]:
            if tok in ("&&", ";", "&"):
                if part:
                    env = {}
                    while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", part[0]):
                        key, value = part.pop(0).split("=", 1)
                        env[key] = value
                    out.append(Command(block, part, env))
                part = []
            else:
                part.append(tok)
    return out


def extras() -> set[str]:
    """The extras of pyproject.toml's ``[project.optional-dependencies]`` (read by hand: tomllib needs Python 3.11)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def scripts() -> dict[str, str]:
    """pyproject.toml's ``[project.scripts]``: name -> ``module:function``."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


def _mnist_present() -> bool:
    raw = Path(os.environ.get("TPLIGHTNING_DATA", Path.home() / ".cache" / "tplightning")) / "MNIST" / "raw"
    return raw.is_dir() and len(list(raw.iterdir())) >= 4


def module_exists(name: str) -> bool:
    """Whether the checkout (the library, or the lab's top-level ``benchmarks``/``experiments``) has module ``name``."""
    sys.path.insert(0, str(ROOT))
    try:
        with contextlib.suppress(ImportError):
            return importlib.util.find_spec(name) is not None
        return False
    finally:
        sys.path.remove(str(ROOT))


# ------------------------------------------------------------------------------------------- the commands, classified
def plan(cmd: Command) -> dict | None:
    """What to run for a command (``None``: checked here, nothing to run); raises ``AssertionError`` for a command the
    test does not know or a pip extra that does not exist."""
    argv, mode = cmd.argv, cmd.block.mode
    if argv[0] in (".", "source") or argv[:2] in (["mkdocs", "build"], ["mkdocs", "serve"]):
        return None  # activating a venv; the build is test_mkdocs_build_strict
    if argv[0] == "pip" or argv[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        asked = {e for tok in argv for group in re.findall(r"(?:^\.|^tplightning)\[([^\]]+)\]", tok) for e in group.split(",")}
        assert asked <= extras(), f"{cmd.id}: no such extra {sorted(asked - extras())} in pyproject.toml"
        return None
    if argv[0] in scripts():  # an installed console script: its entry point, as pip would write it
        argv = ["python", f"script:{scripts()[argv[0]]}", *argv[1:]]
    assert argv[0] in ("python", "python3"), f"{cmd.id}: the docs test does not know this command; teach it"
    if argv[1] == "-m" and argv[2] in SETUP:
        return None
    if argv[1] == "train.py" or argv[1].startswith("script:") or argv[1:3] == ["-m", "tplightning"]:
        kind, args = ("stock", argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])
        if any(a in ("-h", "--help") or a.endswith(".help") for a in args):
            return {"kind": kind, "args": args, "env": cmd.env, "expect": 0}
        if mode == "run":
            if any(re.match(r"(mnist|cifar10)/", a) for a in args) and not _mnist_present():
                return {"skip": f"no MNIST in the data cache {os.environ.get('TPLIGHTNING_DATA')} (the tests never download)"}
            return {"kind": kind, "args": args + QUICK, "env": {"TPLIGHTNING_NO_DOWNLOAD": "1", **cmd.env}, "expect": 0}
        assert mode in ("", "print_config"), f"{cmd.id}: unknown docs-test mode {mode!r}"
        return {"kind": kind, "args": args + ["--print_config"], "env": cmd.env, "expect": 0}
    if re.fullmatch(r"scripts/\w+\.py", argv[1]):  # a lab script: long, so its --help runs and the page's options must be in it
        assert (ROOT / argv[1]).is_file(), f"{cmd.id}: no script {argv[1]}"
        options = sorted({a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")})
        return {"kind": "path", "path": argv[1], "args": ["--help"], "env": cmd.env, "expect": 0, "options": options}
    assert argv[1] == "-m", f"{cmd.id}: the docs test does not know this command; teach it"
    module = argv[2]
    if "<" in module:  # a synopsis, python -m pkg.<name> [options]: its package must exist
        assert module_exists(module.split(".<")[0]), f"{cmd.id}: no package {module.split('.<')[0]}"
        return None
    if cmd.block.page in RECORD_PAGES and not mode:
        mode = "help"
    assert mode == "help", f"{cmd.id}: a lab command must be marked <!-- docs-test: help --> (only its --help is run)"
    options = sorted({a.split("=", 1)[0] for a in argv[3:] if a.startswith("--")})
    return {"kind": "module", "module": module, "args": ["--help"], "env": cmd.env, "expect": 0, "options": options}


SHELL = [c for b in ALL_BLOCKS if b.lang in ("bash", "sh", "shell") for c in commands(b)]


def _driver(path: str) -> None:
    """Run every planned command in this process (``python tests/test_docs_site.py PLAN.json``), write the results back."""
    runs = json.loads(Path(path).read_text())
    sys.path.insert(0, str(ROOT))
    for run in runs:
        out, saved_env, saved_argv, start = io.StringIO(), dict(os.environ), sys.argv, time.perf_counter()
        os.environ.update(run["env"])
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                if run["kind"] == "train.py":
                    sys.argv = [str(ROOT / "train.py"), *run["args"]]
                    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
                elif run["kind"].startswith("script:"):
                    module, function = run["kind"][len("script:"):].split(":")
                    sys.argv = [module, *run["args"]]
                    getattr(importlib.import_module(module), function)()
                elif run["kind"] == "path":
                    sys.argv = [str(ROOT / run["path"]), *run["args"]]
                    runpy.run_path(str(ROOT / run["path"]), run_name="__main__")
                elif run["kind"] == "stock":
                    sys.argv = ["tplightning", *run["args"]]
                    runpy.run_module("tplightning", run_name="__main__", alter_sys=True)
                else:
                    sys.argv = [run["module"], *run["args"]]
                    runpy.run_module(run["module"], run_name="__main__", alter_sys=True)
            run["rc"] = 0
        except SystemExit as exc:
            run["rc"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 -- reported with its traceback
            run["rc"], _ = 1, out.write(traceback.format_exc())
        finally:
            sys.argv = saved_argv
            os.environ.clear()
            os.environ.update(saved_env)
        run["output"], run["seconds"] = out.getvalue()[-6000:], round(time.perf_counter() - start, 2)
    Path(path).write_text(json.dumps(runs))


if __name__ == "__main__":
    _driver(sys.argv[1])
else:  # collected by pytest
    import pytest

    class _Shell:
        """The subprocess that runs every command, started at import so that it overlaps the Python blocks."""

        def __init__(self):
            self.planned, self.errors = {}, {}
            for cmd in SHELL:
                try:
                    self.planned[cmd.id] = plan(cmd)
                except AssertionError as err:
                    self.errors[cmd.id] = str(err)
            self.dir = tempfile.mkdtemp(prefix="docs-site-")
            runs = [dict(p, id=i) for i, p in self.planned.items() if p is not None and "skip" not in p]
            # the same command on several pages runs once
            self.same, unique = {}, {}
            for run in runs:
                key = json.dumps([run["kind"], run.get("module"), run["args"], run["env"]])
                self.same[run["id"]] = unique.setdefault(key, run)["id"]
            runs = list(unique.values())
            self.file = Path(self.dir) / "plan.json"
            self.file.write_text(json.dumps(runs))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}
            self.proc = subprocess.Popen([sys.executable, __file__, str(self.file)], cwd=self.dir, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            self._results = None

        def close(self) -> None:
            """Stop the driver if no test read its results (a ``-k`` selection), and remove its folder."""
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()
            shutil.rmtree(self.dir, ignore_errors=True)

        def result(self, cmd_id: str) -> dict:
            if self._results is None:
                log, _ = self.proc.communicate(timeout=600)
                assert self.proc.returncode == 0, f"the command driver failed:\n{log[-4000:]}"
                self._results = {r["id"]: r for r in json.loads(self.file.read_text())}
                shutil.rmtree(self.dir, ignore_errors=True)
            return self._results[self.same[cmd_id]]

    _STATE: dict = {}

    def _start_build() -> tuple[subprocess.Popen, Path] | None:
        """``mkdocs build --strict`` into a temporary folder, in the background (``None`` without mkdocs)."""
        if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
            return None
        out = Path(tempfile.mkdtemp(prefix="docs-site-build-"))
        proc = subprocess.Popen([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
        return proc, out

    @pytest.fixture(scope="module", autouse=True)
    def _shell():
        """Start the command driver and the site's build with the module's first test (so that they overlap the Python
        blocks)."""
        if "shell" not in _STATE:
            _STATE["shell"], _STATE["build"] = _Shell(), _start_build()
        yield _STATE["shell"]
        build = _STATE.pop("build", None)
        if build is not None:
            build[0].kill()
            build[0].communicate()
            shutil.rmtree(build[1], ignore_errors=True)
        _STATE.pop("shell").close()

    def test_the_site_has_its_code_blocks():
        """The extraction itself: each kind of block is found (a page renamed or a fence changed would silence all)."""
        langs = {b.lang for b in ALL_BLOCKS}
        assert {"python", "bash", "yaml"} <= langs, langs
        assert not langs - {"python", "bash", "yaml"}, f"blocks the test does not check: {langs - {'python', 'bash', 'yaml'}}"
        modes = {b.mode.split()[0] for b in ALL_BLOCKS if b.mode}
        assert modes <= {"run", "help", "print_config", "excerpt-of"}, modes
        assert len([c for c in SHELL if c.block.page.endswith(("RESULTS.md", "experiments.md"))]) >= 3

    @pytest.mark.parametrize("page", sorted({b.page for b in ALL_BLOCKS if b.lang == "python"}))
    def test_python_blocks_run(page, tmp_path, monkeypatch):
        from tplightning._lightning import pl

        if pl.__name__ != "pytorch_lightning":
            pytest.skip("the pages' examples import pytorch_lightning, the default package (TPLIGHTNING_LIGHTNING chose another)")
        monkeypatch.chdir(tmp_path)
        namespace: dict = {"__name__": "__docs__"}
        for block in (b for b in ALL_BLOCKS if b.page == page and b.lang == "python"):
            code = compile("\n" * (block.line - 1) + block.text, str(ROOT / block.page), "exec")
            exec(code, namespace)  # noqa: S102 -- the page's own example

    @pytest.mark.parametrize("cmd", SHELL, ids=[c.id for c in SHELL])
    def test_shell_commands(cmd, _shell):
        assert cmd.id not in _shell.errors, _shell.errors.get(cmd.id)
        planned = _shell.planned[cmd.id]
        if planned is None:
            return
        if "skip" in planned:
            pytest.skip(planned["skip"])
        run = _shell.result(cmd.id)
        assert run["rc"] == planned["expect"], f"{cmd.id} exited {run['rc']}:\n{run['output']}"
        for option in planned.get("options", []):
            assert option in run["output"], f"{cmd.id}: {option} is not an option of {planned['module']}:\n{run['output']}"

    def _config(name: str) -> dict:
        import yaml

        for folder in (ROOT / "tplightning" / "configs", ROOT / "configs"):
            if (folder / name).is_file():
                return yaml.safe_load((folder / name).read_text())
        raise AssertionError(f"no shipped config {name}")

    def _contained(part, whole, where: str) -> None:
        if isinstance(part, dict):
            assert isinstance(whole, dict), where
            for key, value in part.items():
                assert key in whole, f"{where}.{key} is not in the config"
                _contained(value, whole[key], f"{where}.{key}")
        else:
            assert part == whole, f"{where}: the page says {part!r}, the config {whole!r}"

    @pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "yaml"], ids=lambda b: b.where)
    def test_yaml_blocks_are_excerpts_of_shipped_configs(block):
        import yaml

        assert block.mode.startswith("excerpt-of "), f"{block.where}: mark a YAML block <!-- docs-test: excerpt-of NAME -->"
        _contained(yaml.safe_load(block.text), _config(block.mode.split()[1]), block.mode.split()[1])

    def test_pip_extras_are_read():
        assert {"test", "plots", "tune", "lightning", "docs"} <= extras(), extras()

    def test_api_docstrings_fence_their_examples():
        """The griffe extension of the API pages (docs/griffe_docstrings.py): its own example, and a docstring of ours."""
        import doctest

        pytest.importorskip("griffe", reason="griffe is not installed (pip install -e '.[docs]')")
        spec = importlib.util.spec_from_file_location("griffe_docstrings", DOCS / "griffe_docstrings.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert doctest.testmod(module).failed == 0
        assert module.ROLE.sub(module._short, "see :class:`~tplightning.layers.Dense`") == "see ``Dense``"
        assert module.ROLE.sub(module._short, ":func:`tplightning.load`") == "``tplightning.load``"

    # --------------------------------------------------------------------------------------------------- the build
    @pytest.fixture(scope="module")
    def site(_shell):
        pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
        pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (pip install -e '.[docs]')")
        build, out = _STATE["build"]
        stdout, stderr = build.communicate(timeout=600)
        return out, subprocess.CompletedProcess(build.args, build.returncode, stdout, stderr)

    def test_mkdocs_build_strict(site):
        out, proc = site
        assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
        for page in ("index.html", "api/rules/index.html", "rules/learned-inverses/index.html", "RESULTS/index.html"):
            assert (out / page).is_file(), page

    def _section(dom: str, anchor: str) -> str:
        """The text of the API entry whose heading has id ``anchor``, up to the next entry of the same level."""
        start = dom.find(f'id="{anchor}"')
        assert start >= 0, f"no entry {anchor} on the page"
        level = dom.rfind("<h", 0, start)
        tag = dom[level + 1 : level + 3]
        nxt = dom.find(f"<{tag} ", start)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom[start : nxt if nxt > 0 else len(dom)]))

    def test_browser_finds_dtpai_with_its_arguments(site):
        out, proc = site
        assert proc.returncode == 0, "the site did not build (test_mkdocs_build_strict)"
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium)")
        page = out / "api" / "rules" / "index.html"
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        assert "DTPAI" in dom and "<h1" in dom, dom[:2000]
        entry = _section(dom, "tplightning.rules.DTPAI")
        assert "feedback_optimizer" in entry and "Alg. A.12" in entry, entry[:3000]
        # target_stepsize: in DTPAI's own signature once it lists every argument, else on a base it names ("Bases:")
        seen, todo, text = set(), ["DTPAI"], ""
        while todo and "target_stepsize" not in text:
            name = todo.pop()
            seen.add(name)
            text = _section(dom, f"tplightning.rules.{name}")
            bases = re.search(r"Bases: ((?:[\w.]+ ?, )*[\w.]+)", text)
            todo += [b.strip().rsplit(".", 1)[-1] for b in (bases.group(1).split(",") if bases else []) if b.strip()]
            todo = [b for b in todo if b not in seen and f'id="tplightning.rules.{b}"' in dom]
        assert "target_stepsize" in text, f"target_stepsize is neither in DTPAI's entry nor in a base's:\n{entry[:3000]}"
