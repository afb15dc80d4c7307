"""Codec micro-benchmark: plain zstd, byte-grouped (shuffle) + zstd and per-plane zstd on
checkpoint-like tensors.

    python -m bench.codec [--mib 128] [--repeats 5] [--quick]

For each data set it reports the compression ratio and the encode (the checkpointer's pool of
`--threads` threads over 16 MiB pieces, as on save) and decode (codec.decompress_frames: pieces in
parallel, as on load; and one thread, as before) throughput in GB/s of raw bytes per wall second
and per CPU second, medians over rounds in which the methods run interleaved, all rows side by
side in one run. Results: bench/results/codec.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zstandard

from async_ckpt.format import planes as planes_mod
from async_ckpt.format.codec import PIECE, Compressor, codec_for, codec_width, decompress_frames
from async_ckpt.format.shuffle import shuffle, shuffle_width

from .common import machine_info

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MIB = 1 << 20


def bf16_weights(nbytes: int, gen: torch.Generator) -> torch.Tensor:
    """GPT-style init: normal(0, 0.02), cast to bf16."""
    return (torch.randn(nbytes // 2, generator=gen) * 0.02).to(torch.bfloat16)


def bf16_mix(nbytes: int, gen: torch.Generator) -> torch.Tensor:
    """A model-like mix: nn.Linear's default uniform init, normal(0, 0.02) projections, unit
    normal embeddings, LayerNorm ones and zero biases, in model-ish proportions."""
    n = nbytes // 2
    parts, left = [], n
    for share, make in ((0.45, lambda k: (torch.rand(k, generator=gen) * 2 - 1) / 64),
                        (0.40, lambda k: torch.randn(k, generator=gen) * 0.02),
                        (0.10, lambda k: torch.randn(k, generator=gen)),
                        (0.03, lambda k: torch.ones(k)),
                        (0.02, lambda k: torch.zeros(k))):
        k = min(left, int(n * share))
        parts.append(make(k))
        left -= k
    parts.append(torch.zeros(left))
    return torch.cat(parts).to(torch.bfloat16)


def adam_moments(nbytes: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 exp_avg and exp_avg_sq after a few Adam steps on gradients of scale 1e-3."""
    n = nbytes // 8
    m, v = torch.zeros(n), torch.zeros(n)
    for _ in range(4):
        g = torch.randn(n, generator=gen) * 1e-3
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
    return torch.cat([m, v])


DATASETS = {"bf16 normal(0,0.02) weights": bf16_weights, "bf16 model-like mix": bf16_mix,
            "fp32 Adam moments (exp_avg + exp_avg_sq)": adam_moments}


def _pieces(view: memoryview) -> list[memoryview]:
    return [view[i:i + PIECE] for i in range(0, len(view), PIECE)]


def _encode(pool: ThreadPoolExecutor, encode, pieces) -> list:
    """[(stored bytes, stored lengths)] of every piece, as the checkpointer's encode pool runs it."""
    return list(pool.map(encode, pieces))


