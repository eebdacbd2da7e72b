"""Memory back to the OS when a model is unloaded, so the server returns to where it was before the load.

An engine frees a model's buffers, but glibc keeps freed heap pages for reuse, and it keeps them per
arena: each thread that allocates may get an arena of its own (up to 8 per core), and a model loaded
on a new thread leaves its freed pages in one. Measured with benchmarks/on_demand.py (load and unload
Gemma 3 270M three times beside the default model): with glibc's default arenas the RSS after unload
crept to +21 % over the baseline; with 2 arenas and a trim after each unload it stays within 3 %.
Elsewhere (musl, macOS, Windows) there is nothing to call and the allocator's own policy stands.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (call once, early: arenas made before stay). The server's threads
    allocate little on their hot paths (buffers are made at load), so they do not contend for them."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.mallopt(M_ARENA_MAX, arenas)


def return_freed_memory() -> None:
    """Collect the unloaded model's Python objects (they may sit in reference cycles), then ask glibc
    to hand its free pages back to the OS."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
