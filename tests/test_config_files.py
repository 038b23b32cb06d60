"""Config lookup: a bare name resolves inside the package, a path is used as given, and the checkout's old form
``configs/NAME`` still finds the packaged ``NAME``."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tplightning
from tplightning import config_files
from tplightning.config_files import CONFIG_DIR, available_configs, resolve_config_args
from tplightning.errors import ConfigError

PACKAGED = Path(tplightning.__file__).resolve().parent / "configs"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder outside the checkout, with nothing named configs/ in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_configs_are_package_data():
    if CONFIG_DIR != PACKAGED:
        pytest.skip("TPLIGHTNING_CONFIGS names another folder")
    names = available_configs()
    assert {"dtp.yaml", "bp.yaml", "mnist/bp.yaml", "dynamics/two_phase.yaml", "cifar10/bp.yaml", "trainer/ddp.yaml"} <= set(names)
    assert len(names) == len(list(PACKAGED.rglob("*.yaml"))) and names == sorted(names)


def test_bare_names_resolve_from_any_folder(elsewhere):
    assert resolve_config_args(["--config", "dtp.yaml", "--seed_everything", "3"]) == [
        "--config", str(CONFIG_DIR / "dtp.yaml"), "--seed_everything", "3"]  # fmt: skip
    assert resolve_config_args(["--config=mnist/bp.yaml"]) == ["--config", str(CONFIG_DIR / "mnist" / "bp.yaml")]


def test_the_checkout_form_configs_slash_name_still_resolves(elsewhere):
    assert resolve_config_args(["--config", "configs/dtp.yaml"]) == ["--config", str(CONFIG_DIR / "dtp.yaml")]
    assert resolve_config_args(["--config", "./configs/mnist/bp.yaml", "--config", "configs/trainer/debug.yaml"]) == [
        "--config", str(CONFIG_DIR / "mnist" / "bp.yaml"), "--config", str(CONFIG_DIR / "trainer" / "debug.yaml")]  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"'configs/bpp.yaml' not found \(neither as a path nor in .*\); did you mean bp\.yaml\? available: .*dtp\.yaml"):
        resolve_config_args(["--config", "configs/bpp.yaml"])
    with pytest.raises(FileNotFoundError, match=r"'other/configs/dtp.yaml' not found"):  # only a leading configs/ is dropped
        resolve_config_args(["--config", "other/configs/dtp.yaml"])


def test_a_path_that_exists_wins_over_a_packaged_name(elsewhere):
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "dtp.yaml").write_text("seed_everything: 5\n")
    (elsewhere / "bp.yaml").write_text("seed_everything: 6\n")
    assert resolve_config_args(["--config", "configs/dtp.yaml", "--config", "bp.yaml"]) == [
        "--config", "configs/dtp.yaml", "--config", "bp.yaml"]  # fmt: skip


def test_bad_config_files_are_config_errors(elsewhere):
    (elsewhere / "list.yaml").write_text("- 1\n- 2\n")
    (elsewhere / "broken.yaml").write_text("model:\n  a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"^config file list.yaml holds a list; a config is a mapping"):
        resolve_config_args(["--config", "list.yaml"])
    with pytest.raises(ConfigError, match=r"^config file broken.yaml is not valid YAML: .* at line 3, column 1$"):
        resolve_config_args(["--config", "broken.yaml"])
    with pytest.raises(ConfigError, match=r"^config file configs is a folder"):
        (elsewhere / "configs").mkdir()
        resolve_config_args(["--config", "configs"])
    with pytest.raises(ConfigError, match=r"^--config needs a file name$"):
        resolve_config_args(["--x", "1", "--config"])


def test_the_environment_names_another_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my_configs"
    folder.mkdir()
    (folder / "mine.yaml").write_text("seed_everything: 1\n")
    monkeypatch.setenv("TPLIGHTNING_CONFIGS", str(folder))
    try:
        moved = importlib.reload(config_files)
        assert moved.CONFIG_DIR == folder and moved.available_configs() == ["mine.yaml"]
        assert moved.resolve_config_args(["--config", "mine.yaml"]) == ["--config", str(folder / "mine.yaml")]
    finally:
        monkeypatch.delenv("TPLIGHTNING_CONFIGS")
        importlib.reload(config_files)


BOMB = """\
a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_config_above_the_size_limit_is_refused_before_reading(elsewhere, monkeypatch):
    big = elsewhere / "big.yaml"
    big.write_text("seed_everything: 1\n" + "# padding\n" * 200_000)  # 2,000,019 bytes of valid YAML
    size = big.stat().st_size
    assert config_files.MAX_CONFIG_BYTES == 1_000_000 and size == 2_000_019

    def no_yaml(*args, **kwargs):
        raise AssertionError("a config above the limit was parsed")

    with monkeypatch.context() as patch:
        patch.setattr(config_files.yaml, "SafeLoader", no_yaml)
        patch.setattr(config_files.yaml, "CSafeLoader", no_yaml, raising=False)
        with pytest.raises(ConfigError, match=r"^config file big.yaml is 2,000,019 bytes; configs larger than "
                                              r"1,000,000 bytes \(MAX_CONFIG_BYTES, 1 MB\) are refused$"):  # fmt: skip
            resolve_config_args(["--config", "big.yaml"])
    # the limit itself is accepted: a file of exactly MAX_CONFIG_BYTES bytes is read
    edge = elsewhere / "edge.yaml"
    head = "seed_everything: 1\n"
    edge.write_text(head + "#" * (config_files.MAX_CONFIG_BYTES - len(head) - 1) + "\n")
    assert edge.stat().st_size == config_files.MAX_CONFIG_BYTES
    assert resolve_config_args(["--config", "edge.yaml"]) == ["--config", "edge.yaml"]


