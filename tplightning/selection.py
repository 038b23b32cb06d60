"""Layer selections as values: which forward layers a target-propagation step updates (pure torch).

:class:`AllLayers` updates every trainable layer each batch (the TP and DTP rules); :class:`RandomLayer`
draws one uniformly per batch (the randomized rules, Alg. A.2) from a seeded generator whose state a
checkpoint keeps. Under DDP every replica uses the same seed, so all replicas draw the same layer.

>>> from tplightning.selection import AllLayers, RandomLayer
>>> AllLayers()([1, 2, 3]), len(RandomLayer(seed=0)([1, 2, 3]))
([1, 2, 3], 1)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from .generators import pickle_generators, restore_generators

__all__ = ["LayerSelection", "AllLayers", "RandomLayer"]


class LayerSelection(ABC):
    """Chooses the layers to update from the trainable ones; ``state``/``load_state`` for checkpoints.

    Args:
        seed: seed of the selection's generator (selections that draw nothing ignore it).

    A selection is abstract; :class:`AllLayers` and :class:`RandomLayer` are the two:

    >>> AllLayers().drawn([1, 2])
    0
    """

    def __init__(self, seed: int = 0):
        pass

    @abstractmethod
    def __call__(self, layers: Sequence[int]) -> list[int]:
        """The layers to update this batch, from the trainable ``layers``."""

    def drawn(self, chosen: Sequence[int]) -> int:
        """The layer a step of this selection reports as updated (``0``: every layer)."""
        return 0

    def state(self) -> dict:
        """What a checkpoint keeps (nothing here)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned (nothing here)."""
        pass


class AllLayers(LayerSelection):
    """Every trainable layer, every batch.

    >>> AllLayers()([1, 2, 3])
    [1, 2, 3]
    """

    def __call__(self, layers):
        return list(layers)


class RandomLayer(LayerSelection):
    """One layer drawn uniformly per batch (Alg. A.2), from ``torch.Generator().manual_seed(seed)``.

    >>> select = RandomLayer(seed=0)
    >>> chosen = select([1, 2, 3])
    >>> len(chosen), select.drawn(chosen) == chosen[0]
    (1, True)
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, layers):
        j = int(torch.randint(len(layers), (1,), generator=self.generator))
        return [layers[j]]

    def drawn(self, chosen):
        return chosen[0]

    def state(self):
        """``{"layer_generator": state}``: the generator's state, for the rule's checkpoint."""
        return {"layer_generator": self.generator.get_state()}

    def load_state(self, state):
        """Restore the generator from :meth:`state`'s dict (a dict without the key leaves it as it is)."""
        if "layer_generator" in state:
            self.generator.set_state(state["layer_generator"])

    def __getstate__(self):  # bytes, not a state tensor: ddp_spawn pickles the rule through shared memory
        return pickle_generators(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(restore_generators(state))
