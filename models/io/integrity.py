"""Telling an incomplete download from a weight file: the check every reader runs when it opens a file.

A downloader that pre-allocates (browsers, aria2, download managers) gives the file its full size at once and fills
it as data arrives; an interrupted download keeps a correct header and ends in zero bytes.  Every size check
passes, so such a file would load and sample noise.  Real weights never end in whole tensors of zero bytes: when
the zero run at the end of the file is at least :data:`MIN_ZERO_TAIL` bytes and covers two whole tensors or one
whole tensor of a megabyte or more, or is :data:`MAX_SCAN` bytes long, the file is refused.  (Below that size a
zero tail may be a deliberately zero bias, or a hand-made test file.)  The scan reads backwards from the end and
stops at the first non-zero byte, so a complete file costs one small read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["refuse_zero_filled_tail", "MIN_ZERO_TAIL", "MAX_SCAN"]

_CHUNK = 1 << 20
MIN_ZERO_TAIL = 64 << 10
MAX_SCAN = 256 << 20  # this many zero bytes at the end is never a real weight file, whatever its tensors
_WHOLE_TENSORS = 2
_LARGE_TENSOR = 1 << 20


def _zero_tail_start(path: os.PathLike | str, file_size: int) -> int:
    """Offset where the trailing run of zero bytes begins (``file_size`` when the last byte is not zero), scanning
    back at most :data:`MAX_SCAN` bytes."""
    end = file_size
    with open(path, "rb") as f:
        while end > 0 and file_size - end < MAX_SCAN:
            start = max(0, end - _CHUNK)
            f.seek(start)
            chunk = f.read(end - start)
            kept = len(chunk.rstrip(b"\0"))
            if kept:
                return start + kept
            end = start
    return end


def refuse_zero_filled_tail(path: os.PathLike | str, file_size: int, spans: Iterable[tuple[str, int, int]],
                            error: type[Exception]) -> None:
    """Raise ``error`` (the reader's own error type) when the file ends in zero bytes over whole tensors (an
    incomplete download).  ``spans``: ``(name, start, end)`` absolute byte ranges of the tensors' data.
    """
    tail = _zero_tail_start(path, file_size)
    if tail >= file_size:
        return
    zeroed = sorted((start, name, end - start) for name, start, end in spans if end > start and start >= tail)
    zero_bytes = file_size - tail
    whole = len(zeroed) >= _WHOLE_TENSORS or any(size >= _LARGE_TENSOR for _, _, size in zeroed)
    if not (whole and zero_bytes >= MIN_ZERO_TAIL or zero_bytes >= MAX_SCAN):
        return
    names = ", ".join(f"'{name}'" for _, name, _ in zeroed[:2]) or "the last tensor"
    scanned = "at least " if zero_bytes >= MAX_SCAN else ""
    raise error(
        f"{path}: the file is an incomplete download: its last {scanned}{zero_bytes:,} bytes are all zero, covering "
        f"{len(zeroed)} whole tensor(s) (from {names}). A downloader that reserves the full size up front leaves "
        "zeros where the data never arrived. Download the file again and compare its size and SHA-256 with the "
        "model page.")
