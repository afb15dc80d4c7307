"""Bit-exact resume of a 2-rank DDP run (gloo) killed mid-epoch, against the multi-rank contract.

Every rank constructs ``AsyncCheckpointer(root, components)`` on the same root with the model and
optimizer as REPLICATED and RNGState and the StatefulDataLoader (ResumableSampler inside) as
PER_RANK; every rank calls ``save(step)`` and ``load()``. The run is started with
torch.multiprocessing.spawn (MASTER_ADDR=127.0.0.1, a free port) by tests/helpers/resume_trainer.py;
both ranks SIGKILL themselves at the start of step 15 of 26, then a new 2-rank run resumes.
"""
from __future__ import annotations

import pytest

from support.resume import check_resume_is_bit_exact

pytestmark = [pytest.mark.multiproc, pytest.mark.crash,
              pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")]


def test_ddp_two_ranks_killed_mid_epoch_resume_bit_exact(tmp_path):
    check_resume_is_bit_exact(tmp_path, world=2)
