"""Checkpoint plumbing shared by the rules: state outside parameters and optimizers, and pickling of generators.

A resumed run must continue exactly as an uninterrupted one, so every counter and random generator a
rule owns goes into the checkpoint (``checkpoint["tplightning"]``) through :meth:`CheckpointState.extra_state`;
subclasses add their own entries and call ``super()``.
"""
from __future__ import annotations

from ..generators import pickle_generators, restore_generators

__all__ = ["CheckpointState"]


class CheckpointState:
    """Mixin for a ``LightningModule``: extra state in checkpoints (the training batches seen so far, and what
    subclasses add) and picklable generators.

    >>> import tplightning as tp
    >>> rule = tp.RDTPAI(sizes=[3, 4, 2])
    >>> sorted(rule.extra_state())
    ['batches_seen', 'layer_generator']
    """

    #: training batches, saved in checkpoints (Lightning's ``global_step`` counts them too, one optimizer step per batch,
    #: except with a gradient scaler: see docs/guide.md, 'Trainer features under manual optimization')
    batches_seen: int = 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.batches_seen += 1

    def extra_state(self) -> dict:
        """State outside parameters/buffers/optimizers that a resumed run needs."""
        return {"batches_seen": self.batches_seen}

    def load_extra_state(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))

    def __getstate__(self) -> dict:
        """Pickle generators as bytes (:mod:`tplightning.generators`): ddp_spawn sends the module to its workers."""
        return pickle_generators(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(restore_generators(state))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tplightning"] = self.extra_state()
        checkpoint["tplightning"]["class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"  # read by tplightning.load

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_extra_state(checkpoint.get("tplightning", {}))
