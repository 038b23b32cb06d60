"""Passing a rule's constructor arguments on to the constructor of its base, so that each class can declare an explicit
signature (every argument with its default, for ``help()``, IDEs and the CLI) without repeating the call."""
from __future__ import annotations

import inspect
from collections.abc import Callable

__all__ = ["arguments_for"]


def arguments_for(init: Callable, values: dict) -> dict:
    """The entries of ``values`` (a constructor's ``locals()``) that ``init`` takes by name, in its order.

    >>> def base(sizes, *, target_stepsize=0.1):
    ...     pass
    >>> arguments_for(base, {"self": None, "sizes": [3, 2], "target_stepsize": 1.0, "feedback_seed": 0})
    {'sizes': [3, 2], 'target_stepsize': 1.0}
    """
    return {name: values[name] for name in inspect.signature(init).parameters if name in values}
