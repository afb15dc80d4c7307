"""Free TCP ports on loopback, for process groups and servers the tests start: the helpers the
package's S3 test servers use (`async_ckpt.storage.testing.servers`), re-exported."""
from __future__ import annotations

from async_ckpt.storage.testing.servers import free_port, free_ports

__all__ = ["free_port", "free_ports"]
