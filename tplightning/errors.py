"""Which errors are the user's, and their short form on the command line.

An error is the user's by its type, never by its wording: an argument error of the parser
(:class:`argparse.ArgumentError`, which jsonargparse raises), our :class:`ConfigError` (raised by the
option checks of constructors, data modules and the CLI), Lightning's ``MisconfigurationException``
and a ``FileNotFoundError`` while the run is being built (a config or checkpoint path). Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
from collections.abc import Iterable

__all__ = ["ConfigError", "MissingDataError", "close_matches", "accepted_arguments", "exception_chain", "short_message", "HINT"]

HINT = "(add --traceback for the full traceback; --help lists the options, --model.help CLASS a class's)"


class ConfigError(ValueError):
    """A configuration that cannot be used: a value out of range, a file that is no config or checkpoint.

    A ``ValueError``, so code that catches ``ValueError`` keeps working. ``option`` (``"--model.init_args.sizes"``)
    and ``given`` (the value), when known, are printed with the message; the CLI fills them in for an error raised by a
    constructor it calls.

    >>> str(ConfigError("target_stepsize must be > 0, got -1"))
    'target_stepsize must be > 0, got -1'
    >>> isinstance(ConfigError("x"), ValueError)
    True
    """

    def __init__(self, message: str, option: str | None = None, given=None):
        super().__init__(message)
        self.option, self.given = option, given


class MissingDataError(ConfigError, FileNotFoundError):
    """Files that the configuration points at (a data set's) are missing: a ``FileNotFoundError`` reported short.

    >>> isinstance(MissingDataError("MNIST files missing from /tmp/x"), (ConfigError, FileNotFoundError))
    True
    """


def close_matches(word: str, candidates: Iterable[str], n: int = 1) -> list[str]:
    """The ``n`` candidates closest to ``word``: difflib's, ranked by edit distance with adjacent transpositions.

    >>> close_matches("DTPIA", ["DTPAI", "DTPEI", "BP"])
    ['DTPAI']
    >>> close_matches("zzz", ["DTPAI"])
    []
    """
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


def accepted_arguments(cls) -> list[str]:
    """Constructor arguments of ``cls``, following ``**kwargs`` up the class hierarchy as jsonargparse does.

    >>> class A:
    ...     def __init__(self, a, b=1): ...
    >>> class B(A):
    ...     def __init__(self, c, **kwargs): ...
    >>> accepted_arguments(B)
    ['c', 'a', 'b']
    """
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
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.name != "self" and p.kind is not p.VAR_POSITIONAL and p.name not in names:
                names.append(p.name)
        if not more:
            break
    return names


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first.

    >>> try:
    ...     try:
    ...         raise KeyError("inner")
    ...     except KeyError as e:
    ...         raise ValueError("outer") from e
    ... except ValueError as e:
    ...     [type(x).__name__ for x in exception_chain(e)]
    ['ValueError', 'KeyError']
    """
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _misconfiguration() -> type:
    from ._lightning import pl

    return importlib.import_module(pl.__name__ + ".utilities.exceptions").MisconfigurationException


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return (text.strip().splitlines() or [type(err).__name__])[0].strip()


def _parser_path(chain: list[BaseException]) -> tuple[str | None, str | None]:
    """(``--a.init_args.b``, the class whose argument ``b`` is, if known) from the key or class path that jsonargparse
    puts first in each of its nested errors (``Parser key "a":``, ``Problem with given class_path 'c':``)."""
    keys, owner, owner_level = [], None, -1
    for link in chain:
        head = _first_line(link)
        if head.startswith('Parser key "') and head.count('"') >= 2:
            key = head.split('"')[1]
            if not keys or keys[-1] != key:
                keys.append(key)
        elif head.startswith("Problem with given class_path '") and head.count("'") >= 2:
            owner, owner_level = head.split("'")[1], len(keys)
    return ("--" + ".init_args.".join(keys) if keys else None), (owner if owner_level == len(keys) else None)


def _class(path: str | None):
    module, _, name = (path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _given(argv: list[str]) -> dict[str, str | None]:
    """``{option: value}`` of the command line (``--a.b v`` and ``--a.b=v``; ``None`` for a flag without value)."""
    out = {}
    for k, a in enumerate(argv):
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            out[key] = value if eq else argv[k + 1] if k + 1 < len(argv) and not argv[k + 1].startswith("--") else None
    return out


def _unrecognized(err: BaseException) -> str | None:
    """``a.b`` of the first ``unrecognized arguments: --a.b=v`` (the option as the nested parser of a class saw it, its
    prefix removed), else ``None``."""
    head = _first_line(err)
    if not head.startswith("unrecognized arguments: --"):
        return None
    return head[len("unrecognized arguments: --"):].split()[0].partition("=")[0]


def _argument_error(chain: list[BaseException], argv: list[str], known: list[str], config_keys: list[str]) -> list[str]:
    path, owner = _parser_path(chain)
    innermost, given = chain[-1], _given(argv)
    lines = [f"error: {path + ': ' if path else ''}{_first_line(innermost)}"]
    if isinstance(innermost, AttributeError) and innermost.name and inspect.ismodule(innermost.obj):  # no such class
        names = [n for n in dir(innermost.obj) if not n.startswith("_")]
        if match := close_matches(innermost.name, names):
            lines.append(f"  did you mean {innermost.obj.__name__}.{match[0]}?")
    elif isinstance(innermost, KeyError) and path and owner:  # an argument the class does not have
        names = accepted_arguments(_class(owner))
        for key, value in given.items():
            prefix, _, name = key.rpartition(".init_args.")
            if "--" + prefix == path and name not in names:
                lines = [f"error: --{key}: {owner} has no argument {name!r}"]
                if match := close_matches(name, names):
                    lines.append(f"  did you mean --{prefix}.init_args.{match[0]}?")
                if value is not None:
                    lines.append(f"  given: {value}")
    elif path and (unknown := _unrecognized(innermost)):  # an option under a nested class, reported as given
        key = path[2:] + "." + unknown
        lines = [f"error: --{key}: no such option"]
        index, _, rest = unknown.partition(".")
        if index.isdigit() and rest.startswith("init_args.") and rest[len("init_args."):] in accepted_arguments(_class(owner)):
            lines.append(f"  an index cannot pick an item of {path}: {path}.{rest} sets it for the last item ({owner}); "
                         f"to change another item, give the whole list in a config file")  # fmt: skip
        if given.get(key) is not None:
            lines.append(f"  given: {given[key]}")
    elif not path:  # an option or config key the parser does not know: the close matches among those it knows
        for key in [*given, *config_keys]:
            if key in known or any(key.startswith(k + ".") or k.startswith(key + ".") for k in known):
                continue
            match = [k for k in known if k.endswith("." + key)] or close_matches(key, known)
            if match and key in given:
                lines.append(f"  did you mean --{match[0]}?")
            elif match:
                section, _, name = match[0].rpartition(".")
                lines.append(f"  a config has the top-level key {key!r}; did you mean {name}: under {section}:?" if section
                             else f"  a config has the top-level key {key!r}; did you mean {name}:?")  # fmt: skip
    for key, value in given.items():  # a base class given as the rule, which the parser refuses as abstract
        cls = _class(value if value and "." in value else f"tplightning.{value}")
        if isinstance(cls, type) and inspect.isabstract(cls) and hasattr(cls, "configure_optimizers"):
            from .rules.base import abstract_rule_message

            lines = [f"error: --{key}: {abstract_rule_message(cls.__name__)}"]
    from ._lightning import ENV_VAR, PACKAGE, package_of

    for value in given.values():  # a class of the other Lightning package, which the parser refuses as no subclass
        cls = _class(value) if value and "." in value else None
        if isinstance(cls, type) and (other := package_of(cls)) not in (None, PACKAGE):
            lines.append(f"  {value} belongs to the {other!r} package, but tplightning runs on {PACKAGE!r}; the packages "
                         f"'pytorch_lightning' and 'lightning' cannot be mixed: use the short name ({cls.__name__}) or set {ENV_VAR}={other}")  # fmt: skip
    return lines


def short_message(err: BaseException, argv: Iterable[str] = (), known_options: Iterable[str] = (), config_keys: Iterable[str] = (),
                  building: bool = True) -> str | None:  # fmt: skip
    """The few lines to print for a user's error, ``None`` for any other (a bug: it keeps its traceback).

    ``building``: the error came while the run was being built (parsing, instantiating, checking a checkpoint), where a
    missing file or Lightning's ``MisconfigurationException`` is the user's too. ``known_options`` (the parser's
    options, ``trainer.max_epochs``) and ``config_keys`` (the top-level keys of the config files) give the close match
    of an unknown option or key.

    >>> print(short_message(ConfigError("batch sizes must be >= 1, got 0", option="--data.init_args.batch_size")))
    error: --data.init_args.batch_size: batch sizes must be >= 1, got 0
    (add --traceback for the full traceback; --help lists the options, --model.help CLASS a class's)
    >>> short_message(TypeError("unsupported operand")) is None
    True
    """
    argv, chain = list(argv), exception_chain(err)
    # a ConfigError counts where the error was raised from it (``raise ... from``, as jsonargparse wraps one), not where
    # another error merely happened while one was being handled: that one is a bug and keeps its traceback
    raised_from = [err]
    while raised_from[-1].__cause__ is not None and raised_from[-1].__cause__ not in raised_from:
        raised_from.append(raised_from[-1].__cause__)
    config = next((e for e in raised_from if isinstance(e, ConfigError)), None)
    if isinstance(err, argparse.ArgumentError) and config is None:
        lines = _argument_error(chain, argv, list(known_options), list(config_keys))
    elif config is not None and (config is err or isinstance(err, (ValueError, TypeError))):  # jsonargparse wraps it
        lines = [f"error: {config.option + ': ' if config.option else ''}{config}"]
        if config.given is not None:
            lines.append(f"  given: {config.given}")
    elif building and isinstance(err, (FileNotFoundError, _misconfiguration())):
        lines = [f"error: {err}"]
    else:
        return None
    lines.append(HINT)
    return "\n".join(_whole_words(line) for line in lines)


#: the longest line :func:`short_message` prints whole; a longer one (a huge value given on the command line) ends at
#: the last space before it, with the number of characters left out
MAX_LINE = 2000


def _whole_words(line: str, limit: int = MAX_LINE) -> str:
    """``line`` itself when it has at most ``limit`` characters, else its words up to the limit and how much is left out:
    a line is never cut inside a word (a path, a cause, a config name stays whole or is left out whole).

    >>> _whole_words("a b c", limit=10)
    'a b c'
    >>> _whole_words("alpha beta gamma delta", limit=12)
    'alpha beta ... (12 more characters; --traceback shows them)'
    """
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit + 1)
    cut = cut if cut > 0 else limit
    return f"{line[:cut]} ... ({len(line) - cut} more characters; --traceback shows them)"

