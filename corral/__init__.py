"""Corral: make your own instruction-following model (generate data, fine-tune, serve)."""

import logging

__version__ = "0.1.0"


class _DropNoticeNotForUsers(logging.Filter):
    """bitsandbytes logs, on every import on an AVX512-BF16 CPU, that an optional kernel could not
    be fetched from a model hub. Nothing a Corral user does changes that (the 4-bit path works
    without it), so the notice is dropped; every other bitsandbytes message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNoticeNotForUsers())
