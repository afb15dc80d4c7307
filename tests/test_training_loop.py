"""The loop of docs/training.md, end to end in one process: every component of this issue in one
checkpoint, a loss spike rolled back, and a restart that continues exactly where the run ended."""
from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import async_ckpt as ac

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        x = torch.full((4,), float(i) / 24)
        return x, x.sum(0, keepdim=True)


def run(root, total_steps, spike_at=()):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sampler = ac.ResumableSampler(Data(), seed=0)
    loader_gen = torch.Generator().manual_seed(0)
    loader = StatefulDataLoader(Data(), batch_size=4, sampler=sampler, generator=loader_gen)
    schedule = ac.TrainingSchedule(save_every=5, eval_every=10, eval_on_save=True)
    components = [
        ac.StateComponent("model", model, ac.SharingPattern.GLOBAL),
        ac.StateComponent("optimizer", optimizer, ac.SharingPattern.GLOBAL),
        ac.StateComponent("rng", ac.RNGState({"loader": loader_gen}), ac.SharingPattern.PER_RANK),
        ac.StateComponent("data", loader, ac.SharingPattern.PER_RANK),
        ac.StateComponent("schedule", schedule, ac.SharingPattern.GLOBAL),
    ]
    ckpt = ac.AsyncCheckpointer(root, lambda: components, keep_last=2, keep_best=1,
                                best_metric="val_loss", keep_every=10)
    monitor = ac.DivergenceMonitor(ac.EMADetector(2, 8, threshold=1.0, warmup=4), "rollback",
                                   checkpointer=ckpt)
    components.append(ac.StateComponent("divergence", monitor, ac.SharingPattern.GLOBAL))

    def forever(loader):
        while True:
            yield from loader

    losses, events, skipped = {}, [], set()
    info = ckpt.load()
    step = 0 if info is None else info.step
    batches = forever(loader)
    while step < total_steps:
        step += 1
        x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # a corrupted batch: the loss the monitor sees explodes, once per step number
        value = loss.item() + (100.0 if step in spike_at and step not in skipped else 0.0)
        event = monitor.update(step, value)
        if event is not None:
            events.append(event)
            if event.action == "rollback":
                skipped.update(spike_at)
                step = event.restored.step
                batches = forever(loader)
                continue
            break
        losses[step] = loss.item()
        due = schedule.due(step)
        if due.save:
            ckpt.save(step, metrics={"val_loss": loss.item()} if due.eval else None)
    ckpt.close()
    return losses, events, ckpt


def test_documented_loop_rolls_back_and_resumes(tmp_path):
    reference, none, _ = run(tmp_path / "ref", 30)
    assert none == []
    losses, events, ckpt = run(tmp_path / "run", 22, spike_at={17})
    [event] = events
    assert event.step == 17 and event.restored.step == 15 and event.discarded == ()
    # after the rollback the run replays 16..22 from the restored state: same losses as the
    # run that never saw the spike
    assert all(losses[s] == reference[s] for s in losses)
    infos = ckpt.list_checkpoints()
    assert [i.step for i in infos] == [10, 15, 20]                     # keep_every, last 2
    assert all("val_loss" in i.metrics for i in infos)                 # eval_on_save
    resumed, events, _ = run(tmp_path / "run", 30)                     # restart
    assert events == [] and min(resumed) == 21
    assert all(resumed[s] == reference[s] for s in resumed)
