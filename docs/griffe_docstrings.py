"""A griffe extension for the API pages: the package's docstrings are written for ``help()`` and Sphinx-style roles, the
site renders them as Markdown. Two rewrites, on the docstring text only (the code is untouched):

* each run of ``>>>`` example lines (with its ``...`` continuations and printed output, up to a blank line) becomes a
  fenced ``pycon`` block, so it shows as code and its output (``[0.0, 0.0]``) is not read as a Markdown link;
* a Sphinx role ``:class:`~tplightning.layers.Dense``` becomes inline code (```Dense```).

The examples themselves are run by pytest's ``--doctest-modules``, not by the site's tests.
"""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`~?([^`]+)`")


def _short(match: re.Match) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else target
    return f"``{shown}``"


def fence_examples(text: str) -> str:
    """Wrap every run of ``>>>`` lines and their output in a ``pycon`` fence, keeping the run's indentation.

    >>> fence_examples("Add:\\n\\n>>> 1 + 1\\n2\\n\\nDone.").split("\\n")
    ['Add:', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'Done.']
    """
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Rewrite each docstring once, when griffe loads its object."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_examples(ROLE.sub(_short, obj.docstring.value))
