"""Segment files: round trips, alignment, madvise, checksums, truncation, publish, validation errors."""
import mmap
import os
import struct

import numpy as np
import pytest

from vibrato._native import segio
from vibrato.segment import (MADVISE_MODES, SegmentChecksumError, SegmentData, SegmentFormatError, SegmentKind,
                             StreamedVectors,
                             SegmentReader, StringsCSR, TagsCSR, publish_segment, write_segment_tmp)
from vibrato.segment import format as F
from vibrato.segment import writer as W

TAG_POOL = ["", "a,b", "x,y,z", "rock", "électro", "ß", "日本語", "🎵", "tag with spaces", "z" * 300]
LONG_SOURCE = "ä" * 40000 + "🎶"  # > 65535 bytes, ending in a 4-byte char (v2.1 truncated it, CONTRACT.md R3)


def make_data(n=50, dim=16, kind="raw", seed=0, graph=True, m=4, tags=None, sources=None, level=1, id_start=1000):
    rng = np.random.default_rng(seed)
    if tags is None:
        tags = [sorted(set(rng.choice(TAG_POOL, size=int(rng.integers(0, 4))).tolist())) for _ in range(n)]
    if sources is None:
        sources = [f"dir,with,commas/{i}-ünï©ødé.wav" if i % 3 else "" for i in range(n)]
        sources[n // 2] = LONG_SOURCE
    kw = {}
    if kind == "archive":  # archives carry a graph too from format version 2 on
        kw = dict(pq_codebook=rng.bytes(1024 * dim + 3), pq_codes=rng.integers(0, 256, (n, m), dtype=np.uint8))
    if graph:
        kw["graph"] = rng.bytes(97 * n + 5)
    return SegmentData(level=level, id_start=id_start, vectors=rng.standard_normal((n, dim), dtype=np.float32),
                       live=rng.random(n) > 0.2, start_time_ms=rng.integers(0, 2**32, n, dtype=np.uint64),
                       duration_ms=rng.integers(0, 2**32, n, dtype=np.int64), bpm=rng.uniform(0, 300, n),
                       tags=tags, source_file=sources, **kw)


def write(tmp_path, data, name="seg.vdb", **kw):
    tmp = tmp_path / (name + ".tmp")
    info = write_segment_tmp(tmp, data, **kw)
    final = tmp_path / name
    publish_segment(tmp, final)
    return final, info


def expected_rows(data, tags, sources):
    return [{"source_file": sources[i], "start_time_ms": int(data.start_time_ms[i]),
             "duration_ms": int(data.duration_ms[i]), "bpm": float(np.float32(data.bpm[i])), "tags": list(tags[i])}
            for i in range(data.count)]


def check_roundtrip(path, info, data, tags, sources):
    with SegmentReader.open(path) as r:
        assert r.kind is data.kind and r.count == data.count and r.dim == data.dim
        assert r.level == data.level and r.id_start == data.id_start
        assert r.id_end == data.id_start + data.count - 1 == info.id_end
        assert r.path == os.fspath(path) and r.size_bytes == os.path.getsize(path) == info.size_bytes
        assert r.checksum == info.checksum
        assert {s.name: (s.offset, s.length, s.crc32c) for s in info.sections} == r.sections
        assert np.array_equal(r.vectors.view(np.uint32), data.vectors.view(np.uint32))  # bit-exact
        assert r.vectors.dtype == np.float32 and r.vectors.shape == (data.count, data.dim)
        assert r.live.dtype == np.bool_ and np.array_equal(r.live, data.live)
        assert np.array_equal(r.start_time_ms, data.start_time_ms)
        assert np.array_equal(r.duration_ms, data.duration_ms)
        assert np.array_equal(r.bpm.view(np.uint32), data.bpm.view(np.uint32))
        want = expected_rows(data, tags, sources)
        assert [r.metadata(i) for i in range(r.count)] == want
        assert r.metadata_rows(np.arange(r.count)) == want
        assert r.metadata_rows([r.count - 1, 0]) == [want[-1], want[0]]
        assert r.tags.to_lists() == [list(t) for t in tags]
        assert r.source_file.to_list() == list(sources)
        assert list(r.tag_dictionary) == sorted({t for row in tags for t in row})
        assert r.verify() == r.size_bytes
        if data.kind is SegmentKind.ARCHIVE:
            assert bytes(r.pq_codebook) == bytes(data.pq_codebook)
            assert np.array_equal(r.pq_codes, data.pq_codes) and r.pq_m == data.pq_codes.shape[1]
        else:
            assert r.pq_codebook is None and r.pq_codes is None and r.pq_m == 0
        assert (r.graph is None) == (data.graph is None) and r.has_graph == (data.graph is not None)
        if data.graph is not None:
            assert bytes(r.graph) == bytes(data.graph)


@pytest.mark.parametrize("kind", ["raw", "archive"])
def test_roundtrip(tmp_path, kind):
    n = 257
    rng = np.random.default_rng(3)
    tags = [sorted(set(rng.choice(TAG_POOL, size=int(rng.integers(0, 5))).tolist())) for _ in range(n)]
    sources = [f"s{i},x/ü🎵.wav" for i in range(n)]
    sources[7] = LONG_SOURCE
    sources[8] = ""
    data = make_data(n=n, dim=100, kind=kind, tags=tags, sources=sources, m=3)  # n*m % 4 != 0 (v2.1 bug, CONTRACT.md R3)
    path, info = write(tmp_path, data)
    assert info.kind == kind and info.count == n and info.live_count == int(data.live.sum())
    check_roundtrip(path, info, data, tags, sources)


def _streamed(vectors, rows_per, mutate=None):
    def chunks():
        buf = np.empty((rows_per, vectors.shape[1]), np.float32)  # reused, as compaction does
        for lo in range(0, vectors.shape[0], rows_per):
            out = buf[:min(rows_per, vectors.shape[0] - lo)]
            out[:] = vectors[lo:lo + out.shape[0]]
            if mutate is not None:
                mutate(out)
            yield out
    return StreamedVectors(vectors.shape[0], vectors.shape[1], chunks)


@pytest.mark.parametrize("kind", ["raw", "archive"])
@pytest.mark.parametrize("rows_per", [1, 7, 1000])
def test_streamed_vectors_write_the_same_file_as_an_array(tmp_path, kind, rows_per):
    data = make_data(n=300, dim=24, kind=kind)
    a, _ = write(tmp_path, data, "array.vdb")
    data.vectors, vectors = _streamed(data.vectors, rows_per), data.vectors
    b, info = write(tmp_path, data, "streamed.vdb")
    assert a.read_bytes() == b.read_bytes()
    with SegmentReader.open(b) as r:
        assert np.array_equal(r.vectors, vectors) and r.verify() == info.size_bytes


def test_streamed_vectors_that_break_their_promise_are_refused_and_leave_no_file(tmp_path):
    calls = []

    def drift(chunk):  # a different byte on the second (write) pass
        calls.append(1)
        if len(calls) > 4:
            chunk[0, 0] += 1.0
    rows = np.random.default_rng(1).standard_normal((101, 8), dtype=np.float32)
    for n, stream, message in ((101, _streamed(rows[:100], 25), "100 rows, 101 declared"),
                               (99, _streamed(rows[:100], 25), "more than the declared 99"),
                               (100, _streamed(rows[:100], 25, drift), "other bytes than the checksum pass")):
        data = make_data(n=n, dim=8)
        data.vectors = StreamedVectors(n, 8, stream.chunks)
        with pytest.raises(ValueError, match=message):
            write_segment_tmp(tmp_path / "x.vdb.tmp", data)
        assert not (tmp_path / "x.vdb.tmp").exists()


@pytest.mark.parametrize("n,dim", [(1, 1), (33, 129), (600, 64)])
def test_read_vectors_into_equals_the_mapping_and_checks_its_output(tmp_path, n, dim):
    data = make_data(n=n, dim=dim, kind="raw")
    path, _ = write(tmp_path, data)
    with SegmentReader.open(path) as r:
        out = np.full((n + 2, dim), np.nan, dtype=np.float32)
        r.read_vectors_into(out[1:n + 1])
        np.testing.assert_array_equal(out[1:n + 1], data.vectors)
        assert np.isnan(out[0]).all() and np.isnan(out[n + 1]).all()  # nothing written outside
        strided = np.zeros((n, 2 * dim), np.float32)[:, ::2]
        tail = np.empty((n - n // 2, dim), np.float32)
        r.read_vectors_into(tail, start=n // 2)
        np.testing.assert_array_equal(tail, data.vectors[n // 2:])
        with pytest.raises(ValueError, match="outside"):
            r.read_vectors_into(np.zeros((n + 1, dim), np.float32))
        with pytest.raises(ValueError, match="outside"):
            r.read_vectors_into(tail, start=n // 2 + 1)
        for bad in (np.zeros((n, dim), np.float64), np.zeros((n, dim + 1), np.float32), strided):
            if bad is strided and bad.flags.c_contiguous:  # a 1 x 1 array is contiguous whatever its strides
                continue
            with pytest.raises(ValueError, match="out must be"):
                r.read_vectors_into(bad)


@pytest.mark.parametrize("n,dim", [(1, 1), (1, 4096), (2, 3), (3, 7), (17, 129), (1000, 1)])
@pytest.mark.parametrize("kind", ["raw", "archive"])
def test_edge_shapes(tmp_path, n, dim, kind):
    data = make_data(n=n, dim=dim, kind=kind, m=1)
    tags = data.tags.to_lists()
    sources = data.source_file.to_list()
    path, info = write(tmp_path, data)
    check_roundtrip(path, info, data, tags, sources)


def test_no_tags_no_sources_no_graph_all_tombstones(tmp_path):
    n = 5
    data = SegmentData(level=0, id_start=0, vectors=np.zeros((n, 2), np.float32), live=np.zeros(n, bool),
                       start_time_ms=np.zeros(n, np.uint32), duration_ms=np.zeros(n, np.uint32),
                       bpm=np.zeros(n, np.float32), tags=[[]] * n, source_file=[""] * n)
    path, info = write(tmp_path, data)
    assert not info.has_graph and info.live_count == 0
    with SegmentReader.open(path) as r:
        assert r.tag_dictionary == () and r.tag_ids.shape == (0,) and r.graph is None and not r.has_graph
        assert r.metadata(4) == {"source_file": "", "start_time_ms": 0, "duration_ms": 0, "bpm": 0.0, "tags": []}
        assert not r.live.any() and r.rows_with_tag("x").shape == (0,)
        r.verify()


def test_csr_inputs_and_compaction_path(tmp_path):
    """Columns handed over as CSR (as compaction does, from readers) round-trip unchanged."""
    a = make_data(n=30, seed=1, id_start=0)
    b = make_data(n=20, seed=2, id_start=30)
    pa, _ = write(tmp_path, a, "a.vdb")
    pb, _ = write(tmp_path, b, "b.vdb")
    with SegmentReader.open(pa) as ra, SegmentReader.open(pb) as rb:
        tags = TagsCSR.concat([ra.tags, rb.tags])
        srcs = StringsCSR.concat([ra.source_file, rb.source_file])
        merged = SegmentData(level=2, id_start=0, vectors=np.concatenate([ra.vectors, rb.vectors]),
                             live=np.concatenate([ra.live, rb.live]),
                             start_time_ms=np.concatenate([ra.start_time_ms, rb.start_time_ms]),
                             duration_ms=np.concatenate([ra.duration_ms, rb.duration_ms]),
                             bpm=np.concatenate([ra.bpm, rb.bpm]), tags=tags, source_file=srcs, graph=b"g")
        want = [ra.metadata(i) for i in range(30)] + [rb.metadata(i) for i in range(20)]
    pm, _ = write(tmp_path, merged, "m.vdb")
    with SegmentReader.open(pm) as r:
        assert r.metadata_rows(np.arange(50)) == want
        assert r.tags.row(3) == want[3]["tags"] and r.source_file[31] == want[31]["source_file"]


def test_alignment(tmp_path):
    for kind in ("raw", "archive"):
        data = make_data(n=33, dim=5, kind=kind, m=5)
        path, info = write(tmp_path, data, f"{kind}.vdb")
        with SegmentReader.open(path) as r:
            for name, (off, length, _) in r.sections.items():
                assert off % (4096 if name == "vectors" else 64) == 0, name
            assert r.sections["vectors"][0] % 4096 == 0
            assert r.vectors.ctypes.data % 4096 == 0
            assert r.sections["vectors"][0] + r.sections["vectors"][1] == r.size_bytes  # vectors last
            if kind == "archive":
                assert r.sections["pq_codebook"][0] % 64 == 0
                assert r.pq_codes.ctypes.data % 64 == 0


def _vma_flags(addr):
    """VmFlags of the mapping containing addr, from /proc/self/smaps (None if unavailable)."""
    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return None
    cur = False
    for line in text.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            cur = lo <= addr < hi
        elif cur and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return None


@pytest.mark.parametrize("mode", sorted(MADVISE_MODES))
def test_madvise_modes_apply(tmp_path, mode):
    data = make_data(n=3000, dim=32)
    path, _ = write(tmp_path, data)
    with SegmentReader.open(path, madvise=mode, strict_madvise=True) as r:
        assert r.advice == mode and r.advice_error is None
        flags = _vma_flags(r.vectors.ctypes.data)
        if flags is not None:  # the kernel really recorded the advice (v2.1's was EINVAL, CONTRACT.md R3)
            assert ("rr" in flags) == (mode == "random")
            assert ("sr" in flags) == (mode == "sequential")
        for other in sorted(MADVISE_MODES):
            r.madvise(other)
            assert r.advice == other
        with pytest.raises(ValueError, match="madvise mode"):
            r.madvise("bogus")
        r.drop_page_cache()
        assert 0.0 <= r.resident_fraction() <= 1.0
        assert float(r.vectors.sum()) == pytest.approx(float(data.vectors.sum()), rel=1e-4, abs=1e-2)
    with pytest.raises(ValueError, match="madvise"):
        SegmentReader.open(path, madvise="sometimes")


def _mapping_of(path, content: bytes):
    """A segio.Mapping of a new file holding `content` (the mapping outlives the closed fd)."""
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        return segio.Mapping(fd, len(content))
    finally:
        os.close(fd)


def test_mapping_madvise_checks_range(tmp_path):
    m = _mapping_of(tmp_path / "f", b"x" * 10000)
    m.madvise(4096, 100, mmap.MADV_RANDOM)
    m.madvise(0, 10000, mmap.MADV_WILLNEED)
    with pytest.raises(ValueError, match="outside"):
        m.madvise(9000, 2000, mmap.MADV_RANDOM)
    with pytest.raises(OSError):
        m.madvise(0, 100, 12345)  # unknown advice: the errno surfaces
    assert memoryview(m).readonly and bytes(memoryview(m)[:3]) == b"xxx"


def _sections_of(path):
    with SegmentReader.open(path) as r:
        return r.sections, r.size_bytes


def _flip(path, pos, bit=0):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << bit)]))


@pytest.mark.parametrize("kind", ["raw", "archive"])
def test_verify_catches_a_flipped_bit_in_every_section(tmp_path, kind):
    data = make_data(n=40, dim=8, kind=kind)
    path, _ = write(tmp_path, data)
    pristine = path.read_bytes()
    sections, size = _sections_of(path)
    assert sections
    opened = set()
    for name, (off, length, _) in sections.items():
        if length == 0:
            continue
        for pos, bit in ((off, 0), (off + length // 2, 3), (off + length - 1, 7)):
            path.write_bytes(pristine)
            _flip(path, pos, bit)
            try:
                r = SegmentReader.open(path)
            except SegmentChecksumError:
                raise AssertionError(f"a flip in {name} broke the header checksum")
            except SegmentFormatError as e:  # structural check caught it first (offsets, live flags)
                assert str(path) in str(e)
                continue
            with r, pytest.raises(SegmentChecksumError) as ei:
                r.verify()
            assert ei.value.section == name and str(path) in str(ei.value) and name in str(ei.value)
            opened.add(name)
    must_reach_verify = {"vectors", "bpm", "start_time_ms", "duration_ms", "source_blob", "graph"} | (
        {"pq_codebook", "pq_codes"} if kind == "archive" else set())
    assert must_reach_verify <= opened
    # the header and the section table
    for pos in (0, 9, 0x10, 0x20, 0x30, 0x3C, 64, 64 + 8, 64 + 32 * len(sections) - 1):
        path.write_bytes(pristine)
        _flip(path, pos, 1)
        with pytest.raises(SegmentFormatError) as ei:
            SegmentReader.open(path)
        if pos >= 0x0C:
            assert isinstance(ei.value, SegmentChecksumError) and ei.value.section == "header"
    # padding between sections must be zero
    path.write_bytes(pristine)
    gap = sorted((off + ln, name) for name, (off, ln, _) in sections.items())[0][0]
    _flip(path, gap + 1 if gap % 64 else sections["vectors"][0] - 1, 0)
    with SegmentReader.open(path) as r, pytest.raises(SegmentFormatError, match="padding"):
        r.verify()


def test_open_rejects_truncation_and_extension(tmp_path):
    data = make_data(n=40, dim=8, kind="archive")
    path, _ = write(tmp_path, data)
    pristine = path.read_bytes()
    size = len(pristine)
    cuts = sorted(set(list(range(0, 130)) + list(range(130, size, 41)) + [size - 1, size - 4096]))
    for cut in cuts:
        path.write_bytes(pristine[:cut])
        with pytest.raises(SegmentFormatError):
            SegmentReader.open(path)
    path.write_bytes(pristine + b"\0")
    with pytest.raises(SegmentFormatError, match="truncated or extended"):
        SegmentReader.open(path)


def test_wrong_magic_version_and_kind(tmp_path):
    raw, _ = write(tmp_path, make_data(n=4), "raw.vdb")
    arc, _ = write(tmp_path, make_data(n=4, kind="archive"), "arc.vdb")
    with pytest.raises(SegmentFormatError, match="segment kind is raw, expected archive"):
        SegmentReader.open(raw, kind="archive")
    with pytest.raises(SegmentFormatError, match="segment kind is archive, expected raw"):
        SegmentReader.open(arc, kind=SegmentKind.RAW)
    SegmentReader.open(arc, kind="archive").close()
    ref_v1 = tmp_path / "ref.vdb"  # v2.1's v1 format (CONTRACT.md R3)
    ref_v1.write_bytes(b"VIBDB001" + struct.pack("<II", 1, 2) + b"\0" * 8)
    with pytest.raises(SegmentFormatError, match="bad magic"):
        SegmentReader.open(ref_v1)
    empty = tmp_path / "empty.vdb"
    empty.write_bytes(b"")
    with pytest.raises(SegmentFormatError, match="shorter"):
        SegmentReader.open(empty)
    with pytest.raises(SegmentFormatError, match="regular file"):
        SegmentReader.open(tmp_path)
    # a raw file relabelled as archive (header CRC fixed up): the required sections are missing
    blob = bytearray(raw.read_bytes())
    blob[0x0C:0x10] = struct.pack("<I", 1 | F.FLAG_HAS_PQ)
    nsec = struct.unpack_from("<I", blob, 0x2C)[0]
    crc = segio.crc32c(bytes(blob[64:64 + 32 * nsec]), segio.crc32c(bytes(blob[:60])))
    blob[60:64] = struct.pack("<I", crc)
    bad = tmp_path / "relabelled.vdb"
    bad.write_bytes(bytes(blob))
    with pytest.raises(SegmentFormatError, match="pq_m|pq_codebook|not allowed"):
        SegmentReader.open(bad)
    # a future version, and version 0
    for version in (3, 0):
        blob = bytearray(raw.read_bytes())
        blob[8:12] = struct.pack("<I", version)
        bad.write_bytes(_fix_header_crc(blob))
        with pytest.raises(SegmentFormatError, match=f"unsupported segment format version {version}"):
            SegmentReader.open(bad)


def _fix_header_crc(blob: bytearray) -> bytes:
    nsec = struct.unpack_from("<I", blob, 0x2C)[0]
    blob[60:64] = struct.pack("<I", segio.crc32c(bytes(blob[64:64 + 32 * nsec]), segio.crc32c(bytes(blob[:60]))))
    return bytes(blob)


def test_version_1_files_are_read_and_only_version_2_archives_have_a_graph(tmp_path):
    """0.3.0 wrote version 1: its raw segments and graph-less archives still open; an archive that
    claims version 1 and carries a graph, or a raw one with scan codes, is refused (version 1 had
    no such thing)."""
    raw, _ = write(tmp_path, make_data(n=6, kind="raw"), "raw.vdb", scan_codes=False)
    arc_v1, _ = write(tmp_path, make_data(n=6, kind="archive", graph=False), "arc1.vdb")
    arc_v2, _ = write(tmp_path, make_data(n=6, kind="archive"), "arc2.vdb")
    for path in (raw, arc_v1, arc_v2):
        assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 2  # what this version writes
    with SegmentReader.open(arc_v2) as r:
        assert r.has_graph and r.graph is not None and r.pq_codes.shape == (6, 4)
    for path, has_graph in ((raw, True), (arc_v1, False)):
        blob = bytearray(path.read_bytes())
        blob[8:12] = struct.pack("<I", 1)
        path.write_bytes(_fix_header_crc(blob))
        with SegmentReader.open(path) as r:
            assert r.has_graph == has_graph and r.verify() == path.stat().st_size
    blob = bytearray(arc_v2.read_bytes())
    blob[8:12] = struct.pack("<I", 1)
    arc_v2.write_bytes(_fix_header_crc(blob))
    with pytest.raises(SegmentFormatError, match="version-1 archive segment must not set HAS_GRAPH"):
        SegmentReader.open(arc_v2)
    coded, _ = write(tmp_path, make_data(n=6, kind="raw"), "coded.vdb")
    blob = bytearray(coded.read_bytes())
    blob[8:12] = struct.pack("<I", 1)
    coded.write_bytes(_fix_header_crc(blob))
    with pytest.raises(SegmentFormatError, match="version-1 segment must not set HAS_SCAN_CODES"):
        SegmentReader.open(coded)


def test_publish_renames_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    tmp = tmp_path / "tmp" / "seg.vdb.tmp"
    tmp.parent.mkdir()
    final_dir = tmp_path / "segments"
    final_dir.mkdir()
    final = final_dir / "seg_1.vdb"
    write_segment_tmp(tmp, make_data(n=10))
    assert synced == ["file"]
    assert tmp.exists() and not final.exists()  # not visible under its final name yet
    publish_segment(tmp, final)
    assert final.exists() and not tmp.exists()
    assert synced == ["file", "dir", "dir"]  # destination and source directories
    SegmentReader.open(final).close()
    write_segment_tmp(tmp, make_data(n=10, seed=5))
    with pytest.raises(FileExistsError, match="never replaced"):
        publish_segment(tmp, final)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    tmp = tmp_path / "x.tmp"

    def boom(fd, bufs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", boom)
    with pytest.raises(OSError, match="No space"):
        write_segment_tmp(tmp, make_data(n=10))
    assert not tmp.exists()


def test_write_handles_partial_writes(tmp_path, monkeypatch):
    real = os.writev
    monkeypatch.setattr(W, "_IOV_MAX", 3)
    monkeypatch.setattr(W, "_WRITE_CHUNK", 1000)
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [b"".join(bytes(b) for b in bufs[:2])[:333]]))
    data = make_data(n=60, dim=9)
    path, info = write(tmp_path, data)
    check_roundtrip(path, info, data, data.tags.to_lists(), data.source_file.to_list())


def test_views_are_read_only_and_outlive_close(tmp_path):
    data = make_data(n=20, dim=4, kind="archive")
    path, _ = write(tmp_path, data)
    r = SegmentReader.open(path)
    for arr in (r.vectors, r.live, r.bpm, r.start_time_ms, r.duration_ms, r.tag_offsets, r.tag_ids,
                r.source_offsets, r.pq_codes):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1
        with pytest.raises(ValueError):
            arr.setflags(write=True)
    for mv in (r.pq_codebook, r.source_blob):
        assert mv.readonly
        with pytest.raises(TypeError):
            mv[0] = 1
    vec = r.vectors
    r.close()
    r.close()  # idempotent
    assert r.closed
    with pytest.raises(ValueError, match="closed"):
        r.vectors
    assert np.array_equal(vec, data.vectors)  # the view kept the mapping alive
    with SegmentReader.open(path) as r2:
        assert r2.count == 20
    assert r2.closed


def test_mapping_refuses_writable_buffers(tmp_path):
    m = _mapping_of(tmp_path / "f", b"abc" * 2000)
    import ctypes
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * 6000).from_buffer(m)  # asks for a writable buffer
    a = np.frombuffer(m, dtype=np.uint8)
    assert not a.flags.writeable and bytes(a[:3]) == b"abc"


def test_metadata_accessors(tmp_path):
    data = make_data(n=30)
    tags = data.tags.to_lists()
    path, _ = write(tmp_path, data)
    with SegmentReader.open(path) as r:
        assert r.row_of(1000) == 0 and r.row_of(1029) == 29
        for bad in (999, 1030):
            with pytest.raises(IndexError):
                r.row_of(bad)
        for bad in (-1, 30):
            with pytest.raises(IndexError):
                r.metadata(bad)
        with pytest.raises(IndexError):
            r.metadata_rows([0, 30])
        with pytest.raises(IndexError):
            r.metadata_rows([0.5])
        assert r.metadata_rows([]) == []
        assert r.metadata(np.int64(3)) == r.metadata(3)
        assert r.row_tags(5) == tags[5] and r.row_source_file(5) == data.source_file[5]
        for t in r.tag_dictionary:
            want = [i for i, row in enumerate(tags) if t in row]
            assert r.rows_with_tag(t).tolist() == want
            assert r.tag_dictionary[r.tag_id(t)] == t
        assert r.tag_id("no such tag") is None


def test_segment_data_validation():
    n, d = 4, 3
    ok = dict(level=0, id_start=0, vectors=np.zeros((n, d), np.float32), live=np.ones(n, bool),
              start_time_ms=np.zeros(n, np.uint32), duration_ms=np.zeros(n, np.uint32),
              bpm=np.zeros(n, np.float32), tags=[[]] * n, source_file=[""] * n)
    SegmentData(**ok)
    cases = [
        (dict(vectors=np.zeros((n, d), np.float64)), "vectors must have dtype float32"),
        (dict(vectors=np.zeros(n, np.float32)), "2-D"),
        (dict(vectors=[[0.0] * d] * n), "numpy float32 array"),
        (dict(vectors=np.zeros((0, d), np.float32)), "rows"),
        (dict(vectors=np.zeros((n, 4097), np.float32)), "dim in 1..4096"),
        (dict(vectors=np.zeros((n, 0), np.float32)), "dim in 1..4096"),
        (dict(live=np.ones(n + 1, bool)), "live must have shape"),
        (dict(live=np.full(n, 2)), "live must be a bool"),
        (dict(live=np.ones(n, np.float32)), "live must be a bool"),
        (dict(start_time_ms=np.full(n, -1)), r"start_time_ms\[0\] = -1 is outside"),
        (dict(duration_ms=np.full(n, 2**32)), r"duration_ms\[0\] = 4294967296 is outside"),
        (dict(duration_ms=np.zeros(n, np.float32)), "duration_ms must hold integers"),
        (dict(start_time_ms=np.zeros(n - 1, np.uint32)), "start_time_ms must have shape"),
        (dict(bpm=np.array([1.0, np.nan, 0, 0])), r"bpm\[1\] = .*nan.* is not finite"),
        (dict(bpm=np.array([1.0, 0, 1e39, 0])), r"bpm\[2\] .* not finite in float32"),
        (dict(bpm=np.array(["a"] * n)), "bpm must be numeric"),
        (dict(tags=[[]] * (n - 1)), "tags must have n = 4 rows"),
        (dict(tags=[[], ["b", "a"], [], []]), r"tags\[1\] = \['b', 'a'\] is not sorted and de-duplicated"),
        (dict(tags=[[], [], ["a", "a"], []]), r"tags\[2\] .* not sorted and de-duplicated"),
        (dict(tags=[[], [], [], [1]]), r"tags\[3\] holds a int"),
        (dict(tags=[[], "abc", [], []]), r"tags\[1\] must be a list"),
        (dict(tags="abcd"), "tags must be a list"),
        (dict(tags=[[], [], [], ["\ud800"]]), "cannot be encoded as UTF-8"),
        (dict(source_file=["", "", ""]), "source_file must have n = 4"),
        (dict(source_file=["", b"x", "", ""]), r"source_file\[1\] must be a str"),
        (dict(source_file=["", "", "\udcff", ""]), r"source_file\[2\] cannot be encoded"),
        (dict(level=256), r"level = 256 is outside \[0, 255\]"),
        (dict(level=True), "level must be an int"),
        (dict(id_start=-1), "id_start = -1 is outside"),
        (dict(id_start=2**63 - 2), "id_start = .* is outside"),
        (dict(pq_codes=np.zeros((n, 2), np.uint8)), "needs both pq_codebook and pq_codes"),
        (dict(pq_codebook=b"x"), "needs both pq_codebook and pq_codes"),
        (dict(pq_codebook=b"", pq_codes=np.zeros((n, 2), np.uint8)), "pq_codebook must not be empty"),
        (dict(pq_codebook=b"x", pq_codes=np.zeros((n, 4), np.uint8)), r"1 <= m <= dim = 3"),
        (dict(pq_codebook=b"x", pq_codes=np.zeros((n, 2), np.int8)), "pq_codes must be a 2-D uint8"),
        (dict(pq_codebook=b"x", pq_codes=np.zeros((n - 1, 2), np.uint8)), "pq_codes must have shape"),
        (dict(graph=12), "graph must be bytes-like"),
        (dict(tags=TagsCSR(["b", "a"], np.zeros(n + 1, np.uint32), np.zeros(0, np.uint32))),
         "dictionary must be sorted and unique"),
        (dict(tags=TagsCSR(["a"], np.array([0, 1, 1, 1, 2], np.uint32), np.zeros(1, np.uint32))),
         r"tags.offsets\[4\] breaks"),
        (dict(tags=TagsCSR(["a"], np.array([0, 1, 1, 1, 1], np.uint32), np.array([1], np.uint32))),
         "row 0 has an id >= len"),
        (dict(source_file=StringsCSR(np.array([0, 2, 1, 3, 3], np.uint64), b"abc")),
         r"source_file.offsets\[2\] breaks"),
        (dict(source_file=StringsCSR(np.array([0, 1, 2, 3], np.uint64), b"abc")), "n\\+1 = 5 entries"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            SegmentData(**{**ok, **change})
    with pytest.raises(ValueError, match="must be a SegmentData"):
        write_segment_tmp("/nonexistent/x", ok)


def test_non_contiguous_and_list_inputs_are_normalised(tmp_path):
    n = 6
    big = np.arange(n * 8, dtype=np.float32).reshape(n, 8)
    data = SegmentData(level=0, id_start=5, vectors=big[:, ::2], live=[1, 0, 1, 1, 1, 1],
                       start_time_ms=list(range(n)), duration_ms=[10] * n, bpm=[120] * n,
                       tags=[("a",)] * n, source_file=tuple("abcdef"), graph=bytearray(b"gg"))
    path, _ = write(tmp_path, data)
    with SegmentReader.open(path) as r:
        assert np.array_equal(r.vectors, big[:, ::2]) and r.live.tolist() == [True, False] + [True] * 4
        assert r.metadata(5) == {"source_file": "f", "start_time_ms": 5, "duration_ms": 10, "bpm": 120.0,
                                 "tags": ["a"]}


def test_crc32c():
    assert segio.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert segio.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in [1, 7, 8, 9, 63, 64, 65, 4095, 70001]:
        buf = rng.bytes(n)
        hw, sw = segio.crc32c(buf), segio.crc32c(buf, hw=False)
        assert hw == sw
        k = n // 3
        assert segio.crc32c(buf[k:], segio.crc32c(buf[:k])) == hw
    a = rng.standard_normal((100, 10)).astype(np.float32)
    assert segio.crc32c(a) == segio.crc32c(a.tobytes()) == segio.crc32c(memoryview(a))
    with pytest.raises(ValueError, match="C-contiguous"):
        segio.crc32c(a[:, ::2])
    with pytest.raises((TypeError, ValueError)):
        segio.crc32c("not bytes")


def test_constants_match_the_c_header():
    assert segio.MAGIC == F.MAGIC and segio.VERSION == F.VERSION
    assert (segio.HEADER_SIZE, segio.ENTRY_SIZE, segio.MAX_SECTIONS) == (F.HEADER_SIZE, F.ENTRY_SIZE, F.MAX_SECTIONS)
    assert (segio.PAGE_ALIGN, segio.ALIGN, segio.MAX_DIM) == (F.PAGE_ALIGN, F.ALIGN, F.MAX_DIM)
    assert (segio.MAX_COUNT, segio.MAX_LEVEL, segio.MAX_ID) == (F.MAX_COUNT, F.MAX_LEVEL, F.MAX_ID)
    assert (segio.FLAG_HAS_GRAPH, segio.FLAG_HAS_PQ) == (F.FLAG_HAS_GRAPH, F.FLAG_HAS_PQ)
    assert segio.NUM_SECTION_KINDS == len(F.Section)
    for s in F.Section:
        assert segio.section_name(int(s)) == s.label
    assert segio.CRC_FIELD == F.HEADER_STRUCT.size


def test_parse_header_reports_overflowing_sizes():
    """count * dim * 4 that wraps in 64 bits is rejected (v2.1's wrapping size check, CONTRACT.md R3)."""
    data = make_data(n=3, dim=2)
    raw = bytearray(F.pack_header(kind=SegmentKind.RAW, has_graph=False, count=2**31 - 1, id_start=0, dim=4096,
                                  level=0, pq_m=0, file_size=4096 + 24,
                                  sections={F.Section.VECTORS: (4096, 24, 0)}))
    with pytest.raises(SegmentFormatError, match="missing|length"):
        segio.parse_header(bytes(raw), 4096 + 24)
    del data


def test_real_graph_and_codebook_load_from_the_mapping(tmp_path):
    """The engine's path: HnswIndex.from_graph / ProductQuantizer.from_bytes straight off the mapping."""
    index_mod = pytest.importorskip("vibrato.index")
    pq_mod = pytest.importorskip("vibrato.pq")
    rng = np.random.default_rng(7)
    n, d = 500, 16
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base = dict(level=0, id_start=10_000, vectors=x, live=np.ones(n, bool), start_time_ms=np.zeros(n, np.uint32),
                duration_ms=np.zeros(n, np.uint32), bpm=np.zeros(n, np.float32), tags=[[]] * n,
                source_file=[""] * n)
    idx = index_mod.HnswIndex(d, m=8, ef_construction=64, seed=1)
    idx.add(x)
    raw_path, _ = write(tmp_path, SegmentData(**base, graph=idx.graph_bytes()), "raw.vdb")
    pq = pq_mod.ProductQuantizer(d, 4)
    pq.train(x, seed=1)
    arc_path, _ = write(tmp_path, SegmentData(**{**base, "level": 2}, pq_codebook=pq.to_bytes(),
                                              pq_codes=pq.encode(x)), "arc.vdb")
    with SegmentReader.open(raw_path, madvise="random") as r:
        g = index_mod.HnswIndex.from_graph(r.vectors, r.graph, id_base=r.id_start)
        ids, _ = g.search(x[:5], k=1, ef=64)
        assert ids.reshape(-1).tolist() == list(range(10_000, 10_005))
    with SegmentReader.open(arc_path) as r:
        q = pq_mod.ProductQuantizer.from_bytes(r.pq_codebook)
        assert np.array_equal(q.encode(x), r.pq_codes)


def test_quick_verify_skips_only_the_vector_section(tmp_path):
    """verify(skip_vectors=True) is the engine's start-up check: every section but the bulk vectors."""
    data = make_data(n=40, dim=8)
    path, _ = write(tmp_path, data)
    pristine = path.read_bytes()
    sections, _ = _sections_of(path)
    off, length, _ = sections["vectors"]
    _flip(path, off + length // 2, 2)
    with SegmentReader.open(path) as r:
        assert r.verify(skip_vectors=True) < r.size_bytes
        with pytest.raises(SegmentChecksumError, match="vectors"):
            r.verify()
    path.write_bytes(pristine)
    off, length, _ = sections["bpm"]
    _flip(path, off, 1)
    with SegmentReader.open(path) as r:
        with pytest.raises(SegmentChecksumError, match="bpm"):
            r.verify(skip_vectors=True)


def test_raw_segments_carry_the_scan_codes_of_their_vectors(tmp_path):
    """A raw segment holds kernels.scan_codes of its vectors (HAS_SCAN_CODES), read zero-copy; an
    archive (searched on its PQ codes) and a file written without them have none; both layouts
    verify, and the codes cost d + 4 bytes a row."""
    data = make_data(n=70, dim=24, kind="raw")
    coded, info = write(tmp_path, data, "coded.vdb")
    plain, plain_info = write(tmp_path, data, "plain.vdb", scan_codes=False)
    arc, _ = write(tmp_path, make_data(n=30, dim=24, kind="archive"), "arc.vdb")
    codes, scale = W.kernels.scan_codes(data.vectors)
    with SegmentReader.open(coded) as r:
        got_codes, got_scale = r.scan_codes
        np.testing.assert_array_equal(got_codes, codes)
        np.testing.assert_array_equal(got_scale, scale)
        assert not got_codes.flags.writeable and r.verify() == info.size_bytes
        assert {"scan_codes", "scan_scale"} <= set(r.sections)
    assert struct.unpack_from("<I", coded.read_bytes(), 0x0C)[0] & F.FLAG_HAS_SCAN_CODES
    for path in (plain, arc):
        with SegmentReader.open(path) as r:
            assert r.scan_codes is None and "scan_codes" not in r.sections and r.verify() == path.stat().st_size
    lengths = {s.name: s.length for s in info.sections}
    assert (lengths["scan_codes"], lengths["scan_scale"]) == (70 * 24, 70 * 4)
    assert {s.name for s in info.sections} - {s.name for s in plain_info.sections} == {"scan_codes", "scan_scale"}
