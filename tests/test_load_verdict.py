"""load() never leaves state half-restored without saying so: every check that can fail runs
before the first load_state_dict (module keys and shapes, a component's check_state_dict), and a
load_state_dict that still raises names what was restored and what was not."""
from __future__ import annotations

import pytest
import torch

import async_ckpt as ac
from async_ckpt import PartialLoadError
from support.stateful import Box

G = ac.SharingPattern.GLOBAL


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class Refusing(Box):
    """A Stateful with a check_state_dict hook, as ResumableSampler has."""

    def check_state_dict(self, state):
        if state.get("version") != 2:
            raise ValueError(f"saved by version {state.get('version')}, this code reads version 2")


class Exploding(Box):
    def load_state_dict(self, sd):
        raise RuntimeError("load_state_dict exploded on purpose")


def test_a_component_refusing_its_state_fails_the_load_before_anything_is_restored(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("model", model(0), G),
                                         ac.StateComponent("meta", Refusing({"version": 1}), G)]) as ck:
        ck.save(1).wait()
    target, untouched = model(1), model(1)
    meta = Refusing({"version": 2})
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("model", target, G),
                                         ac.StateComponent("meta", meta, G)])
    with pytest.raises(ac.InvalidArgumentError, match="component 'meta' refuses the saved state: saved by version 1"):
        ck.load()
    assert same(target, untouched) and meta.loads == 0, "a component was restored before the check"


def test_module_keys_and_shapes_are_checked_first_with_a_hint_for_ddp_prefixes(tmp_path):
    saved = model(0)
    wrapped = torch.nn.Module()
    wrapped.module = saved                    # what a DDP-wrapped model's state_dict looks like
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("model", wrapped, G),
                                         ac.StateComponent("extra", Box(), G)]) as ck:
        ck.save(1).wait()
    target, untouched = model(1), model(1)
    extra = Box()
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("extra", extra, G),
                                         ac.StateComponent("model", target, G)])
    with pytest.raises(ac.InvalidArgumentError, match=r"'module\.' prefix: it was saved wrapped \(DDP\)"):
        ck.load()
    assert same(target, untouched) and extra.loads == 0

    with ac.AsyncCheckpointer(tmp_path / "shapes", [ac.StateComponent("model", model(0), G)]) as ck:
        ck.save(1).wait()
    wider = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ac.InvalidArgumentError, match=r"'0.weight': saved \[3, 4\], module \[5, 4\]"):
        ac.AsyncCheckpointer(tmp_path / "shapes", [ac.StateComponent("model", wider, G)]).load()


def test_a_load_state_dict_that_raises_names_what_was_and_was_not_restored(tmp_path):
    comps = [ac.StateComponent("a", Box({"x": torch.ones(2)}), G),
             ac.StateComponent("b", Box({"x": torch.ones(2)}), G),
             ac.StateComponent("c", Box({"x": torch.ones(2)}), G)]
    with ac.AsyncCheckpointer(tmp_path, comps) as ck:
        ck.save(1).wait()
    a, c = Box(), Box()
    with pytest.raises(PartialLoadError) as info:
        ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("a", a, G), ac.StateComponent("b", Exploding(), G),
                                        ac.StateComponent("c", c, G)]).load()
    message = str(info.value)
    assert "component 'b' raised in load_state_dict" in message and "exploded on purpose" in message
    assert "['a'] was restored" in message and "not restored: ['b', 'c']" in message
    assert isinstance(info.value, ac.CheckpointError) and a.loads == 1 and c.loads == 0


def test_the_samplers_configuration_is_checked_before_anything_is_restored(tmp_path):
    data = list(range(10))
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("model", model(0), G),
                                         ac.StateComponent("sampler", ac.ResumableSampler(data, seed=1), G)]) as ck:
        ck.save(1).wait()
    target, untouched = model(1), model(1)
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("model", target, G),
                                         ac.StateComponent("sampler", ac.ResumableSampler(data, seed=2), G)])
    with pytest.raises(ac.InvalidArgumentError, match="seed: saved 1, now 2"):
        ck.load()
    assert same(target, untouched)
