"""Short, exact error messages for the command line (``train.py``, ``python -m tplightning``).

jsonargparse reports a bad option as a nested tree (union subtypes, ``class_path`` problems,
``Namespace`` dumps) and a constructor's ``ValueError`` arrives wrapped in it. :func:`short_error`
boils that down to a few lines: the option path, the value given, what is expected and, for a
misspelt name, the closest valid one. ``--traceback`` (or ``TPLIGHTNING_TRACEBACK=1``) shows the
full traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Sequence

__all__ = ["ConfigError", "short_error", "close_matches", "accepted_arguments", "HINT"]

_TYPE_WORDS = {"Sequence": "list", "bool": "bool (true or false)", "int": "integer", "str": "string"}  # jsonargparse's types in words
_EXPECTED = {"--seed_everything": "an integer seed, or true or false"}  # options of several types: what they take
HINT = "(add --traceback for the full traceback; --help lists the options, --model.help CLASS a class's)"
_SECTIONS = {"LearningRule": "model", "LightningModule": "model", "LightningDataModule": "data", "Callback": "trainer.callbacks", "Logger": "trainer.logger"}


class ConfigError(ValueError):
    """A configuration that cannot be used: bad YAML, an option that does not exist, a value out of range."""


def close_matches(word: str, candidates, n: int = 1) -> list[str]:
    """The ``n`` closest names: difflib's candidates, ranked by edit distance with transpositions (``DTPIA`` is one
    swap from ``DTPAI`` but two substitutions from ``DTPEI``), ties kept in difflib's order."""
    near = difflib.get_close_matches(word, sorted(set(candidates)), n=max(n, 5), cutoff=0.6)
    return sorted(near, key=lambda c: _edit_distance(word.lower(), c.lower()))[:n]


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and adjacent transpositions."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _import(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def accepted_arguments(cls) -> list[str]:
    """Constructor arguments of ``cls``, following ``**kwargs`` up the class hierarchy as jsonargparse does."""
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        more = False
        for p in params:
            if p.name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.name not in names:
                names.append(p.name)
        if not more:
            break
    return names


def _given(argv: Sequence[str]) -> dict[str, str]:
    """``{option: value}`` of the command line (``--a.b v`` and ``--a.b=v``)."""
    out, args = {}, list(argv)
    for k, a in enumerate(args):
        if not a.startswith("--"):
            continue
        if "=" in a:
            key, value = a.split("=", 1)
            out[key.rstrip("+")] = value
        elif k + 1 < len(args) and not args[k + 1].startswith("--"):
            out[a] = args[k + 1]
    return out


def _leaves(message: str) -> list[str]:
    """The innermost problem lines of a jsonargparse message (structure and dumps dropped)."""
    skip = (
        "Does not validate against any of the Union subtypes",
        "Subtypes:",
        "Errors:",
        "Given value type:",
        "Given value:",
        "Problem with given class_path",
        "Expected a <class 'NoneType'>",
        "Parser key",
        "Expected a path but",
        "Not a valid subclass",
    )
    out = []
    for line in message.splitlines():
        text = line.strip().lstrip("- ").strip()
        if re.search(r'Parser key "[^"]+":$', text):  # a wrapper around the nested problem (a callable's arguments)
            continue
        if text and not text.startswith(skip) and text not in out:
            out.append(text)
    return out


def _section(message: str) -> str | None:
    m = re.search(r'Parser key "([^"]+)"', message)
    if m:
        return m.group(1)
    m = re.search(r"Subtypes: \[[^\]]*?\.(\w+)'>", message)
    return _SECTIONS.get(m.group(1)) if m else None


def _option_path(message: str) -> tuple[str | None, str | None]:
    """(``--a.init_args.b...``, the class whose argument it is) from the nesting of a jsonargparse message."""
    section = _section(message)
    if section is None:
        return None, None
    parts, owner = [section], None
    for m in re.finditer(r"Problem with given class_path '([^']+)'|Parser key \"([^\"]+)\"|class_path='([^']+)'", message):
        class_path, key, inner = m.groups()
        if class_path:
            owner = class_path
        elif key and key != section:
            parts += ["init_args", key]
        elif inner and len(parts) > 1:
            owner = inner
    return "--" + ".".join(parts), owner


def _option_names(parser) -> list[str]:
    """The ``--options`` of ``parser``, with the Trainer's arguments as ``--trainer.*`` where it lists none of them."""
    options = list(getattr(parser, "_option_string_actions", {}) or [])
    if not any(o.startswith("--trainer.") for o in options):
        from ._lightning import pl

        options += ["--trainer." + a for a in accepted_arguments(pl.Trainer)]
    return options


