"""Immutable segment files: the on-disk format, a writer and a validated mmap reader.

Layout and rules: :mod:`vibrato.segment.format`. Typical use (the engine's checkpoint)::

    from vibrato.segment import SegmentData, write_segment_tmp, publish_segment, SegmentReader
    info = write_segment_tmp(tmp, SegmentData(level=0, id_start=..., vectors=..., live=..., ...))
    # ... insert the catalog row ...
    publish_segment(tmp, final)
    with SegmentReader.open(final, madvise="random") as seg:
        seg.verify()
        seg.vectors, seg.live, seg.metadata(0)
"""
from vibrato._native.segio import SegmentChecksumError, SegmentFormatError
from vibrato.segment.data import SegmentData, StreamedVectors, StringsCSR, TagsCSR
from vibrato.segment.format import MADVISE_MODES, Section, SegmentKind
from vibrato.segment.reader import SegmentReader
from vibrato.segment.writer import SectionInfo, SegmentInfo, fsync_dir, publish_segment, write_segment_tmp

__all__ = [
    "SegmentData", "StreamedVectors", "TagsCSR", "StringsCSR", "SegmentKind", "Section", "MADVISE_MODES",
    "write_segment_tmp", "publish_segment", "fsync_dir", "SegmentInfo", "SectionInfo",
    "SegmentReader", "SegmentFormatError", "SegmentChecksumError",
]
