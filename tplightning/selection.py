"""Layer selections as values: which forward layers a target-propagation step updates (pure torch).

:class:`AllLayers` updates every trainable layer each batch (the TP and DTP rules); :class:`RandomLayer`
draws one uniformly per batch (the randomized rules, Alg. A.2) from a seeded generator whose state a
checkpoint keeps. Under DDP every replica uses the same seed, so all replicas draw the same layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["LayerSelection", "AllLayers", "RandomLayer"]


class LayerSelection:
    """Chooses the layers to update from the trainable ones; ``state``/``load_state`` for checkpoints."""

    def __call__(self, layers: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class AllLayers(LayerSelection):
    """Every trainable layer, every batch."""

    def __call__(self, layers):
        return list(layers)


class RandomLayer(LayerSelection):
    """One layer drawn uniformly per batch (Alg. A.2), from ``torch.Generator().manual_seed(seed)``."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, layers):
        j = int(torch.randint(len(layers), (1,), generator=self.generator))
        return [layers[j]]

    def state(self):
        return {"layer_generator": self.generator.get_state()}

    def load_state(self, state):
        if "layer_generator" in state:
            self.generator.set_state(state["layer_generator"])

    def __getstate__(self):  # bytes, not a state tensor: ddp_spawn pickles the rule through shared memory
        return {"state": bytes(self.generator.get_state().numpy())}

    def __setstate__(self, d):
        self.generator = torch.Generator()
        self.generator.set_state(torch.frombuffer(bytearray(d["state"]), dtype=torch.uint8))
