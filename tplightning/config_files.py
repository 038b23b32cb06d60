"""Where ``--config NAME`` is found: the configs shipped inside the package.

The configs are package data (``tplightning/configs/``), so a bare name such as ``dtp.yaml`` or
``mnist/bp.yaml`` resolves wherever tplightning is installed. ``$TPLIGHTNING_CONFIGS`` names another
folder to look in instead. A value that is an existing path is used as it is; the form of a checkout,
``configs/dtp.yaml``, resolves to the packaged ``dtp.yaml`` when no such path exists.

Every config is checked before jsonargparse reads it, and its size is bounded: a file larger than
:data:`MAX_CONFIG_BYTES` (1 MB) is refused before it is read, and so is one whose YAML aliases (``*name``,
``<<: *name``) would repeat more than :data:`MAX_ALIAS_NODES` nodes once expanded. PyYAML shares the node an
alias names, but jsonargparse copies it wherever it is used, so a few hundred bytes of nested aliases (the
"billion laughs") would otherwise expand to billions of nodes; an alias that names a node containing itself
would never end.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath

import yaml

from .errors import ConfigError, close_matches

__all__ = ["CONFIG_DIR", "MAX_CONFIG_BYTES", "MAX_ALIAS_NODES", "available_configs", "resolve_config_args"]

#: the folder a bare config name is looked up in: ``$TPLIGHTNING_CONFIGS``, else the package's ``configs/``
CONFIG_DIR = Path(os.environ.get("TPLIGHTNING_CONFIGS") or Path(__file__).resolve().parent / "configs")
#: the folder name a config path started with in a checkout before the configs became package data
_OLD_PREFIX = "configs"
#: the largest config file read, in bytes (1 MB; the shipped configs are a few kB)
MAX_CONFIG_BYTES = 1_000_000
#: the most nodes that a config's aliases may add when expanded (each alias counts every node of the value it
#: repeats); a config that reuses a block or two with anchors adds tens
MAX_ALIAS_NODES = 10_000


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The names (relative to ``config_dir``, ``/``-separated) of every YAML config under it, sorted.

    >>> names = available_configs()
    >>> "dtp.yaml" in names and "mnist/bp.yaml" in names
    True
    """
    return sorted(p.relative_to(config_dir).as_posix() for p in config_dir.rglob("*.yaml")) if config_dir.is_dir() else []


def _read_bounded(path: Path) -> bytes:
    """The bytes of ``path``; :class:`ConfigError` naming its size and the limit when it is larger than
    :data:`MAX_CONFIG_BYTES`, told by its size before reading, and by reading at most one byte more than the limit
    for a file that gives no size (a device, a pipe)."""
    size = path.stat().st_size
    limit = f"configs larger than {MAX_CONFIG_BYTES:,} bytes (MAX_CONFIG_BYTES, 1 MB) are refused"
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size:,} bytes; {limit}")
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} gives more than {MAX_CONFIG_BYTES:,} bytes; {limit}")
    return data


def _expanded_size(root: yaml.Node, path: Path) -> tuple[int, int]:
    """``(expanded, distinct)``: the number of nodes of the document under ``root`` with every alias replaced by a
    copy of the node it names, and the number of distinct nodes (an alias is a second reference to one node object
    of the composed graph). Counted once per node with a memo, so a nested alias bomb costs its own size, not its
    expansion; :class:`ConfigError` for an alias inside the node it names (a recursive one, of endless expansion)."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk: children first, then the node's own total
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            size[key] = 1 + sum(size[id(c)] for c in children)
            open_.discard(key)
            continue
        if key in size:
            continue
        if key in open_:
            raise ConfigError(f"config file {path} has a recursive YAML alias (an alias inside the node it names)")
        if isinstance(node, yaml.ScalarNode):
            size[key] = 1
            continue
        open_.add(key)
        stack.append((node, True))
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
        stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)], len(size)


def _check_yaml(path: Path) -> None:
    """:class:`ConfigError` for a config that is a folder, larger than :data:`MAX_CONFIG_BYTES`, not text, not valid
    YAML (naming line and column), nested too deeply, expanded by its aliases by more than :data:`MAX_ALIAS_NODES`
    nodes, or not a mapping of options. The YAML is composed into nodes first (aliases stay references to one
    node) and turned into Python objects only after the alias check."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file")
    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (a YAML config was expected)") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml where PyYAML has it, as jsonargparse's loader
    try:
        root = loader.get_single_node()
        if root is not None:
            expanded, distinct = _expanded_size(root, path)
            if expanded - distinct > MAX_ALIAS_NODES:
                raise ConfigError(
                    f"config file {path}: its YAML aliases expand to {expanded:,} nodes, {expanded - distinct:,} of them "
                    f"repeated; at most {MAX_ALIAS_NODES:,} repeated nodes are accepted (MAX_ALIAS_NODES)"
                )
        doc = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {problem} at {where}") from err
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be read") from None
    finally:
        loader.dispose()
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

    Raises ``FileNotFoundError`` naming the closest config name ("did you mean dtp.yaml?") and listing the available
    configs when the file is found nowhere, and
    :class:`~tplightning.errors.ConfigError` when ``--config`` has no value, the file is larger than
    :data:`MAX_CONFIG_BYTES`, its aliases expand by more than :data:`MAX_ALIAS_NODES` nodes, or it is not a YAML
    mapping (naming the line and column of invalid YAML).

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
                names = available_configs(config_dir)
                parts = PurePath(value).parts
                name = PurePath(*parts[1:]).as_posix() if len(parts) > 1 and parts[0] == _OLD_PREFIX else value
                near = close_matches(name, names)
                raise FileNotFoundError(
                    f"config file {value!r} not found (neither as a path nor in {config_dir}); "
                    + (f"did you mean {near[0]}? " if near else "") + "available: " + ", ".join(names)
                )
            _check_yaml(Path(path))
            out += ["--config", path]
        else:
            out.append(a)
    return out
