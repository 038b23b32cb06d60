"""The contract every rule keeps: the same tests, subclassed per rule (``rule_name``)."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import tplightning as tp
from conftest import make_rule, quiet_trainer, tiny_data, weights_of


class RuleContract:
    rule_name: ClassVar[str]

    def test_forward_weights_are_live_and_shaped(self):
        rule = make_rule(self.rule_name, sizes=(5, 6, 6, 6))
        Ws = rule.forward_weights
        assert [tuple(W.shape) for W in Ws] == [(6, 5), (6, 6), (rule.output_dim, 6)]
        assert rule.output_dim == 6
        with torch.no_grad():
            Ws[0].mul_(0)
        assert rule.net.weights[0].abs().sum() == 0  # the same tensors, not copies

    def test_training_changes_weights_and_stays_finite(self):
        rule, dm = make_rule(self.rule_name), tiny_data()
        before = [W.clone() for W in rule.forward_weights]
        quiet_trainer(max_epochs=2).fit(rule, datamodule=dm)
        after = rule.forward_weights
        assert all(torch.isfinite(W).all() for W in after)
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
        assert rule.batches_seen == 2 * 8

    def test_checkpoint_round_trip(self, tmp_path):
        rule, dm = make_rule(self.rule_name), tiny_data()
        trainer = quiet_trainer(max_epochs=1)
        trainer.fit(rule, datamodule=dm)
        path = tmp_path / "rule.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(rule).load_from_checkpoint(path)
        x = torch.randn(4, 6)
        torch.testing.assert_close(loaded(x), rule(x))
        for a, b in zip(weights_of(loaded), weights_of(rule)):
            torch.testing.assert_close(a, b)

    def test_validation_and_test_metrics(self):
        rule, dm = make_rule(self.rule_name), tiny_data()
        trainer = quiet_trainer(max_epochs=1)
        trainer.fit(rule, datamodule=dm)
        (res,) = trainer.test(rule, datamodule=dm, verbose=False)
        dm.setup("test")
        x, y = dm.test_data.x, dm.test_data.y
        with torch.no_grad():
            expected = torch.nn.functional.mse_loss(rule(x), y)  # independent of torchmetrics
        assert res["test/mse"] == pytest.approx(float(expected), rel=1e-5)


class TargetPropContract(RuleContract):
    def test_compute_targets_shapes_and_no_side_effects(self):
        rule = make_rule(self.rule_name, sizes=(6, 6, 6, 6))
        x, y = torch.randn(5, 6), torch.randn(5, 6)
        before = weights_of(rule)
        hs, targets = rule.compute_targets(x, y)
        assert len(hs) == 4 and len(targets) == 3
        assert all(t.shape == h.shape and t.shape[0] == 5 for t, h in zip(targets, hs[1:]))
        eta, out = rule.target_stepsize, hs[-1][:, :6]  # AOSDTP's auxiliary outputs follow the model's 6
        torch.testing.assert_close(targets[-1][:, :6], out - eta * (out - y))  # eq. 4.4 for mse
        for a, b in zip(before, weights_of(rule)):
            assert torch.equal(a, b)

    def test_layer_draw_is_reproducible(self):
        a, b = make_rule(self.rule_name, layer_seed=3), make_rule(self.rule_name, layer_seed=3)
        assert [a.draw_layer() for _ in range(20)] == [b.draw_layer() for _ in range(20)]

    def test_bad_target_stepsize(self):
        with pytest.raises(ValueError, match="target_stepsize must be > 0"):
            make_rule(self.rule_name, target_stepsize=0.0)


def _contract(name: str) -> type:
    base = RuleContract if name in ("BP", "BPFixed", "GaussNewton") else TargetPropContract
    return type(f"Test{name}Contract", (base,), {"rule_name": name})


for _name in ("BP", "BPFixed", "TPEI", "RTPEI", "RMTPEI", "TPAI", "RTPAI", "DTPAI", "RDTPAI", "OriginalTP",
              "OriginalRTP", "OriginalDTP", "OriginalRDTP", "LeeDTP", "AOSDTP", "MTP", "FA", "DFA", "BDFA", "USF", "BRSF", "FRSF", "KP", "WM", "DRL", "DDTPLinear",
              "LDRL", "GaussNewton",
              "FWDTP", "CCL"):
    globals()[f"Test{_name}Contract"] = _contract(_name)


def test_every_exported_rule_has_contract_tests():
    from conftest import RULES

    exported = {n for n in tp.__all__ if isinstance(getattr(tp, n), type) and issubclass(getattr(tp, n), tp.LearningRule)}
    abstract = {"LearningRule", "TargetPropRule", "ExactInverseRule", "LearnedInverseRule"}
    assert exported - abstract == set(RULES)
