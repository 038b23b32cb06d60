"""Layer selections as values: which forward layers a target-propagation step updates (pure torch).

:class:`AllLayers` updates every trainable layer each batch (the TP and DTP rules); :class:`RandomLayer`
draws one uniformly per batch (the randomized rules, Alg. A.2) from a seeded generator whose state a
checkpoint keeps. Under DDP every replica uses the same seed, so all replicas draw the same layer.

>>> from tplightning.selection import AllLayers, RandomLayer
>>> AllLayers()([1, 2, 3]), len(RandomLayer(seed=0)([1, 2, 3]))
([1, 2, 3], 1)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["LayerSelection", "AllLayers", "RandomLayer"]


class LayerSelection:
    """Chooses the layers to update from the trainable ones; ``state``/``load_state`` for checkpoints.

    A subclass implements ``__call__(layers)``: given the 1-based indices of the trainable layers, it returns
    those to update on this batch. ``state()`` returns what a checkpoint must keep to resume the same choices
    (a dict merged into the rule's extra state), ``load_state(state)`` restores it; both do nothing here.

    >>> class TopLayer(LayerSelection):
    ...     def __call__(self, layers):
    ...         return [max(layers)]
    >>> TopLayer()([1, 2, 3]), TopLayer().state()
    ([3], {})
    """

    def __call__(self, layers: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps (nothing here)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned (nothing here)."""
        pass


class AllLayers(LayerSelection):
    """Every trainable layer, every batch (the non-randomized rules, e.g. Alg. A.10).

    >>> AllLayers()([1, 3])
    [1, 3]
    """

    def __call__(self, layers):
        return list(layers)


class RandomLayer(LayerSelection):
    """One layer drawn uniformly per batch (Alg. A.2), from ``torch.Generator().manual_seed(seed)``.

    Alg. A.2 draws ``k`` from all layers ``1..L``; we draw from the layers the rule trains (its
    ``train_layers``, all of them by default), so a frozen layer is never drawn. The generator's state goes
    into checkpoints (:meth:`state`) and survives pickling, so a resumed or spawned run draws the same
    sequence.

    Args:
        seed: seed of the layer draws.

    >>> select = RandomLayer(seed=0)
    >>> [select([1, 2, 3])[0] for _ in range(6)]
    [3, 1, 3, 1, 2, 1]
    >>> saved = select.state()
    >>> first = select([1, 2, 3])
    >>> select.load_state(saved)
    >>> select([1, 2, 3]) == first
    True
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, layers):
        j = int(torch.randint(len(layers), (1,), generator=self.generator))
        return [layers[j]]

    def state(self):
        """``{"layer_generator": state}``: the generator's state, for the rule's checkpoint."""
        return {"layer_generator": self.generator.get_state()}

    def load_state(self, state):
        """Restore the generator from :meth:`state`'s dict (a dict without the key leaves it as it is)."""
        if "layer_generator" in state:
            self.generator.set_state(state["layer_generator"])

    def __getstate__(self):  # bytes, not a state tensor: ddp_spawn pickles the rule through shared memory
        return {"state": bytes(self.generator.get_state().numpy())}

    def __setstate__(self, d):
        self.generator = torch.Generator()
        self.generator.set_state(torch.frombuffer(bytearray(d["state"]), dtype=torch.uint8))