def _measure(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of this process) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _plane_ratios(view: memoryview, width: int, compressor: Compressor) -> list[float]:
    """Per plane of the first piece: what zstd-planes stored (1.0: raw)."""
    _, lengths = compressor.encode(view[:PIECE], f"{planes_mod.PREFIX}{width}")
    # Stored from the highest plane down; reported from plane 0 up.
    return [round(min(PIECE, len(view)) // width / n, 3) for n in reversed(lengths)]


def _frames_of(compress, width):
    """An encode function for the old one-frame-per-piece codecs."""
    def encode(piece):
        frame = compress(piece, width)
        return frame, (len(frame),)
    return encode


def run(mib: int, repeats: int, threads: int, level: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    compressor = Compressor(level)
    default_planes = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True)

    local = threading.local()

    def shuffle_default(piece, width):   # the level's own parameters on the grouped planes
        if not hasattr(local, "ctx"):     # one context per thread, as Compressor keeps
            local.ctx = zstandard.ZstdCompressor(compression_params=default_planes)
        return local.ctx.compress(shuffle(piece, width))

    fast = Compressor(-1)     # negative levels turn off zstd's Huffman coding of literals
    fallback = Compressor(level, native=False)   # zstd-planes where zstandard's cffi is missing
    # (name, encode(piece, width) or a Compressor's codec, grouped: True / "planes" / False)
    methods = [("zstd", compressor.compress, False),
               ("zstd level -1", fast.compress, False),
               ("shuffle + zstd level -1", fast.compress, True),
               ("shuffle + zstd (level defaults)", shuffle_default, True),
               ("zstd-shuffle (previous default)", compressor.compress, True),
               ("zstd-planes, no cffi (tuned level-1 matching)", fallback, "planes"),
               ("zstd-planes (async_ckpt)", compressor, "planes")]
    rows, planes = [], {}
    load0 = os.getloadavg()[0]
    with ThreadPoolExecutor(threads) as pool:
        for name, make in DATASETS.items():
            data = make(mib * MIB, gen).contiguous()
            view = memoryview(data.view(torch.uint8).numpy())
            pieces, width = _pieces(view), shuffle_width(data.dtype)
            planes[name] = _plane_ratios(view, width, compressor)
            out = torch.empty(len(view), dtype=torch.uint8)
            ov = memoryview(out.numpy())
            cases = []
            for method, compress, grouped in methods:
                if grouped == "planes":
                    codec = codec_for(data.dtype, True)
                    w, enc = codec_width(codec), (lambda c, k: lambda p: c.encode(p, k))(compress, codec)
                else:
                    w = width if grouped else 0
                    enc = _frames_of(compress, w)
                out_pieces = _encode(pool, enc, pieces)
                stored = memoryview(b"".join(bytes(d) for d, _ in out_pieces))
                sizes = [n for _, lengths in out_pieces for n in lengths]
                decompress_frames(stored, sizes, ov, name, w)
                assert bytes(ov) == bytes(view), f"{method} did not round-trip {name}"
                cases.append({"method": method, "ratio": len(view) / len(stored), "w": w,
                              "compress": enc, "stored": stored, "sizes": sizes,
                              "encode": [], "decode": [], "decode_1t": []})
                del out_pieces
            shuffle_only = {"method": f"byte grouping only ({width} planes, 1 thread)",
                            "ratio": None, "encode": [], "decode": [], "decode_1t": []}
            for rnd in range(repeats):
                # Methods interleaved, order rotated each round, so background load hits all alike.
                order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]
                for c in order:
                    w, comp, st, sz = c["w"], c["compress"], c["stored"], c["sizes"]
                    c["encode"].append(_measure(lambda: _encode(pool, comp, pieces)))
                    c["decode"].append(_measure(lambda: decompress_frames(st, sz, ov, name, w)))
                    c["decode_1t"].append(_measure(
                        lambda: decompress_frames(st, sz, ov, name, w, parallel=False)))
                shuffle_only["encode"].append(_measure(lambda: [shuffle(p, width) for p in pieces]))
            for c in [shuffle_only] + cases:
                row = {"data": name, "method": c["method"], "ratio": c["ratio"]}
                for k in ("encode", "decode", "decode_1t"):
                    if c[k]:
                        wall = statistics.median(x[0] for x in c[k])
                        cpu = statistics.median(x[1] for x in c[k])
                        row[f"{k}_wall_s"] = [x[0] for x in c[k]]
                        row[f"{k}_cpu_s"] = [x[1] for x in c[k]]
                        row[f"{k}_gbps"] = len(view) / wall / 1e9
                        row[f"{k}_gbps_per_cpu_s"] = len(view) / cpu / 1e9
                rows.append(row)
            del data, view, pieces, cases, out, ov
    return {"mib_per_dataset": mib, "repeats": repeats, "encode_threads": threads, "level": level,
            "decode_threads": min(4, os.cpu_count() or 1), "rows": rows, "plane_ratios": planes,
            "load_avg_start_end": [load0, os.getloadavg()[0]], "machine": machine_info(RESULTS)}


def markdown(res: dict) -> str:
    m, cores = res["machine"], res["machine"]["cpu_affinity"]
    lines = [f"### Codec micro-benchmark: {res['mib_per_dataset']} MiB per data set, zstd level "
             f"{res['level']}, 16 MiB pieces, median of {res['repeats']} rounds "
             f"({cores} CPUs, {m['cpu_model']})", "",
             f"Encode: {res['encode_threads']} threads over the pieces (the checkpointer's encode "
             f"pool). Decode: `decompress_frames`, pieces in parallel on {res['decode_threads']} "
             "threads (as load now does) and on 1 thread (as load did before). GB/s of raw bytes "
             "per wall second, and per CPU second (process CPU time, all threads): other work on "
             "the machine steals wall time but not CPU time, so `GB/s per CPU-s x cores` is what "
             "the pieces would reach on idle cores. Methods run interleaved, order rotated each "
             "round. Load average start/end: {:.2f}/{:.2f}.".format(*res["load_avg_start_end"]), "",
             "`zstd-shuffle`: each piece byte-grouped, one frame (the codec written before "
             "`zstd-planes`). `zstd-planes`: each byte plane stored raw or as its own frame, decided "
             "on a 64 KiB sample, float planes Huffman-coded without match finding (async_ckpt."
             "planes; `no cffi`: the same layout with tuned level-1 matching, for installs without "
             "zstandard's cffi backend). Byte grouping only: extracting every plane of each piece, "
             "one thread.", "",
             "| data | method | ratio | encode GB/s | encode GB/s per CPU-s | decode GB/s | "
             "decode GB/s per CPU-s | decode 1-thread GB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt="{:.2f}"):
        return fmt.format(v) if v is not None else ""
    for r in res["rows"]:
        lines.append(f"| {r['data']} | {r['method']} | {f(r['ratio'], '{:.3f}x')} | "
                     f"{f(r.get('encode_gbps'))} | {f(r.get('encode_gbps_per_cpu_s'))} | "
                     f"{f(r.get('decode_gbps'))} | {f(r.get('decode_gbps_per_cpu_s'))} | "
                     f"{f(r.get('decode_1t_gbps'))} |")
    lines += ["", "Per-plane ratios of the first 16 MiB piece as zstd-planes stored them (plane 0 = "
              "lowest byte; 1.00x: stored raw, zstd skipped):", ""]
    for name, ratios in res["plane_ratios"].items():
        lines.append(f"- {name}: " + ", ".join(f"{r:.2f}x" for r in ratios))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128, help="raw MiB per data set")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="encode threads (the checkpointer's "
                    "encode_threads option)")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="32 MiB, 1 round (smoke test)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    mib, repeats = (32, 1) if args.quick else (args.mib, args.repeats)
    res = run(mib, repeats, args.threads, args.level)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "codec.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    text = markdown(res)
    with open(os.path.join(args.out, "codec.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
