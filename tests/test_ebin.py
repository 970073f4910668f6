"""The .ebin format (formats/ebin.md): round trips, atomic writes, every bad input -> FormatError,
the checked-in fixture read against the spec, and no page cache left behind by read()."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgerun import ebin
from edgerun.ebin import ALIGN, VERSION, ArrayInfo, EbinFile, EbinWriter
from edgerun.errors import FormatError

FIXTURE = Path(__file__).resolve().parent.parent / "formats" / "fixtures" / "tiny.ebin"

# --------------------------------------------------------------------------- the tiny fixture
# Values as listed in formats/ebin.md §Fixture. Never change them: the checked-in file must
# keep reading back exactly this.
TINY_ARRAYS = {
    "w.f32": np.array([[0, 1.5, -2], [3.25, 1e-3, 65504]], dtype=np.float32),
    "w.f16": np.array([1, -0.5, 0.1, 65504], dtype=np.float16),
    "q.u8": np.array([[0, 1], [127, 128], [254, 255]], dtype=np.uint8),
    "idx.i64": np.array([-1, 0, 2**40], dtype=np.int64),
    "scalar.i32": np.array(-7, dtype=np.int32),
    "empty.u16": np.zeros((0, 5), dtype=np.uint16),
}
TINY_OFFSETS = {"w.f32": 4096, "w.f16": 8192, "q.u8": 12288, "idx.i64": 16384,
                "scalar.i32": 20480, "empty.u16": 24576}
TINY_MANIFEST = {
    "format": {"min_reader_version": 1, "features": []},
    "config": {"architectures": ["TinyForTest"], "hidden_size": 3},
    "tokenizer": {"json": "{}", "chat_template": None, "bos_token_id": 1, "eos_token_ids": [2],
                  "add_bos_token": True, "special_tokens": {"eos_token": "</s>"}},
    "generation": {"temperature": 0.5},
    "tensors": {"w": {"codec": "f32", "params": {}, "shape": [2, 3], "parts": {"w": "w.f32"}}},
    "source": "tests/test_ebin.py::make_tiny — café ✓",
}


def make_tiny(path) -> None:
    """Writes formats/fixtures/tiny.ebin (run this file as a script to regenerate it)."""
    with EbinWriter(path) as w:
        for name, arr in TINY_ARRAYS.items():
            w.add_array(name, arr)
        w.close(TINY_MANIFEST)


def test_fixture_header_matches_spec():
    """Parse the header with struct exactly as formats/ebin.md §Header tabulates it."""
    data = FIXTURE.read_bytes()
    assert data[0:8] == b"EDGERUN\x00"
    version, flags, m_off, m_len, m_crc, align = struct.unpack_from("<IIQQII", data, 8)
    assert (version, flags, m_off, align) == (1, 0, 24576, 4096)
    assert data[40:60] == bytes(20) and data[64:4096] == bytes(4096 - 64)
    assert struct.unpack_from("<I", data, 60)[0] == zlib.crc32(data[:60])
    assert len(data) == m_off + m_len
    body = data[m_off:m_off + m_len]
    assert zlib.crc32(body) == m_crc
    arrays = json.loads(body.decode("utf-8"))["arrays"]
    for name, want in TINY_ARRAYS.items():
        e = arrays[name]
        assert e["offset"] == TINY_OFFSETS[name] and e["length"] == want.nbytes
        raw = data[e["offset"]:e["offset"] + e["length"]]
        assert zlib.crc32(raw) == e["crc32"]
        # C order, little-endian, straight from the bytes
        got = np.frombuffer(raw, dtype=np.dtype(e["dtype"]).newbyteorder("<")).reshape(e["shape"])
        np.testing.assert_array_equal(got, want)


def test_fixture_reads_back():
    with EbinFile(FIXTURE) as f:
        assert f.version == 1
        assert set(f.arrays) == set(TINY_ARRAYS)
        for name, want in TINY_ARRAYS.items():
            got = f.read(name, verify=True)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert f.arrays[name].offset == TINY_OFFSETS[name]
        f.verify()
        for k, v in TINY_MANIFEST.items():
            assert f.manifest[k] == v


def test_writer_still_produces_the_fixture_bytes(tmp_path):
    make_tiny(tmp_path / "t.ebin")
    assert (tmp_path / "t.ebin").read_bytes() == FIXTURE.read_bytes()


# --------------------------------------------------------------------------- round trips

def _write(path, arrays: dict, manifest=None):
    with EbinWriter(path) as w:
        infos = {n: w.add_array(n, a) for n, a in arrays.items()}
        w.close(manifest or {"source": "test"})
    return infos


def test_round_trip_dtypes_and_shapes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((70, 33)).astype(np.float32)
    arrays = {
        "f32": big,
        "f16": rng.standard_normal((5, 7)).astype(np.float16),
        "f64": rng.standard_normal(3),
        "u8": rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),
        "i8": rng.integers(-128, 128, 9, dtype=np.int8),
        "u16": rng.integers(0, 2**16, (2, 9), dtype=np.uint16),
        "i16": rng.integers(-2**15, 2**15, 6, dtype=np.int16),
        "u32": rng.integers(0, 2**32, 5, dtype=np.uint32),
        "i32": rng.integers(-2**31, 2**31, (1, 1), dtype=np.int32),
        "i64": rng.integers(-2**62, 2**62, 4, dtype=np.int64),
        "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "empty1": np.zeros(0, np.uint8),
        "noncontig": big[::3, 1::2],
        "fortran": np.asfortranarray(big[:10]),
        "bigendian": np.arange(11, dtype=">i4").reshape(11, 1),
        "after_empty": np.ones(3, np.int16),
    }
    monkeypatch.setattr(ebin, "CHUNK", 1000)   # exercise multi-chunk writes and reads
    p = tmp_path / "m.ebin"
    infos = _write(p, arrays, {"config": {"n": np.int64(3), "t": (1, 2)}})
    with EbinFile(p) as f:
        assert f.manifest["config"] == {"n": 3, "t": [1, 2]}
        assert f.file_size == p.stat().st_size
        for name, want in arrays.items():
            a = f.arrays[name]
            assert a == infos[name] and isinstance(a, ArrayInfo)
            assert a.offset % ALIGN == 0 and a.offset >= ALIGN
            assert a.dtype == want.dtype.name and a.shape == want.shape
            got = f.read(name, verify=True)
            assert got.dtype == want.dtype.newbyteorder("=") and got.shape == want.shape
            assert got.flags.c_contiguous and got.flags.owndata
            np.testing.assert_array_equal(got, want)
            out = np.empty(want.shape, want.dtype.newbyteorder("="))
            f.read_into(name, out)
            np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(f.read_rows("f32", 7, 40), big[7:40])
        calls = []
        f.verify(progress=lambda d, t: calls.append((d, t)))
        total = sum(a.nbytes for a in arrays.values())
        assert calls[-1] == (total, total) and len(calls) > 10


def test_bytes_written_and_layout(tmp_path):
    p = tmp_path / "m.ebin"
    with EbinWriter(p) as w:
        w.add_array("a", np.zeros(5000, np.uint8))
        w.add_array("b", np.zeros(1, np.uint8))
        w.close({})
        n = w.bytes_written
    assert n == p.stat().st_size
    with EbinFile(p) as f:
        assert f.arrays["a"].offset == 4096 and f.arrays["b"].offset == 12288
        assert f.manifest["format"] == {"min_reader_version": VERSION, "features": []}


def test_writer_rejects_bad_input(tmp_path):
    with EbinWriter(tmp_path / "m.ebin") as w:
        for bad in (np.zeros(3, bool), np.zeros(2, np.complex64), np.array(["x"])):
            with pytest.raises(ValueError, match="not storable"):
                w.add_array("x", bad)
        w.add_array("x", np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="duplicate"):
            w.add_array("x", np.zeros(2, np.float32))
        with pytest.raises(ValueError):
            w.add_array("", np.zeros(2, np.float32))
        w.abort()
    with pytest.raises(ValueError, match="arrays"):
        with EbinWriter(tmp_path / "n.ebin") as w:
            w.close({"arrays": {}})
    with pytest.raises(ValueError, match="JSON"):
        with EbinWriter(tmp_path / "n.ebin") as w:
            w.close({"x": float("nan")})
    assert sorted(os.listdir(tmp_path)) == []


# --------------------------------------------------------------------------- atomic writes

@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_leaves_no_files(tmp_path, exc):
    p = tmp_path / "m.ebin"
    with pytest.raises(exc):
        with EbinWriter(p) as w:
            w.add_array("a", np.ones(10, np.float32))
            assert (tmp_path / "m.ebin.tmp").exists()
            raise exc()
    assert os.listdir(tmp_path) == []


def test_aborted_write_keeps_existing_file(tmp_path):
    p = tmp_path / "m.ebin"
    _write(p, {"old": np.arange(4, dtype=np.int32)})
    before = p.read_bytes()
    with pytest.raises(ZeroDivisionError):
        with EbinWriter(p) as w:
            w.add_array("new", np.ones(10, np.float32))
            1 / 0
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.ebin"]
    # forgetting close() is a bug: no file appears, and it says so
    with pytest.raises(RuntimeError, match="close"):
        with EbinWriter(p) as w:
            w.add_array("new", np.ones(10, np.float32))
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.ebin"]
    # a successful write replaces it
    _write(p, {"new": np.ones(2, np.uint8)})
    with EbinFile(p) as f:
        assert list(f.arrays) == ["new"]


# --------------------------------------------------------------------------- bad inputs

@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.ebin"
    _write(p, {"first": np.arange(3000, dtype=np.float32),
               "second": np.arange(100, dtype=np.int16),
               "third": np.ones((4, 4), np.uint8)},
           {"config": {"hidden_size": 4}, "tokenizer": {"json": "{}" * 100}})
    return p


def _bad(path, data: bytes, match: str):
    path.write_bytes(data)
    with pytest.raises(FormatError, match=match) as e:
        EbinFile(path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_not_an_ebin(tmp_path):
    p = tmp_path / "x.ebin"
    _bad(p, b"", "empty")
    _bad(p, np.random.default_rng(1).bytes(10000), "not an .ebin")
    _bad(p, b"hello, this is a text file\n" * 10, "not an .ebin")
    _bad(p, b"GGUF" + bytes(100), "GGUF.*edgerun pack")
    _bad(p, struct.pack("<Q", 20) + b'{"a": 1}' + bytes(100), "safetensors")
    with pytest.raises(FormatError, match="no such file"):
        EbinFile(tmp_path / "missing.ebin")
    with pytest.raises(FormatError, match="directory"):
        EbinFile(tmp_path)


def test_wrong_magic_and_newer_version(good):
    data = bytearray(good.read_bytes())
    _bad(good, b"X" + bytes(data[1:]), "not an .ebin")
    d = bytearray(data)
    d[8:12] = struct.pack("<I", VERSION + 1)
    msg = _bad(good, bytes(d), "newer edgerun")
    assert f"format v{VERSION + 1}" in msg and f"reads up to v{VERSION}: upgrade" in msg
    d[8:12] = struct.pack("<I", 0)
    _bad(good, bytes(d), "invalid format version")


def test_incompatible_manifest_and_flags(tmp_path):
    p = tmp_path / "m.ebin"
    _write(p, {}, {"format": {"min_reader_version": VERSION + 1}})
    with pytest.raises(FormatError, match="min_reader_version.*upgrade"):
        EbinFile(p)
    _write(p, {}, {"format": {"features": ["teleport"]}, "unknown_key": 1})
    with pytest.raises(FormatError, match="teleport"):
        EbinFile(p)
    _write(p, {}, {"unknown_key": {"nested": 1}})
    with EbinFile(p) as f:                               # unknown keys are ignored
        assert f.manifest["unknown_key"] == {"nested": 1}
    d = bytearray(p.read_bytes())
    d[12:16] = struct.pack("<I", 1)
    d[60:64] = struct.pack("<I", zlib.crc32(bytes(d[:60])))
    _bad(p, bytes(d), "flags")


def test_truncated(good):
    data = good.read_bytes()
    n = len(data)
    m_off = struct.unpack_from("<Q", data, 16)[0]
    for cut, where in [(3, "header"), (10, "header"), (40, "header"), (63, "header"),
                       (2000, "data"), (4100, "data"), (m_off - 1, "data"),
                       (m_off + 5, "manifest"), (n - 1, "manifest")]:
        msg = _bad(good, data[:cut], "is truncated")
        assert f"in the {where}" in msg
        assert f"found {cut}" in msg
        if where != "header":
            assert f"expected at least {n} bytes" in msg


def test_corrupted_header_and_manifest(good):
    data = good.read_bytes()
    m_off = struct.unpack_from("<Q", data, 16)[0]
    d = bytearray(data)
    d[m_off + 10] ^= 0x20
    _bad(good, bytes(d), "manifest is corrupted")
    d = bytearray(data)
    d[24] ^= 1                                       # manifest length
    _bad(good, bytes(d), "header is corrupted")
    # a manifest that passes its crc but is not JSON / not an object / has a bad table
    e = '{"dtype": "%s", "shape": [%d], "offset": %d, "length": %d, "crc32": 0}'
    bodies = {
        "{not json": "not valid JSON",
        "[1, 2]": "not a JSON object",
        '{"arrays": 3}': "no \"arrays\" table",
        '{"arrays": {"a": %s}}' % (e % ("bool", 1, 4096, 1)): "'a': malformed",
        '{"arrays": {"a": %s}}' % (e % ("uint8", 2, 4096, 1)): "'a': length 1 does not match",
        '{"arrays": {"a": %s}}' % (e % ("uint8", 1, 4097, 1)): "'a': invalid offset",
        '{"arrays": {"a": %s}}' % (e % ("uint8", 1, 12288, 1)): "'a': invalid offset",
        '{"arrays": {"a": %s, "b": %s}}' % (e % ("uint8", 5000, 4096, 5000),
                                          e % ("uint8", 1, 8192, 1)): "'a' and 'b' overlap",
    }
    for body, match in bodies.items():
        d = bytearray(data[:12288]) + body.encode()      # manifest at offset 12288
        d[16:36] = struct.pack("<QQI", 12288, len(body), zlib.crc32(body.encode()))
        d[60:64] = struct.pack("<I", zlib.crc32(bytes(d[:60])))
        _bad(good, bytes(d), re.escape(match))


def test_only_regular_files_and_no_blocking(tmp_path):
    """A FIFO (opening it for reading would wait for a writer), a device and a directory are
    refused at once, before anything is read."""
    fifo = tmp_path / "pipe.ebin"
    os.mkfifo(fifo)
    for path, kind in [(fifo, "a FIFO"), (Path("/dev/zero"), "a device"), (tmp_path, "a directory")]:
        with pytest.raises(FormatError, match=kind):
            EbinFile(path)


def test_manifest_strict_and_bounded(good):
    """No NaN/Infinity, bounded nesting (a deep manifest is an error, not a RecursionError),
    typed format section and array entries (JSON true is not a dimension)."""
    data = good.read_bytes()
    m_off = struct.unpack_from("<Q", data, 16)[0]
    manifest = json.loads(data[m_off:])
    deep = json.dumps(manifest)[:-1] + ', "deep": ' + "[" * 10000 + "]" * 10000 + "}"
    shallow_enough = json.dumps({**manifest, "deep": json.loads("[" * 30 + "]" * 30)})
    first = dict(manifest["arrays"]["first"])
    bodies = {
        json.dumps(manifest).replace('"hidden_size": 4', '"hidden_size": NaN'): "NaN is not allowed",
        deep: "nested too deeply",
        json.dumps({**manifest, "deep": json.loads("[" * 40 + "]" * 40)}): "nested too deeply",
        json.dumps({**manifest, "format": {"features": "abc"}}): "features.*list of names",
        json.dumps({**manifest, "format": {"min_reader_version": "1"}}): "min_reader_version.*integer",
        json.dumps({**manifest, "arrays": {**manifest["arrays"], "first": {**first, "shape": [True] * 1}}}): "malformed",
        json.dumps({**manifest, "arrays": {**manifest["arrays"], "first": {**first, "crc32": 1 << 32}}}): "malformed",
        json.dumps({**manifest, "arrays": {**manifest["arrays"], "first": {**first, "offset": -4096}}}): "malformed",
    }
    for body, match in bodies.items():
        raw = body.encode()
        d = bytearray(data[:m_off]) + raw
        d[24:36] = struct.pack("<QI", len(raw), zlib.crc32(raw))
        d[60:64] = struct.pack("<I", zlib.crc32(bytes(d[:60])))
        _bad(good, bytes(d), match)
    raw = shallow_enough.encode()
    d = bytearray(data[:m_off]) + raw
    d[24:36] = struct.pack("<QI", len(raw), zlib.crc32(raw))
    d[60:64] = struct.pack("<I", zlib.crc32(bytes(d[:60])))
    good.write_bytes(bytes(d))
    with EbinFile(good) as f:
        assert f.read("first").shape == (3000,)


def test_corrupted_data_names_every_bad_array(good):
    with EbinFile(good) as f:
        off1, off3 = f.arrays["first"].offset, f.arrays["third"].offset
    d = bytearray(good.read_bytes())
    d[off1 + 777] ^= 0xFF
    d[off3] ^= 0x01
    good.write_bytes(bytes(d))
    with EbinFile(good) as f:                        # opening does not read data
        f.read("first", verify=False)                # asked not to check: no check
        with pytest.raises(FormatError, match="'first' is corrupted") as e:
            f.read("first")                          # reading checks the crc32 in the same pass
        assert str(good) in str(e.value)
        with pytest.raises(FormatError, match="'third' is corrupted"):
            f.read_into("third", np.empty((4, 4), np.uint8))
        f.read_rows("first", 0, 10)                  # a part of an array has no checksum
        f.read("second")
        f.verify(names=["second"], chunk=64)
        with pytest.raises(FormatError) as e:
            f.verify()
        msg = str(e.value)
        assert "first" in msg and "third" in msg and "second" not in msg
        assert str(good) in msg
        with pytest.raises(FormatError, match="no array named 'nope'"):
            f.read("nope")
        with pytest.raises(ValueError):
            f.read_into("second", np.empty(100, np.int32))
        with pytest.raises(ValueError):
            f.read_rows("second", 50, 101)


# --------------------------------------------------------------------------- page cache

def _cached_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_read_leaves_no_page_cache(tmp_path):
    p = tmp_path / "m.ebin"
    _write(p, {"a": np.ones(2_000_000, np.float32), "b": np.ones(1_000_001, np.uint8)})
    size = p.stat().st_size
    with open(p, "rb") as fh:                         # the measurement can see a cached file
        fh.read()
    if _cached_bytes(p) < size // 2:
        pytest.skip("this filesystem does not keep .ebin pages in the page cache")
    with EbinFile(p) as f:
        f.read("a")
        f.read("b")
        assert _cached_bytes(p) <= 2 * 4096          # at most the header/manifest pages
        f.verify()
        assert _cached_bytes(p) <= 2 * 4096


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    make_tiny(FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
