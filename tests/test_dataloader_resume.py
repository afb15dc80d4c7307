"""Dataloader position: ResumableSampler, StatefulDataLoader with worker processes, and a
training process SIGKILLed mid-epoch whose resumed run matches the uninterrupted one bit for bit."""
from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import async_ckpt as ac
from support.resume import check_resume_is_bit_exact
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


# -- the sampler on its own ------------------------------------------------------------------
@pytest.mark.parametrize("length, world, drop_last", [(10, 1, False), (10, 3, False), (10, 3, True),
                                                       (7, 2, False), (1, 4, False)])
def test_ranks_partition_each_epoch(length, world, drop_last):
    samplers = [ac.ResumableSampler(length, num_replicas=world, rank=r, seed=3, drop_last=drop_last)
                for r in range(world)]
    for epoch in range(2):
        shares = [s.epoch_indices(epoch) for s in samplers]
        assert len({len(x) for x in shares}) == 1 and len(shares[0]) == len(samplers[0])
        together = [i for share in shares for i in share]
        if drop_last:
            assert len(set(together)) == len(together) == (length // world) * world
        else:
            assert set(together) == set(range(length))          # padding repeats, never loses
    assert samplers[0].epoch_indices(0) != samplers[0].epoch_indices(1) or length < 3


def test_shuffle_is_a_function_of_seed_and_epoch():
    a, b = ac.ResumableSampler(50, seed=1), ac.ResumableSampler(50, seed=1)
    assert a.epoch_indices(4) == b.epoch_indices(4)
    assert a.epoch_indices(4) != ac.ResumableSampler(50, seed=2).epoch_indices(4)
    assert ac.ResumableSampler(50, shuffle=False).epoch_indices(3) == list(range(50))


def test_epochs_advance_by_themselves_and_set_epoch_keeps_a_restored_position():
    s = ac.ResumableSampler(6, seed=0)
    first, second = list(s), list(s)
    assert first == s.epoch_indices(0) and second == s.epoch_indices(1) and s.epoch == 1
    it = iter(s)
    taken = [next(it), next(it)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["yielded"] == 2
    resumed = ac.ResumableSampler(6, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                          # an epoch loop calling set_epoch as usual
    assert taken + list(resumed) == s.epoch_indices(2)
    resumed.set_epoch(5)
    assert list(resumed) == s.epoch_indices(5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset=object()), "map-style dataset"),
    (dict(dataset=5, num_replicas=0), "num_replicas must be an integer >= 1"),
    (dict(dataset=5, num_replicas=2, rank=2), "rank 2 must be < num_replicas 2"),
    (dict(dataset=5, seed=-1), "seed must be an integer >= 0"),
    (dict(dataset=-3), "dataset length must be an integer >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ac.InvalidArgumentError, match=match):
        ac.ResumableSampler(kwargs.pop("dataset"), **kwargs)


def test_refuses_a_position_from_another_configuration():
    state = ac.ResumableSampler(10, seed=1).state_dict()
    with pytest.raises(ac.InvalidArgumentError, match=r"seed: saved 1, now 2"):
        ac.ResumableSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ac.InvalidArgumentError, match=r"length: saved 10, now 11"):
        ac.ResumableSampler(11, seed=1).load_state_dict(state)


def test_plain_dataloader_without_workers_resumes_from_the_sampler(tmp_path):
    """num_workers=0: nothing is prefetched, so the sampler's position is the consumed one."""
    def make():
        s = ac.ResumableSampler(20, seed=4)
        return s, torch.utils.data.DataLoader(Indexed(20), batch_size=3, sampler=s)

    sampler, loader = make()
    comps = [ac.StateComponent("sampler", sampler, ac.SharingPattern.PER_RANK)]
    full, it = [], iter(loader)
    with ac.AsyncCheckpointer(tmp_path, comps) as ckpt:
        for step in range(5):
            full.append(next(it).tolist())
            if step == 2:
                ckpt.save(step)
        full += [b.tolist() for b in it]
    sampler2, loader2 = make()
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("sampler", sampler2, ac.SharingPattern.PER_RANK)]) as ckpt:
        ckpt.load(2)
    assert [b.tolist() for b in loader2] == full[3:]


# -- StatefulDataLoader with worker processes ----------------------------------------------------
def stateful_loader(workers: int = 2):
    sampler = ac.ResumableSampler(20, seed=7)
    return StatefulDataLoader(Indexed(20), batch_size=4, sampler=sampler, num_workers=workers,
                              generator=torch.Generator().manual_seed(0))


def take(loader, n):
    """n batches across epoch ends, as a step-based training loop reads them."""
    out, it = [], iter(loader)
    while len(out) < n:
        try:
            out.append(next(it).tolist())
        except StopIteration:
            it = iter(loader)
    return out


@pytest.mark.parametrize("consumed", [2, 5, 7])   # mid-epoch, exactly at the epoch end, next epoch
def test_stateful_dataloader_with_workers_resumes_through_a_checkpoint(tmp_path, consumed):
    loader = stateful_loader()
    comps = [ac.StateComponent("data", loader, ac.SharingPattern.PER_RANK)]
    with ac.AsyncCheckpointer(tmp_path, comps) as ckpt:
        seen = take(loader, consumed)     # workers have prefetched beyond this point
        ckpt.save(consumed).wait()
    reference = take(stateful_loader(), consumed + 6)
    assert seen == reference[:consumed]
    resumed = stateful_loader()
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("data", resumed, ac.SharingPattern.PER_RANK)]) as ckpt:
        ckpt.load()
    assert take(resumed, 6) == reference[consumed:]


# -- a real crash --------------------------------------------------------------------------------
@pytest.mark.crash
def test_killed_mid_epoch_resumes_bit_exact(tmp_path):
    """One process, StatefulDataLoader with 2 workers, SIGKILLed at step 15 of 26."""
    check_resume_is_bit_exact(tmp_path, world=1)
