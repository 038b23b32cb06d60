"""Where ``--config NAME`` is found: the configs shipped inside the package.

The configs are package data (``tplightning/configs/``), so a bare name such as ``dtp.yaml`` or
``mnist/bp.yaml`` resolves wherever tplightning is installed. ``$TPLIGHTNING_CONFIGS`` names another
folder to look in instead. A value that is an existing path is used as it is; the form of a checkout,
``configs/dtp.yaml``, resolves to the packaged ``dtp.yaml`` when no such path exists.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath

import yaml

from .errors import ConfigError

__all__ = ["CONFIG_DIR", "available_configs", "resolve_config_args"]

#: the folder a bare config name is looked up in: ``$TPLIGHTNING_CONFIGS``, else the package's ``configs/``
CONFIG_DIR = Path(os.environ.get("TPLIGHTNING_CONFIGS") or Path(__file__).resolve().parent / "configs")
#: the folder name a config path started with in a checkout before the configs became package data
_OLD_PREFIX = "configs"


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The names (relative to ``config_dir``, ``/``-separated) of every YAML config under it, sorted.

    >>> names = available_configs()
    >>> "dtp.yaml" in names and "mnist/bp.yaml" in names
    True
    """
    return sorted(p.relative_to(config_dir).as_posix() for p in config_dir.rglob("*.yaml")) if config_dir.is_dir() else []


def _check_yaml(path: Path) -> None:
    """:class:`ConfigError` for a config that is a folder, not text, not valid YAML (naming line and column) or not a
    mapping of options."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file")
    try:
        doc = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (a YAML config was expected)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {problem} at {where}") from err
    if not isinstance(doc, dict):
        held = "nothing" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError(f"config file {path} holds {held}; a config is a mapping of options (model:, data:, trainer:, ...)")


def _locate(value: str, config_dir: Path) -> str | None:
    """The file ``--config value`` means, or ``None``: ``value`` itself if that path exists, else
    ``config_dir / value``, else (a checkout's ``configs/NAME``) ``config_dir / NAME``."""
    if Path(value).exists():
        return value
    if (config_dir / value).exists():
        return str(config_dir / value)
    parts = PurePath(value).parts
    if len(parts) > 1 and parts[0] == _OLD_PREFIX and config_dir.joinpath(*parts[1:]).exists():
        return str(config_dir.joinpath(*parts[1:]))
    return None


def resolve_config_args(args: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Rewrite each ``--config NAME`` (or ``--config=NAME``) to the path of the file it names.

    ``NAME`` is used as it is when it is a path that exists; otherwise it is looked up in ``config_dir``
    (a leading ``configs/``, the checkout form, is dropped when only the rest names a config there). Every
    other argument is kept in place.

    Raises ``FileNotFoundError`` listing the available configs when the file is found nowhere, and
    :class:`~tplightning.errors.ConfigError` when ``--config`` has no value or the file is not a YAML mapping
    (naming the line and column of invalid YAML).

    >>> args = resolve_config_args(["--config", "configs/dtp.yaml", "--trainer.max_epochs", "1"])
    >>> Path(args[1]) == CONFIG_DIR / "dtp.yaml", args[2:]
    (True, ['--trainer.max_epochs', '1'])
    """
    out, it = [], iter(args)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            value = a.split("=", 1)[1] if "=" in a else next(it, None)
            if value is None:
                raise ConfigError("--config needs a file name")
            path = _locate(value, config_dir)
            if path is None:
                raise FileNotFoundError(
                    f"config file {value!r} not found (neither as a path nor in {config_dir}); available: "
                    + ", ".join(available_configs(config_dir))
                )
            _check_yaml(Path(path))
            out += ["--config", path]
        else:
            out.append(a)
    return out
