"""Checkpoint plumbing shared by the rules: state outside parameters and optimizers, and pickling of generators.

A resumed run must continue exactly as an uninterrupted one, so every counter and random generator a
rule owns goes into the checkpoint (``checkpoint["tplightning"]``) through :meth:`CheckpointState.extra_state`;
subclasses add their own entries and call ``super()``.
"""
from __future__ import annotations

import torch

__all__ = ["CheckpointState"]


class _PickledGenerator:
    def __init__(self, device: str, state: bytes):
        self.device, self.state = device, state

    def restore(self) -> torch.Generator:
        g = torch.Generator(self.device)
        g.set_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
        return g


class CheckpointState:
    """Mixin for a ``LightningModule``: extra state in checkpoints and picklable generators."""

    def extra_state(self) -> dict:
        """State outside parameters/buffers/optimizers that a resumed run needs."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def __getstate__(self) -> dict:
        """Pickle generators as bytes: ddp_spawn sends the module to its workers, and a
        ``torch.Generator``'s state tensor cannot always travel through shared memory."""
        state = self.__dict__.copy()
        for k, v in state.items():
            if isinstance(v, torch.Generator):
                state[k] = _PickledGenerator(str(v.device), bytes(v.get_state().numpy()))
        return state

    def __setstate__(self, state: dict) -> None:
        state = {k: v.restore() if isinstance(v, _PickledGenerator) else v for k, v in state.items()}
        super().__setstate__(state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tplightning"] = self.extra_state()
        checkpoint["tplightning"]["class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"  # read by tplightning.load

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_extra_state(checkpoint.get("tplightning", {}))