def _refused_in_a_capped_child(config: str, cwd: Path) -> tuple[float, str]:
    """``resolve_config_args(["--config", config])`` in a child process whose address space is capped at 1 GiB more
    than it holds after its imports (the config module and its errors only, not the package's torch), so that reading
    or expanding without bound fails there, not in the test process: ``(seconds, message)`` of its ConfigError."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc (the memory cap needs the process' size)")
    package = Path(tplightning.__file__).resolve().parent
    code = (
        "import resource, sys, time, types\n"
        f"pkg = types.ModuleType('tplightning'); pkg.__path__ = [{str(package)!r}]; sys.modules['tplightning'] = pkg\n"
        "from tplightning.config_files import resolve_config_args\n"
        "from tplightning.errors import ConfigError\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))\n"
        "start = time.perf_counter()\n"
        "try:\n"
        f"    resolve_config_args(['--config', {config!r}])\n"
        "except ConfigError as err:\n"
        "    print(f'{time.perf_counter() - start:.3f}'); print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout, out.stderr[-2000:]
    seconds, message = out.stdout.splitlines()
    return float(seconds), message


def test_a_stream_without_a_size_is_read_up_to_the_limit_only(elsewhere):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    seconds, message = _refused_in_a_capped_child("/dev/zero", elsewhere)
    assert message == ("config file /dev/zero gives more than 1,000,000 bytes; configs larger than 1,000,000 bytes "
                       "(MAX_CONFIG_BYTES, 1 MB) are refused")  # fmt: skip


def test_an_alias_bomb_is_refused_at_once_and_without_memory(elsewhere):
    """The billion laughs: 9 levels of 9 aliases each, 435 million nodes once expanded, from a file of under 500
    bytes, refused within a second in a child process of capped memory."""
    bomb = elsewhere / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 500
    seconds, message = _refused_in_a_capped_child("bomb.yaml", elsewhere)
    # 9 lols + 1 list at level a; each level above: 1 list + 9 copies of the level below; plus the mapping and its keys
    sizes = [10]
    for _ in range(8):
        sizes.append(1 + 9 * sizes[-1])
    expanded, distinct = 1 + 9 + sum(sizes), 1 + 9 + 10 + 8 * 1
    assert message == (f"config file bomb.yaml: its YAML aliases expand to {expanded:,} nodes, {expanded - distinct:,} of "
                       "them repeated; at most 10,000 repeated nodes are accepted (MAX_ALIAS_NODES)")  # fmt: skip
    assert seconds < 1.0


def test_a_recursive_alias_is_refused(elsewhere):
    (elsewhere / "loop.yaml").write_text("model: &m\n  init_args:\n    inner: *m\n")
    with pytest.raises(ConfigError, match=r"^config file loop.yaml has a recursive YAML alias \(an alias inside the node"):
        resolve_config_args(["--config", "loop.yaml"])


def test_a_config_with_a_few_anchors_and_aliases_still_loads(elsewhere):
    """Anchors that share the layer sizes between model and data and an optimizer between the forward and feedback
    parts (a merge key): a handful of repeated nodes, well under the limit; jsonargparse reads the file as written."""
    from tplightning.cli import build

    (elsewhere / "shared.yaml").write_text(
        "model:\n"
        "  init_args:\n"
        "    sizes: &sizes [6, 5, 6]\n"
        "    forward_optimizer: &sgd\n"
        "      class_path: torch.optim.SGD\n"
        "      init_args: {lr: 0.05, momentum: 0.5}\n"
        "    feedback_optimizer:\n"
        "      <<: *sgd\n"
        "      init_args: {lr: 0.003, momentum: 0.5}\n"
        "data:\n"
        "  init_args: {sizes: *sizes}\n"
    )
    args = resolve_config_args(["--config", "dtp.yaml", "--config", "shared.yaml"])
    assert args == ["--config", str(CONFIG_DIR / "dtp.yaml"), "--config", "shared.yaml"]
    config = build([*args, "--trainer.logger", "false", "--trainer.callbacks", "[]"]).config
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert list(model["sizes"]) == list(data["sizes"]) == [6, 5, 6]
    assert model["feedback_optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["feedback_optimizer"]["init_args"]["lr"] == 0.003 and model["forward_optimizer"]["init_args"]["lr"] == 0.05
