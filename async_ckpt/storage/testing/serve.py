"""Run a loopback S3 server in the foreground: ``python -m async_ckpt.storage.testing.serve
{seaweedfs,moto} [--bucket NAME] [--dir DIR]`` (also `storage/seaweedfs.sh`, `storage/moto.sh`).

Starts the server with `servers.start` (127.0.0.1, free ports, ready once ListBuckets answers),
creates the bucket if asked, prints the endpoint and the ``export`` lines that point s3fs,
botocore and async_ckpt's bench at it (the dummy test credentials only), then waits. Ctrl-C or
SIGTERM stops the server by its PID and removes its data; the exit status is 0 then, 1 if the
server died on its own, 2 if it could not start.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from .servers import LAUNCHERS, start

NAMES = {"seaweedfs": "SeaweedFS", "moto": "moto"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m async_ckpt.storage.testing.serve",
                                description="Run a loopback S3 server until Ctrl-C or SIGTERM.")
    p.add_argument("server", choices=sorted(LAUNCHERS))
    p.add_argument("--bucket", action="append", default=[], metavar="NAME",
                   help="create this bucket once the server is up (repeatable)")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the server's work folder (default: the system temp folder)")
    args = p.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = start(args.server, args.dir)
    except (RuntimeError, OSError) as exc:
        print(f"could not start {args.server}: {exc}", file=sys.stderr)
        return 2
    try:
        for bucket in args.bucket:
            server.make_bucket(bucket)
        out = [f"# {NAMES[args.server]} S3 server on {server.endpoint} (pid {server.pid}, work "
               f"folder {server.workdir}, removed at stop); Ctrl-C or SIGTERM stops it.",
               "# In another shell:"]
        out += [f"export {k}={shlex.quote(v)}" for k, v in server.environment().items()]
        out += [f"# bucket: s3://{b}" for b in args.bucket]
        print("\n".join(out), flush=True)
        while not stop.wait(0.2):
            proc = server.proc
            assert proc is not None      # started above
            if proc.poll() is not None:
                print(f"{args.server} exited with {proc.returncode}; log:\n{server.log_tail()}",
                      file=sys.stderr)
                return 1
        print(f"# stopping {args.server} (pid {server.pid})", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
