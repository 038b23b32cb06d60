"""``torch.Generator`` state that travels through pickle as bytes.

``ddp_spawn`` pickles a rule to send it to its workers, and a generator's state tensor cannot always travel through
shared memory; :func:`pickle_generators` and :func:`restore_generators` turn every generator of an object's
``__dict__`` into bytes and back, for the rules (:class:`~tplightning.rules.state.CheckpointState`) and the layer
selection (:class:`~tplightning.selection.RandomLayer`) alike.
"""
from __future__ import annotations

import torch

__all__ = ["PickledGenerator", "pickle_generators", "restore_generators"]


class PickledGenerator:
    """A generator's device and state as bytes; :meth:`restore` builds the generator again.

    >>> g = torch.Generator().manual_seed(3)
    >>> again = PickledGenerator(g).restore()
    >>> torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=again))
    True
    """

    def __init__(self, generator: torch.Generator):
        self.device, self.state = str(generator.device), bytes(generator.get_state().numpy())

    def restore(self) -> torch.Generator:
        g = torch.Generator(self.device)
        g.set_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
        return g


def pickle_generators(state: dict) -> dict:
    """A copy of ``state`` with every ``torch.Generator`` replaced by its :class:`PickledGenerator`.

    >>> sorted(type(v).__name__ for v in pickle_generators({"g": torch.Generator(), "n": 1}).values())
    ['PickledGenerator', 'int']
    """
    return {k: PickledGenerator(v) if isinstance(v, torch.Generator) else v for k, v in state.items()}


def restore_generators(state: dict) -> dict:
    """The inverse of :func:`pickle_generators`.

    >>> type(restore_generators(pickle_generators({"g": torch.Generator()}))["g"]).__name__
    'Generator'
    """
    return {k: v.restore() if isinstance(v, PickledGenerator) else v for k, v in state.items()}
