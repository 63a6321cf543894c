"""store/images.py: in-process qcow2/raw header reading against real qemu-img images.

Every image qemu-img makes must read exactly as ``qemu-img info --backing-chain``
reports it; every hostile header must give a VirtError naming the file (never
another exception) and leave the file unchanged.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from virtshift.errors import ErrorCode, VirtError
from virtshift.store.images import read_chain, read_layer

from .conftest import blank_backing_format, make_image, qemu_img

# header offsets (qcow2 spec, docs/interop/qcow2.txt)
_VERSION = 4
_BACKING_OFFSET = 8
_BACKING_SIZE = 16
_CLUSTER_BITS = 20
_CRYPT = 32
_INCOMPAT = 72
_HEADER_LENGTH = 100
_EXT_BACKING_FORMAT = bytes.fromhex("E2792ACA")


def _qemu_chain(path: Path, fmt: str) -> list[dict[str, object]]:
    out = json.loads(
        qemu_img("info", "-U", "--output=json", "--backing-chain", "-f", fmt, str(path))
    )
    return out if isinstance(out, list) else [out]


def _assert_same_as_qemu_img(path: Path, fmt: str) -> None:
    ours = read_chain(str(path), fmt)
    theirs = _qemu_chain(path, fmt)
    assert len(ours) == len(theirs)
    for mine, info in zip(ours, theirs, strict=True):
        assert mine.filename == info["filename"]
        assert mine.format == info["format"]
        assert mine.virtual_size == info["virtual-size"]
        assert mine.backing_filename == info.get("backing-filename")
        assert mine.full_backing_filename == info.get("full-backing-filename")
        assert mine.backing_format == info.get("backing-filename-format")
    # the single-layer read is the chain's first entry
    assert read_layer(str(path), fmt) == ours[0]


@pytest.mark.parametrize(
    "options",
    [
        "compat=1.1",
        "compat=0.10",
        "compat=1.1,cluster_size=512",
        "compat=1.1,cluster_size=2M",
        "compat=1.1,extended_l2=on",
        "compat=1.1,compression_type=zstd,lazy_refcounts=on",
    ],
)
def test_qcow2_alone_and_in_chains(tmp_path: Path, options: str) -> None:
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", str(base), "3M")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, str(mid), "5M")
    _assert_same_as_qemu_img(mid, "qcow2")
    _assert_same_as_qemu_img(base, "raw")
    # mid -> base (raw, absolute name), top -> mid (relative name), in a subdirectory
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    sub = tmp_path / "sub"
    sub.mkdir()
    top = sub / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", options, "-b", "../mid.qcow2", "-F", "qcow2",
        str(top), "7M",
    )  # fmt: skip
    _assert_same_as_qemu_img(top, "qcow2")
    assert [x.format for x in read_chain(str(top), "qcow2")] == ["qcow2", "qcow2", "raw"]
    assert read_chain(str(top), "qcow2")[1].filename == f"{sub}/../mid.qcow2"
    # a qcow2 read as raw is a raw image of the file's size, as in QEMU
    _assert_same_as_qemu_img(top, "raw")


def test_relative_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "b.qcow2")
    make_image(tmp_path / "t.qcow2", backing=Path("b.qcow2"))
    monkeypatch.chdir(tmp_path)
    _assert_same_as_qemu_img(Path("t.qcow2"), "qcow2")
    assert [x.filename for x in read_chain("t.qcow2", "qcow2")] == ["t.qcow2", "b.qcow2"]


def test_unrecorded_backing_format_ends_the_chain(tmp_path: Path) -> None:
    base = make_image(tmp_path / "b.qcow2")
    mid = make_image(tmp_path / "m.qcow2", backing=base)
    top = make_image(tmp_path / "t.qcow2", backing=mid)
    blank_backing_format(mid)
    # qemu-img probes b.qcow2's format; the reader never does: the chain stops at
    # the layer that does not record it, and says so
    assert len(_qemu_chain(top, "qcow2")) == 3
    layers = read_chain(str(top), "qcow2")
    assert [x.filename for x in layers] == [str(top), str(mid)]
    assert layers[1].backing_filename == str(base)
    assert layers[1].backing_format is None


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _refused(path: Path, fmt: str = "qcow2", *, chain: bool = False) -> str:
    before = path.read_bytes() if path.is_file() else None
    read = read_chain if chain else read_layer
    with pytest.raises(VirtError) as exc:
        read(str(path), fmt)
    assert exc.value.code == ErrorCode.OPERATION_FAILED
    # the failing file is named: this one, or (in a chain) the layer that failed
    assert (str(path) if not chain else "cannot read image '") in exc.value.detail
    if before is not None:
        assert path.read_bytes() == before
    return exc.value.detail


def _u32(v: int) -> bytes:
    return struct.pack(">I", v)


def _u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def test_hostile_headers(tmp_path: Path) -> None:
    def fresh(name: str, *, backing: bool = True) -> Path:
        base = tmp_path / f"{name}-base.qcow2"
        if not base.exists():
            make_image(base)
        return make_image(tmp_path / f"{name}.qcow2", backing=base if backing else None)

    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    assert "truncated" in _refused(empty)
    short = tmp_path / "short.qcow2"
    short.write_bytes(fresh("s").read_bytes()[:50])
    assert "truncated" in _refused(short)
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\0" * 4096)
    assert "bad magic" in _refused(raw)
    assert "No such file" in _refused(tmp_path / "missing.qcow2")
    assert "not a regular file" in _refused(tmp_path, "raw")
    assert "not supported" in _refused(fresh("fmt"), "vmdk")

    cases: list[tuple[str, int, bytes, str]] = [
        ("magic", 0, b"QFI\xfa", "bad magic"),
        ("version", _VERSION, _u32(4), "version 4"),
        ("version1", _VERSION, _u32(1), "version 1"),
        ("cluster", _CLUSTER_BITS, _u32(30), "cluster size"),
        ("cluster-small", _CLUSTER_BITS, _u32(8), "cluster size"),
        ("crypt", _CRYPT, _u32(1), "encrypted"),
        ("huge-offset", _BACKING_OFFSET, _u64(1 << 63), "backing file offset"),
        ("offset-in-header", _BACKING_OFFSET, _u64(16), "backing file offset"),
        ("huge-size", _BACKING_SIZE, _u32(0xFFFFFFFF), "too long"),
        ("long-name", _BACKING_SIZE, _u32(1024), "too long"),
        ("unknown-feature", _INCOMPAT, _u64(1 << 40), "unknown incompatible"),
        ("corrupt", _INCOMPAT, _u64(2), "corrupt"),
        ("data-file", _INCOMPAT, _u64(4), "external data file"),
        ("header-length", _HEADER_LENGTH, _u32(50), "header length"),
        ("header-length-big", _HEADER_LENGTH, _u32(1 << 20), "header length"),
    ]
    for name, offset, data, why in cases:
        img = fresh(name)
        _patch(img, offset, data)
        assert why in _refused(img), name

    # a backing name with a NUL byte, and names with a protocol prefix
    for name, backing in (
        ("nul", b"a\0/etc/passwd"),
        ("json", b'json:{"file":{"driver":"file","filename":"/etc/passwd"}}'),
        ("nbd", b"nbd:localhost:10809"),
    ):
        img = fresh(name)
        raw_img = bytearray(img.read_bytes())
        (bf_offset,) = struct.unpack(">Q", raw_img[_BACKING_OFFSET : _BACKING_OFFSET + 8])
        raw_img[bf_offset : bf_offset + len(backing)] = backing
        raw_img[_BACKING_SIZE : _BACKING_SIZE + 4] = _u32(len(backing))
        img.write_bytes(bytes(raw_img))
        why = "NUL" if name == "nul" else "not a plain file name"
        assert why in _refused(img), name

    # header extensions: too large, a backing format name with a NUL, too long
    for name, ext_len, body, why in (
        ("ext-large", 0x7FFFFFFF, b"", "too large"),
        ("fmt-nul", 5, b"qc\0w2", "NUL"),
        ("fmt-long", 16, b"q" * 16, "too long"),
        ("fmt-15", 15, b"q" * 15, ""),
    ):
        img = fresh(name)
        raw_img = bytearray(img.read_bytes())
        pos = raw_img.find(_EXT_BACKING_FORMAT, 0, 65536)
        padded = body + b"\0" * (-len(body) % 8)
        # this extension, then the end marker
        new_ext = _EXT_BACKING_FORMAT + _u32(ext_len) + padded + b"\0" * 8
        raw_img[pos : pos + len(new_ext)] = new_ext
        img.write_bytes(bytes(raw_img))
        if why:
            assert why in _refused(img), name
        else:
            # 15 bytes is a legal name; the chain then refuses the unknown format
            assert read_layer(str(img), "qcow2").backing_format == "q" * 15
            assert "not supported" in _refused(img, chain=True)

    # an external data file named by its header extension (feature bit clear)
    img = fresh("data-ext", backing=False)
    raw_img = bytearray(img.read_bytes())
    (hlen,) = struct.unpack(">I", raw_img[_HEADER_LENGTH : _HEADER_LENGTH + 4])
    raw_img[hlen : hlen + 16] = bytes.fromhex("44415441") + _u32(4) + b"data" + b"\0" * 4
    img.write_bytes(bytes(raw_img))
    assert "external data file" in _refused(img)


def test_chain_refusals(tmp_path: Path) -> None:
    # a backing file that is missing, one that is not the recorded format, a loop
    base = make_image(tmp_path / "b.qcow2")
    top = make_image(tmp_path / "t.qcow2", backing=base)
    base.unlink()
    assert "No such file" in _refused(top, chain=True)
    qemu_img("create", "-q", "-f", "raw", str(base), "16M")
    assert "bad magic" in _refused(top, chain=True)
    base.unlink()
    make_image(base)
    # b -> t -> b: qemu-img create refuses a loop, an unsafe rebase writes one
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(base))
    assert "loop" in _refused(top, chain=True)
    assert read_layer(str(top), "qcow2").backing_format == "qcow2"  # one layer still reads


def test_random_header_damage_gives_clean_errors(tmp_path: Path) -> None:
    """Flip bytes of the first 4 KiB of real images: only VirtError, or a clean read."""
    base = make_image(tmp_path / "b.qcow2")
    good = make_image(tmp_path / "t.qcow2", backing=base).read_bytes()
    rng = random.Random(20261126)
    img = tmp_path / "fuzz.qcow2"
    outcomes: dict[str, int] = {"read": 0}
    codes: list[ErrorCode] = []
    for _ in range(400):
        data = bytearray(good)
        for _flip in range(rng.randint(1, 8)):
            pos = rng.randrange(0, 512) if rng.random() < 0.8 else rng.randrange(0, 4096)
            data[pos] = rng.randrange(256)
        img.write_bytes(bytes(data))
        try:
            layers = read_chain(str(img), "qcow2")
        except VirtError as err:
            codes.append(err.code)
        else:
            assert layers[0].format == "qcow2"
            outcomes["read"] += 1
    assert outcomes["read"] > 0
    assert codes
    assert set(codes) == {ErrorCode.OPERATION_FAILED}
