"""One case of the harness on a local folder: one state size x one dtype mix, every floor and
every peer, `repeats` rounds. Each peer's round is: save (blocking, staged, committed, stored
bytes, background CPU, peak RSS) -> cold load -> cleanup.

Order: "interleaved" runs every method once per round with the order rotated, so background load
hits all of them alike (what bench/single_process.py does); it keeps every peer's buffers alive
at once. "blocked" runs each peer's rounds back to back and closes it before the next, for
states too large to hold every peer's buffers together. "auto" picks interleaved when about
6x the state fits in 70% of available memory.
"""
from __future__ import annotations

import gc
import os
import sys
import time

from ..common import PageCache
from .floors import Floors
from .peers import Peer, make_peer
from .probe import CpuClock, RssPeak, rss_bytes
from .state import make_state, state_bytes

# state + floor buffer (also the load target) + two async_ckpt pools + a reused DefaultStager +
# one transient copy (DCP default / torchsnapshot / torch.load) alive at once in interleaved order
INTERLEAVED_COPIES = 6


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemAvailable"):
                return int(ln.split()[1]) * 1024
    return 0


def pick_order(order: str, nbytes: int) -> str:
    if order != "auto":
        return order
    return "interleaved" if INTERLEAVED_COPIES * nbytes <= 0.7 * mem_available() else "blocked"


class Case:
    def __init__(self, nbytes: int, mix: str, peers: list[str], repeats: int, layers: int,
                 folder: str, cache: PageCache, order: str, log=print):
        self.mix, self.peer_names, self.repeats, self.cache, self.log = mix, peers, repeats, cache, log
        self.folder = os.path.join(folder, f"{mix}-{nbytes}")
        os.makedirs(self.folder, exist_ok=True)
        self.state = make_state(nbytes, mix, layers)
        self.nbytes = state_bytes(self.state)
        self.floors = Floors(self.state, self.folder, cache)
        # loads restore into the floor buffer's typed views: one state-sized buffer fewer, and
        # the floors rewrite it every round anyway
        self.target = {k: v.view(t.shape) for (k, t), v in zip(self.state.items(), self.floors.views)}
        self.order = pick_order(order, self.nbytes)
        self.figures: dict[str, dict[str, list]] = {}
        self.first: dict[str, dict] = {}
        self.resident: dict[str, int] = {}
        self.engine_timings: dict[str, list] = {}

    def add(self, method: str, figure: str, value) -> None:
        if value is not None:
            self.figures.setdefault(method, {}).setdefault(figure, []).append(value)

    # -- one round of each kind ---------------------------------------------------------------
    def floors_round(self, _: int) -> None:
        self.add("memcpy", "blocking_s", self.floors.memcpy())
        self.add("raw_write", "committed_s", self.floors.raw_write())
        self.add("raw_odirect", "committed_s", self.floors.odirect_write())
        self.add("raw_cold_read", "load_s", self.floors.cold_read())

    def setup_peer(self, name: str) -> Peer:
        gc.collect()
        before = rss_bytes()
        peer = make_peer(name, self.state, self.target, self.folder, self.cache)
        with RssPeak() as peak:
            peer.setup()
        self.first[name] = {k: v for k, v in (peer.first or {}).items() if k != "engine_timings"}
        self.first[name]["peak_extra_rss_bytes"] = peak.peak - before
        # what the peer keeps between saves (staging pools, reused stagers)
        self.resident[name] = max(0, rss_bytes() - before)
        return peer

    def peer_round(self, peer: Peer, i: int) -> None:
        gc.collect()
        start_rss = rss_bytes()
        clock = CpuClock().start()
        with RssPeak() as peak:
            out = peer.save(i)
        bg_cpu, total_cpu = clock.stop()
        for fig in ("blocking_s", "staged_s", "committed_s", "stored_bytes"):
            self.add(peer.key, fig, out[fig])
        self.add(peer.key, "background_cpu_s", bg_cpu)
        self.add(peer.key, "total_cpu_s", total_cpu)
        self.add(peer.key, "peak_extra_rss_bytes", peak.peak - start_rss)
        if "engine_timings" in out:
            self.engine_timings.setdefault(peer.key, []).append(out["engine_timings"])
        next(iter(self.target.values())).zero_()   # so check_loaded() proves this load wrote it
        self.add(peer.key, "load_s", peer.load(i))
        peer.cleanup(i)

    # -- drivers ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        if self.order == "interleaved":
            peers = [self.setup_peer(n) for n in self.peer_names]
            methods = [("floors", self.floors_round)] + [(p.key, lambda i, p=p: self.peer_round(p, i))
                                                           for p in peers]
            try:
                for r in range(self.repeats):
                    shift = r % len(methods)
                    for _, fn in methods[shift:] + methods[:shift]:
                        fn(r)
                    self.log(f"  {self.mix} {self.nbytes / 2**20:.0f} MiB: round {r + 1}/{self.repeats} "
                             f"({time.perf_counter() - t0:.0f} s)")
            finally:
                for p in peers:
                    p.close()
        else:
            for r in range(self.repeats):
                self.floors_round(r)
            for name in self.peer_names:
                peer = self.setup_peer(name)
                try:
                    for r in range(self.repeats):
                        self.peer_round(peer, r)
                finally:
                    peer.close()
                del peer
                self.log(f"  {self.mix} {self.nbytes / 2**20:.0f} MiB: {name} done "
                         f"({time.perf_counter() - t0:.0f} s)")
        self.floors.close()
        return {"mix": self.mix, "state_bytes": self.nbytes, "tensors": len(self.state),
                "dtypes": sorted({str(t.dtype) for t in self.state.values()}),
                "order": self.order, "repeats": self.repeats, "figures": self.figures,
                "first_save": self.first, "resident_after_first_save_bytes": self.resident,
                "odirect_error": self.floors.odirect_error, "engine_timings": self.engine_timings,
                "seconds": time.perf_counter() - t0}


def run_case(nbytes: int, mix: str, peers: list[str], repeats: int, layers: int, folder: str,
             cache: PageCache, order: str) -> dict:
    case = Case(nbytes, mix, peers, repeats, layers, folder, cache, order,
                log=lambda m: print(m, file=sys.stderr, flush=True))
    return case.run()
