"""Self-hashed JSON documents: the manifest and the late metrics files carry a hash of their own
bytes as their last member, checked before a byte of them is parsed.

A sealed document is the compact JSON object ``B`` (ending in ``}``) with one member appended:

    B[:-1] + ("," unless B == "{}") + '"<key>":"xxh3-128:<32 hex digits>"}'

where the digits are the xxh3-128 of ``B``, i.e. of the document's bytes with that last member
removed. A reader that finds the member where the format puts it verifies the hash and parses
``B``; one that finds no such member anywhere reads the document as written before sealing
existed; one that finds the key anywhere else (a damaged or moved seal) refuses the document. The
value's ``xxh3-128:`` prefix keeps it from ever parsing as a number (a reader from before sealing
skips non-numeric metrics).
"""
from __future__ import annotations

import json
import re
from typing import Any

import xxhash

ALGO = "xxh3-128"


def seal(body: bytes, key: str) -> bytes:
    """`body` (a compact JSON object without `key`) with its seal appended."""
    if not (body.startswith(b"{") and body.endswith(b"}")):
        raise ValueError("only a JSON object can be sealed")
    digest = xxhash.xxh3_128_hexdigest(body)
    sep = b"" if body == b"{}" else b","
    return body[:-1] + sep + f'"{key}":"{ALGO}:{digest}"}}'.encode()


def loads(raw: bytes, key: str, where: str) -> tuple[Any, bool]:
    """(the parsed document, whether it was sealed). ValueError, naming `where`, when the seal does
    not match the bytes (checked before any parsing), or when the document has `key` anywhere but
    where a seal goes (a damaged or moved seal)."""
    tail_len = len(key) + len(ALGO) + 40          # ,"<key>":"<algo>:<32 hex>"}
    tail = _TAILS.setdefault(key, re.compile(rb'(,?)"' + re.escape(key.encode()) + rb'":"'
                                             + ALGO.encode() + rb':([0-9a-f]{32})"\}\Z'))
    found = tail.search(raw, max(0, len(raw) - tail_len))
    if found is None:
        doc = json.loads(raw)
        if isinstance(doc, dict) and key in doc:
            raise ValueError(f"{where}: its {key!r} is damaged or not its last member")
        return doc, False
    body = raw[:found.start()] + b"}"
    if not found.group(1) and body != b"{}":
        raise ValueError(f"{where}: its {key!r} is not a member of the document")
    if xxhash.xxh3_128_hexdigest(body) != found.group(2).decode():
        raise ValueError(f"{where}: its {key} does not match its content: the file is damaged "
                         "(a flipped bit, a partial overwrite) or was edited by hand")
    return json.loads(body), True


_TAILS: dict[str, re.Pattern] = {}
