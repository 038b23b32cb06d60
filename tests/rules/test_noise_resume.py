"""A resumed run continues each rank's own feedback noise (seeded ``feedback_seed + rank``), not rank 0's.

Ranks are mocked as in tests/test_survivors.py (``rule.trainer`` a namespace with ``global_rank``); the expected
draws are computed here with plain ``torch.Generator``s, never with the rule's own generator.
"""
from __future__ import annotations

import functools
import types

import pytest
import torch

import tplightning as tp

SEED = 11


def _rule(rank: int, world: int, shared: dict | None = None):
    """A DTPAI on a mocked rank (what LightningModule.global_rank and all_gather read under DDP): its all_gather
    records this rank's tensor in ``shared`` and returns every rank's recorded tensor stacked in rank order."""
    rule = tp.DTPAI(sizes=[5, 6, 6, 4], activation="tanh", forward_optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                    feedback_optimizer=functools.partial(torch.optim.SGD, lr=0.01), feedback_noise_std=0.7,
                    feedback_seed=SEED).double()  # fmt: skip
    shared = {} if shared is None else shared

    def all_gather(t, group=None, sync_grads=False):
        shared[rank] = t.clone()
        return torch.stack([shared.get(k, torch.zeros_like(t)) for k in range(world)])

    rule.trainer = types.SimpleNamespace(global_rank=rank, world_size=world, strategy=types.SimpleNamespace(all_gather=all_gather))
    return rule


def _save(ranks: list) -> dict:
    """Every rank saves (rank 0 last, so its gather sees every rank's state); the file keeps rank 0's extra state."""
    for rule in reversed(ranks):
        state = rule.extra_state()
    return state


def _stream(seed: int, skip: int, n: int) -> torch.Tensor:
    """Draws ``skip``..``skip+n`` of shape (3, 6) of a generator seeded ``seed`` (an uninterrupted rank)."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(skip + n)]
    return torch.stack(draws[skip:])


def _draw(rule, n: int) -> torch.Tensor:
    return torch.stack([rule.noise((3, 6)) for _ in range(n)])


def _save_under_ddp(world: int, before: int) -> dict:
    """Ranks ``0..world-1`` each draw ``before`` samples, then save."""
    shared: dict = {}
    ranks = [_rule(r, world, shared) for r in range(world)]
    for rule in ranks:
        _draw(rule, before)
    return _save(ranks)


def test_each_rank_resumes_its_own_noise():
    state = _save_under_ddp(world=3, before=2)
    assert len(state["noise_generators"]) == 3
    resumed = {}
    for r in range(3):
        rule = _rule(r, 3)
        rule.load_extra_state(state)
        resumed[r] = _draw(rule, 2)
        torch.testing.assert_close(resumed[r], _stream(SEED + r, skip=2, n=2), rtol=0, atol=0, msg=f"rank {r}")
    assert not torch.equal(resumed[0], resumed[1]) and not torch.equal(resumed[1], resumed[2])


def test_resave_before_any_draw_keeps_each_rank_state():
    """Saving again right after a resume (no draw in between) keeps every rank's restored state."""
    state = _save_under_ddp(world=2, before=3)
    shared: dict = {}
    ranks = [_rule(r, 2, shared) for r in range(2)]
    for rule in ranks:
        rule.load_extra_state(state)
    again = _save(ranks)
    for r in range(2):
        rule = _rule(r, 2)
        rule.load_extra_state(again)
        torch.testing.assert_close(_draw(rule, 1), _stream(SEED + r, skip=3, n=1), rtol=0, atol=0, msg=f"rank {r}")


def test_single_process_state_is_unchanged():
    """One process: only ``noise_generator``, the generator's own state, as before per-rank states were kept."""
    rule = tp.DTPAI(sizes=[5, 6, 6, 4], feedback_seed=SEED, feedback_optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    assert "noise_generator" not in rule.extra_state()  # nothing drawn yet
    rule.noise((3, 6))
    state = rule.extra_state()
    assert "noise_generators" not in state
    expected = torch.Generator().manual_seed(SEED)
    torch.randn(3, 6, generator=expected)
    assert torch.equal(state["noise_generator"], expected.get_state())


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_one_state_checkpoint_restores_rank0_and_reseeds_the_others(rank):
    """A file with one state (single process or older): rank 0 continues it, rank r > 0 restarts from seed + r."""
    single = _rule(0, 1)
    single.trainer = None
    _draw(single, 4)
    state = single.extra_state()
    assert "noise_generators" not in state
    rule = _rule(rank, 3)
    rule.load_extra_state(state)
    expected = _stream(SEED, skip=4, n=2) if rank == 0 else _stream(SEED + rank, skip=0, n=2)
    torch.testing.assert_close(_draw(rule, 2), expected, rtol=0, atol=0)


def test_ddp_checkpoint_on_more_ranks_reseeds_the_new_ones():
    state = _save_under_ddp(world=2, before=1)
    rule = _rule(3, 4)
    rule.load_extra_state(state)
    torch.testing.assert_close(_draw(rule, 1), _stream(SEED + 3, skip=0, n=1), rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted_run(tmp_path):
    """2 processes (gloo, ddp_spawn): DTPAI's feedback gradients are averaged over the ranks' noise, so a resume that
    gave rank 1 rank 0's noise would end on other weights than 2 uninterrupted epochs."""
    from conftest import fit_ddp_replicas, make_rule, tiny_data
    from tplightning._lightning import pl

    def fit(name, **kw):
        (tmp_path / name).mkdir()
        pl.seed_everything(0)
        rule, dm = make_rule("DTPAI", sizes=(6, 6, 6, 6)), tiny_data(sizes=(6, 6, 6, 6))
        return fit_ddp_replicas(rule, dm, tmp_path / name, **kw)

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)  # every epoch
    whole = fit("whole", max_epochs=2, callbacks=[saver], enable_checkpointing=True)
    first = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(first, weights_only=False)["tplightning"]
    assert len(state["noise_generators"]) == 2 and not torch.equal(*state["noise_generators"])
    resumed = fit("resumed", max_epochs=2, ckpt_path=first)
    for rank in (0, 1):
        for a, b in zip(resumed[rank], whole[rank]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"rank {rank}")
