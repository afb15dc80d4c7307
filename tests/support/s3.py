"""Raw access to one checkpoint root on a test S3 server, behind async_ckpt's back (boto3)."""
from __future__ import annotations

import json


class Remote:
    """One checkpoint root on one server, with raw access to its objects."""

    def __init__(self, server):
        self.server, self.url = server, server.fresh_root()
        self.bucket, self.prefix = self.url[len("s3://"):].split("/", 1)
        self.c = server.client()

    def options(self, **extra) -> dict:
        return {**self.server.storage_options(), **extra}

    def keys(self, under: str = "") -> list[str]:
        pages = self.c.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
        return sorted(o["Key"][len(self.prefix) + 1:] for p in pages for o in p.get("Contents", []))

    def uploads(self) -> list[str]:
        found = self.c.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return [u["Key"][len(self.prefix) + 1:] for u in found.get("Uploads", [])]

    def get(self, name: str) -> bytes:
        return self.c.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()

    def put(self, name: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)

    def delete(self, name: str) -> None:
        self.c.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")

    def data_file(self, step: int) -> str:
        (name,) = [k for k in self.keys(f"step-{step:010d}/") if "/data-" in k]
        return name

    def manifest(self, step: int) -> dict:
        return json.loads(self.get(f"step-{step:010d}/manifest.json"))
