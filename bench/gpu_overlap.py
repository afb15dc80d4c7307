"""`python -m bench.gpu`, part 2: overlap of D2H staging with forward/backward."""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

import torch

from .gpu_common import GB, Control, Env, dcp_parts, reusable_stager, stats  # noqa: F401


# -- 2. overlap of staging with forward/backward --------------------------------------------------
class Mlp(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return x


class OverlapBench:
    METHODS = ("none", "ack_blocking", "ack_overlap", "dcp_stager_sync", "dcp_stager_async")
    LABELS = {"none": "no checkpointing (baseline)",
              "ack_blocking": "async_ckpt save(), overlap_staging=False",
              "ack_overlap": "async_ckpt save(), overlap_staging=True, wait_staged() before optimizer.step()",
              "dcp_stager_sync": "DCP async_save, reused DefaultStager (sync staging)",
              "dcp_stager_async": "DCP async_save, reused DefaultStager (async staging, "
                                  "staging_completion before optimizer.step())"}

    def __init__(self, env: Env, args, folder: str, deadline: Control, have_ack: bool):
        self.env, self.args, self.folder, self.deadline, self.have_ack = env, args, folder, deadline, have_ack
        width = args.width
        layers = max(1, round(args.overlap_gb * GB / (6 * width * width)))   # bf16 weight + 2 bf16 moments
        torch.manual_seed(0)
        self.model = Mlp(width, layers).to(env.device, torch.bfloat16)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=env.cuda or None)
        self.x = torch.randn(args.batch, width, device=env.device, dtype=torch.bfloat16)
        self.layers = layers
        for _ in range(3):
            self.fwd_bwd()
            self.optim.step()
        env.sync()
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
            v.numel() * v.element_size() for st in self.optim.state.values() for v in st.values() if torch.is_tensor(v))

    def fwd_bwd(self) -> None:
        self.optim.zero_grad(set_to_none=False)
        self.model(self.x).float().pow(2).mean().backward()

    def components(self):
        from async_ckpt import SharingPattern, StateComponent
        return [StateComponent("model", self.model, SharingPattern.PER_RANK),
                StateComponent("optim", self.optim, SharingPattern.PER_RANK)]

    def saver(self, method: str):
        """(save(step) -> pending, wait_staged(pending), wait_durable(pending), close)."""
        import torch.distributed.checkpoint as dcp
        if method.startswith("ack"):
            from async_ckpt import AsyncCheckpointer
            ck = AsyncCheckpointer(os.path.join(self.folder, f"loop-{method}"), self.components(),
                                   keep_last=1, overlap_staging=(method == "ack_overlap"))
            return ck.save, (lambda h: h.wait_staged()), (lambda h: (h.wait(), ck.wait())), ck.close
        stager = reusable_stager(self.env.stager_options(method == "dcp_stager_async"))

        def save(step: int):
            sd = {"model": self.model.state_dict(), "optim": self.optim.state_dict()}
            path = os.path.join(self.folder, f"loop-{method}-{step}")
            return path, dcp.async_save(sd, checkpoint_id=path, async_stager=stager)

        def staged(p) -> None:
            fut = dcp_parts(p[1])[0]
            if fut is not None:
                fut.result()

        def durable(p) -> None:
            dcp_parts(p[1])[1].result()
            shutil.rmtree(p[0], ignore_errors=True)
        return save, staged, durable, stager.release

    def run_method(self, method: str, saver, step0: int) -> dict:
        args, env = self.args, self.env
        due = set(range(args.every, args.steps, args.every)) if method != "none" else set()
        save, wait_staged, wait_durable, _ = saver if saver else (None, None, None, None)
        times, backlog, pending, to_stage = [], [], None, None
        for i in range(args.steps):
            if i in due and pending is not None:      # the previous save must be durable: untimed
                t = time.perf_counter()
                wait_durable(pending)
                backlog.append(time.perf_counter() - t)
                pending = None
            t0 = time.perf_counter()
            self.fwd_bwd()
            if to_stage is not None:                  # only now must the parameters stay unchanged
                wait_staged(to_stage)
                to_stage = None
            self.optim.step()
            # The update must have landed before any saver reads the parameters: async_ckpt's side
            # stream waits for the compute stream itself, DCP's async staging thread does not.
            env.sync_compute()
            if i in due:
                pending = to_stage = save(step0 + i)
            times.append(time.perf_counter() - t0)
        if to_stage is not None:
            wait_staged(to_stage)
        if pending is not None:
            wait_durable(pending)
        plain = [t for i, t in enumerate(times) if i not in due and i - 1 not in due]
        base = statistics.median(plain) if plain else 0.0
        exposed = [times[i] + (times[i + 1] if i + 1 < len(times) else base) - 2 * base for i in sorted(due)]
        return {"run_s": sum(times), "plain_step_s": base, "exposed_per_save_s": exposed, "backlog_s": backlog}

    def run(self) -> dict:
        methods = [m for m in self.METHODS if self.have_ack or not m.startswith("ack")]
        savers = {"none": None}

        def warm_up(m: str):                          # first save: buffers, threads (untimed)
            saver = self.saver(m)
            p = saver[0](10 ** 6)
            saver[1](p)
            saver[2](p)
            return saver
        for m in methods[1:]:
            ok, saver = self.deadline.attempt(f"overlap {m} setup", warm_up, m)
            if ok:
                savers[m] = saver
        methods = [m for m in methods if m in savers]
        results = {m: [] for m in methods}
        step0 = {m: 2 * 10 ** 6 for m in methods}
        round_s = 0.0
        try:
            for r in range(self.args.repeats):
                if self.deadline.over(f"overlap round {r + 1}", round_s):
                    break
                t_round = time.perf_counter()
                shift = r % len(methods)
                for m in methods[shift:] + methods[:shift]:
                    ok, res = self.deadline.attempt(f"overlap {m} round {r + 1}", self.run_method,
                                                    m, savers[m], step0[m])
                    step0[m] += self.args.steps
                    if ok:
                        results[m].append(res)
                    elif m == "none":
                        raise RuntimeError("the baseline training run failed: nothing to compare against")
                    else:
                        methods = [x for x in methods if x != m]
                round_s = time.perf_counter() - t_round
                print(f"  overlap: round {r + 1}/{self.args.repeats} done ({round_s:.0f} s)",
                      file=sys.stderr, flush=True)
        finally:
            for m, saver in savers.items():
                if saver is not None:
                    self.deadline.attempt(f"overlap closing {m}", saver[3])
        base = [x["run_s"] for x in results.get("none", [])]
        n_saves = len(range(self.args.every, self.args.steps, self.args.every))
        out = {"state_bytes": self.nbytes, "width": self.args.width, "layers": self.layers,
               "batch": self.args.batch, "steps": self.args.steps, "every": self.args.every,
               "saves_per_run": n_saves, "methods": {}}
        for m, runs in results.items():
            if not runs:
                continue
            per_save = [(x["run_s"] - b) / n_saves for x, b in zip(runs, base)] if m != "none" else []
            out["methods"][m] = {
                "label": self.LABELS[m],
                "plain_step": stats([x["plain_step_s"] for x in runs]),
                "exposed_per_save": stats([statistics.median(x["exposed_per_save_s"]) for x in runs
                                           if x["exposed_per_save_s"]]),
                "run_overhead_per_save": stats(per_save),
                "backlog": stats([statistics.median(x["backlog_s"]) for x in runs if x["backlog_s"]]),
                "run": stats([x["run_s"] for x in runs])}
        return out