def short_error(err: BaseException, argv: Sequence[str] = (), parser=None) -> str:
    """A few lines for a configuration error: option, value, expectation, close match, and the hint."""
    message = str(err)
    given = _given(argv)
    lines: list[str]
    from ._lightning import ENV_VAR, PACKAGE

    other = {"pytorch_lightning": "lightning", "lightning": "pytorch_lightning"}[PACKAGE]
    foreign = re.search(r"\b(pytorch_lightning|lightning\.pytorch)\.[\w.]+", message)
    foreign_package = {"pytorch_lightning": "pytorch_lightning", "lightning.pytorch": "lightning"}.get(foreign.group(1)) if foreign else None
    if isinstance(err, ConfigError) or isinstance(err, FileNotFoundError) and "config file" in message:
        lines = [f"error: {message}"]
    elif foreign_package == other and "subclass" in message:
        path, _ = _option_path(message)
        lines = [
            f"error: {path or 'a class'}: {foreign.group(0)} belongs to the {other!r} package, but tplightning runs on "
            f"{PACKAGE!r}; the packages 'pytorch_lightning' and 'lightning' cannot be mixed",
            f"  use the short name ({foreign.group(0).rsplit('.', 1)[1]}) or set {ENV_VAR}={other}",
        ]
    elif m := re.search(r"unrecognized arguments: (\S+)", message):
        option = m.group(1).split("=", 1)[0]
        lines = [f"error: unknown option {option}" + (f" (value {given[option]!r})" if option in given else "")]
        if match := close_matches(option, _option_names(parser)):
            lines.append(f"  did you mean {match[0]}?")
    else:
        path, owner = _option_path(message)
        leaves = _leaves(message)
        problem = leaves[0] if leaves else message.splitlines()[0] if message else type(err).__name__
        value = None
        m = re.search(r"Option '([^']+)' is not accepted", message)
        if m and not path:  # a top-level key of a config file that is no option
            name = m.group(1)
            configs = [a for k, a in zip(argv, list(argv)[1:]) if k == "--config"]
            problem = f"a config ({', '.join(configs) or 'given'}) has a top-level key {name!r}, which is no option"
            options = [o[2:] for o in _option_names(parser)]
            near = [o for o in options if o.endswith("." + name)] or close_matches(name, options)
            if near:
                section, _, key = near[0].rpartition(".")
                problem += f"; did you mean {key}: under {section}:?" if section else f"; did you mean {key}:?"
        elif m and path:  # an argument the class does not have
            name = m.group(1)
            path = f"{path}.init_args.{name}" if not path.endswith(name) else path
            value = next((v for k, v in given.items() if k.endswith("." + name)), None)
            cls = _import(owner) if owner else None
            problem = f"{owner or 'the class'} has no argument {name!r}"
            if cls is not None and (match := close_matches(name, accepted_arguments(cls))):
                problem += f"; did you mean {path.rsplit('.', 1)[0]}.{match[0]}?"
            elif cls is not None:
                problem += f"; it accepts: {', '.join(accepted_arguments(cls))}"
        elif m := re.search(r"Expected an instantiatable class, but ([\w.]*) ?is abstract", message):
            from .rules.base import abstract_rule_message

            problem = abstract_rule_message((m.group(1) or given.get(path or "") or "this class").rsplit(".", 1)[-1])
        elif "Subclass types expect one of" in message:  # a scalar or list where a class belongs
            problem = "expected a class path (such as tplightning.DTPAI) or a mapping with class_path: and init_args:"
            value = (re.findall(r"Given value: ([^\n]*)", message) or [None])[-1]
        elif m := re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message):
            module, name = m.groups()
            value = f"{module}.{name}"
            problem = f"{value} does not exist"
            mod = _import(module + ".__name__") and importlib.import_module(module)
            if mod is not None and (match := close_matches(name, [a for a in dir(mod) if not a.startswith("_")])):
                problem += f"; did you mean {module}.{match[0]}?"
        elif m := re.search(r"Expected a <class '(?!NoneType)(?:[\w]+\.)*(\w+)'>(?:\. Got value: ([^\n]*))?", message):
            kind = _TYPE_WORDS.get(m.group(1), m.group(1))
            problem = "expected " + (_EXPECTED.get(path) or f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}")
            value = m.group(2) or given.get(path)
        else:  # a constructor's own check: name the option(s) of the section that the message mentions
            if path and "init_args" not in path:
                hits = [k for k in given if k.startswith(path + ".") and k.rsplit(".", 1)[-1] in problem]
                hits = hits or [k for k in given if k.startswith(path + ".") and len(given[k]) > 2 and repr(given[k]) in problem]
                if hits:
                    path, value = hits[0], given[hits[0]]
        head = f"error: {path}: " if path else "error: "
        lines = [head + problem]
        if value is not None:
            lines.append(f"  given: {value}")
    lines.append(HINT)
    return "\n".join(line[:300] for line in lines)


def is_config_error(err: BaseException) -> bool:
    """Errors that come from the configuration (and print short) rather than from a bug; Lightning's own
    ``MisconfigurationException`` (e.g. ``--trainer.enable_checkpointing false`` beside a configured checkpoint) is one."""
    import importlib

    from ._lightning import pl

    lightning_config_error = importlib.import_module(pl.__name__ + ".utilities.exceptions").MisconfigurationException
    return isinstance(err, (argparse.ArgumentError, ConfigError, ValueError, TypeError, FileNotFoundError, lightning_config_error))
