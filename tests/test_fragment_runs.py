"""Per-node manifest fragments on a real 2 x 2 torchrun run (4 ranks, 2 simulated nodes):
objects per checkpoint against the formula of docs/format.md (2 x nodes + 1), and a fragment removed or damaged
after the commit failing the load on every rank -- the ranks whose copies are elsewhere too -- with
CorruptCheckpointError before any load_state_dict; the untouched step loads."""
from __future__ import annotations

import pytest

from support.dist import run
from support.paths import HELPERS

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]
NODES = 2


def test_fragments_on_two_nodes(tmp_path):
    results = run("fragments", tmp_path / "ckpt", tmp_path / "out", timeout=300,
                  worker=HELPERS / "fragment_worker.py")
    folders = results[0]["folders"]
    for names in folders.values():
        fragments = [n for n in names if n.startswith("fragment-")]
        data = [n for n in names if n.startswith("data-")]
        assert sorted(n[:15] for n in fragments) == ["fragment-n00000", "fragment-n00001"], names
        assert "manifest.json" in names
        # objects per checkpoint: one data object and one fragment per node, and the root
        assert len(data) == NODES and len(names) == 2 * NODES + 1, names
    for rank, res in sorted(results.items()):
        loads = res["loads"]
        for step, what in (("2", "is missing"), ("3", "damaged or replaced")):
            assert loads[step]["raised"] == "CorruptCheckpointError", (rank, loads[step])
            assert what in loads[step]["message"] and loads[step]["restored"] == [], (rank, loads[step])
            assert loads[step]["mine"] == -1
        assert loads["1"] == {"step": 1, "restored": ["g", "rep", "mine", "node"], "mine": rank}, rank
