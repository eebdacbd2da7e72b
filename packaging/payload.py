"""Wrap a PyInstaller onedir build into one self-extracting file: ``[launcher][payload][program path][trailer]``.

Why: PyInstaller's own one-file mode unpacks everything into a fresh temp folder on every start, fails where /tmp is
noexec and leaks temp folders after a crash. The launcher (``launcher/launcher.c``) instead unpacks this payload
once into a per-user cache folder named by the build id, and later starts only exec the unpacked program.

This file is a script-side helper, not part of a package: ``packaging/`` must not become the ``packaging`` Python
package (PyPI's ``packaging`` owns that name), so ``build.py`` imports it as ``payload`` from its own folder.

Format (all integers little-endian; ``launcher.c`` reads the same and documents it too):

``payload``
    ``entry_count`` entries back to back. Each is a 36-byte header ``<IIBBHQQII``: path length, mode (permission
    bits), kind (0 file, 1 dir, 2 symlink), method (0 stored, 1 raw deflate: no zlib wrapper, whose adler32 would
    only repeat the crc32), reserved (0), data size (bytes in the file), size (unpacked bytes), crc32 of the unpacked
    bytes, crc32 of the header's first 32 bytes followed by the path. Then the UTF-8 relative path (``/``-separated,
    no empty, ``.`` or ``..`` parts), then the data; a symlink's data is its target, which must stay inside the tree.
    Folders come before their contents.
``program path``
    UTF-8, relative to the unpacked folder: the executable the launcher execs.
``trailer``
    92 bytes ``<32sQQQQII20s``: build id (32 hex chars: the first 16 bytes of sha256 of the payload), payload offset,
    payload size, entry count, total unpacked size, program path length, crc32 of the trailer's first 68 bytes
    followed by the program path, and the magic ``APPLIANCE-PAYLOAD\\0v1`` last, so a truncated file has none.

The same tree always packs to the same build id (sorted walk, deterministic deflate), so rebuilding an unchanged
tree does not make users unpack again.

Where and how the launcher unpacks (cache folder choice, locking, clean-up of old builds) is described at the top of
``launcher/launcher.c``. The program it execs keeps its argv and pid and finds ``APPLIANCE_EXECUTABLE`` (the single
file) and ``APPLIANCE_UNPACKED`` (its unpacked folder) in its environment.
"""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"APPLIANCE-PAYLOAD\x00v1"
HEADER = struct.Struct("<IIBBHQQII")
TRAILER = struct.Struct("<32sQQQQII20s")
LAUNCHER_SOURCE = Path(__file__).resolve().parent / "launcher" / "launcher.c"
_COPY_CHUNK = 8 << 20


class Kind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2


class Method(enum.IntEnum):
    STORED = 0
    DEFLATE = 1


class PayloadError(ValueError):
    """A packed file that cannot be read back: truncated, damaged, or not a packed file at all."""


class LauncherBuildError(RuntimeError):
    """The C compiler could not build the launcher."""


@dataclass(frozen=True)
class Entry:
    """One file, folder or symlink of the packed tree, as stored."""

    path: str
    kind: Kind
    mode: int
    method: Method
    compressed_size: int  # bytes in the packed file (the target's length for a symlink)
    original_size: int
    crc32: int
    offset: int  # where its data starts in the packed file


@dataclass(frozen=True)
class Trailer:
    build_id: str
    payload_offset: int
    payload_size: int
    entry_count: int
    unpacked_size: int
    program: str


@dataclass(frozen=True)
class PackReport:
    """What ``pack`` wrote, for the build script's summary."""

    out: Path
    build_id: str
    launcher_size: int
    payload_size: int
    unpacked_size: int
    file_size: int
    entries: tuple[Entry, ...]

    def largest(self, n: int = 10) -> list[Entry]:
        """The entries that cost most bytes in the file: what to look at when it grows."""
        return sorted(self.entries, key=lambda e: e.compressed_size, reverse=True)[:n]


def compile_launcher(out: Path, cc: str | None = None) -> Path:
    """Build the launcher stub with the machine's C compiler; zlib linked statically where libz.a exists."""
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise LauncherBuildError("no C compiler found: set CC or install cc/gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [compiler, "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(out), str(LAUNCHER_SOURCE)]
    cmd.append(_static_zlib(compiler) or "-lz")
    if sys.platform != "darwin":
        cmd.append("-s")  # macOS's linker has no -s; strip runs below instead
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LauncherBuildError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    if sys.platform == "darwin" and shutil.which("strip"):
        subprocess.run(["strip", str(out)], check=True)
    return out


def _static_zlib(compiler: str) -> str | None:
    """The path of libz.a as the compiler sees it, so the launcher needs no libz on the user's machine."""
    try:
        found = subprocess.run([compiler, "-print-file-name=libz.a"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    path = found.stdout.strip()
    return path if os.path.isabs(path) and os.path.isfile(path) else None


class PayloadWriter:
    """Low-level writer: launcher bytes, then entries as given, then program path and trailer.

    It checks nothing about the paths (tests use it to craft hostile files); ``pack`` is the safe front door.
    """

    def __init__(self, out: Path, launcher: Path) -> None:
        self.out = out
        self._tmp = out.with_name(out.name + ".tmp")
        self._file: BinaryIO = self._tmp.open("wb")
        try:
            with launcher.open("rb") as src:
                shutil.copyfileobj(src, self._file, _COPY_CHUNK)
        except BaseException:
            self.abort()
            raise
        self.launcher_size = self._file.tell()
        self._sha = hashlib.sha256()
        self.entries: list[Entry] = []
        self.unpacked_size = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._file.write(data)

    def add(
        self,
        path: str,
        kind: Kind,
        mode: int,
        data: bytes = b"",
        *,
        method: Method = Method.STORED,
        original_size: int | None = None,
        crc: int | None = None,
    ) -> Entry:
        """Append one entry whose data (compressed already when method is DEFLATE) is in memory."""
        size = len(data) if original_size is None else original_size
        crc = zlib.crc32(data) if crc is None else crc
        return self.add_stream(path, kind, mode, iter([data]), data_size=len(data), size=size, crc=crc, method=method)

    def add_stream(
        self,
        path: str,
        kind: Kind,
        mode: int,
        chunks: Iterator[bytes],
        *,
        data_size: int,
        size: int,
        crc: int,
        method: Method,
    ) -> Entry:
        """Append one entry whose data comes in chunks (a big stored file need not fit in memory)."""
        name = path.encode()
        head = HEADER.pack(len(name), mode, kind, method, 0, data_size, size, crc, 0)[:32]
        self._write(head + struct.pack("<I", zlib.crc32(name, zlib.crc32(head))) + name)
        entry = Entry(path, kind, mode, method, data_size, size, crc, self._file.tell())
        written = 0
        for chunk in chunks:
            self._write(chunk)
            written += len(chunk)
        if written != data_size:
            raise OSError(f"{path} changed while it was packed ({data_size} bytes expected, {written} read)")
        self.entries.append(entry)
        self.unpacked_size += size
        return entry

    def finish(self, program: str) -> PackReport:
        """Write the trailer, make the file executable and move it into place."""
        payload_size = self._file.tell() - self.launcher_size
        build_id = self._sha.hexdigest()[:32]
        name = program.encode()
        head = TRAILER.pack(
            build_id.encode(),
            self.launcher_size,
            payload_size,
            len(self.entries),
            self.unpacked_size,
            len(name),
            0,
            MAGIC,
        )[:68]
        self._file.write(name + head + struct.pack("<I", zlib.crc32(name, zlib.crc32(head))) + MAGIC)
        file_size = self._file.tell()
        self._file.close()
        self._tmp.chmod(0o755)
        self._tmp.replace(self.out)
        return PackReport(
            self.out, build_id, self.launcher_size, payload_size, self.unpacked_size, file_size, tuple(self.entries)
        )

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Item:
    """One thing found in the tree, before its data is read."""

    path: str
    source: Path
    kind: Kind
    mode: int
    size: int


@dataclass(frozen=True)
class _Prepared:
    """A file's data as it will be stored (compressed or not), or None when it is streamed from disk."""

    data: bytes | None
    method: Method
    crc: int


def pack(
    tree: Path,
    program: str,
    launcher: Path,
    out: Path,
    *,
    stored_suffixes: tuple[str, ...] = (".gguf",),
    level: int = 9,
    jobs: int | None = None,
    min_saving: float = 0.05,
) -> PackReport:
    """Pack ``tree`` behind ``launcher`` into ``out``; the launcher will exec ``tree/program`` once unpacked.

    A file is stored uncompressed when its suffix is in ``stored_suffixes`` (a quantized model does not compress)
    or when deflate saves less than ``min_saving`` of it: inflating costs first-start time (about 1.6 s of CPU
    per 290 MB here), so a build that wants a faster first start over a smaller file raises ``min_saving``.
    """
    tree = tree.resolve()
    target = tree / program
    if not _relative_ok(program) or not target.is_file() or not os.access(target, os.X_OK):
        raise ValueError(f"{program!r} is not an executable file inside {tree}")
    items = list(_walk(tree))
    workers = jobs or os.cpu_count() or 1
    writer = PayloadWriter(out, launcher)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[tuple[_Item, Future[_Prepared] | None]] = deque()
            for item in items:
                future = None
                if item.kind is Kind.FILE:
                    stored = item.path.endswith(tuple(stored_suffixes))
                    future = pool.submit(_prepare, item, stored, level, min_saving)
                pending.append((item, future))
                while len(pending) > 4 * workers:  # bounded look-ahead keeps memory to a few files' worth
                    _emit(writer, *pending.popleft())
            while pending:
                _emit(writer, *pending.popleft())
        return writer.finish(program)
    except BaseException:
        writer.abort()
        raise


def _relative_ok(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _walk(tree: Path) -> Iterator[_Item]:
    """Everything under tree, folders before their contents, sorted so the same tree gives the same build id."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            source = base / name
            rel = source.relative_to(tree).as_posix()
            st = source.lstat()
            mode = stat.S_IMODE(st.st_mode) & 0o777
            if stat.S_ISLNK(st.st_mode):
                link = os.readlink(source)
                if not _link_inside(rel, link):
                    raise ValueError(f"symlink {rel} -> {link} points outside {tree}")
                yield _Item(rel, source, Kind.SYMLINK, 0o777, len(link.encode()))
            elif stat.S_ISDIR(st.st_mode):
                yield _Item(rel, source, Kind.DIR, mode, 0)
            elif stat.S_ISREG(st.st_mode):
                yield _Item(rel, source, Kind.FILE, mode, st.st_size)
            else:
                raise ValueError(f"{source} is neither a file, a folder nor a symlink")
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]


def _link_inside(link: str, target: str) -> bool:
    """Whether a relative target, resolved lexically from the link's folder, stays inside the tree."""
    if not target or target.startswith("/"):
        return False
    depth = link.count("/")
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _prepare(item: _Item, stored: bool, level: int, min_saving: float) -> _Prepared:
    """Compress one file (zlib releases the GIL, so workers run in parallel); keep it stored if that saves little."""
    if stored:
        crc = 0
        with item.source.open("rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                crc = zlib.crc32(chunk, crc)
        return _Prepared(None, Method.STORED, crc)
    raw = item.source.read_bytes()
    crc = zlib.crc32(raw)
    deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = deflate.compress(raw) + deflate.flush()
    if len(packed) > len(raw) * (1 - min_saving):
        return _Prepared(raw, Method.STORED, crc)
    return _Prepared(packed, Method.DEFLATE, crc)


def _emit(writer: PayloadWriter, item: _Item, future: Future[_Prepared] | None) -> None:
    if item.kind is Kind.SYMLINK:
        writer.add(item.path, Kind.SYMLINK, item.mode, os.readlink(item.source).encode())
    elif item.kind is Kind.DIR:
        writer.add(item.path, Kind.DIR, item.mode)
    else:
        assert future is not None
        prepared = future.result()
        if prepared.data is not None:
            writer.add(
                item.path,
                Kind.FILE,
                item.mode,
                prepared.data,
                method=prepared.method,
                original_size=item.size,
                crc=prepared.crc,
            )
        else:
            chunks = _chunks(item.source)
            writer.add_stream(
                item.path,
                Kind.FILE,
                item.mode,
                chunks,
                data_size=item.size,
                size=item.size,
                crc=prepared.crc,
                method=Method.STORED,
            )


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            yield chunk


def read_trailer(file: Path) -> Trailer:
    """The trailer of a packed file, checked; raises PayloadError for a file that is not one, or is cut short."""
    with file.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < TRAILER.size:
            raise PayloadError(f"{file} is only {size} bytes long")
        f.seek(size - TRAILER.size)
        raw = f.read(TRAILER.size)
        build_id, offset, payload_size, count, unpacked, program_len, crc, magic = TRAILER.unpack(raw)
        if magic != MAGIC:
            raise PayloadError(f"{file} has no payload at its end (cut short?)")
        if offset + payload_size + program_len + TRAILER.size != size:
            raise PayloadError(f"{file}: its size does not match its trailer")
        f.seek(offset + payload_size)
        program = f.read(program_len)
    if zlib.crc32(program, zlib.crc32(raw[:68])) != crc:
        raise PayloadError(f"{file}: its trailer is corrupt")
    return Trailer(build_id.decode("ascii"), offset, payload_size, count, unpacked, program.decode())


def read_index(file: Path) -> list[Entry]:
    """The entries of a packed file, read from their headers without unpacking anything."""
    trailer = read_trailer(file)
    entries: list[Entry] = []
    end = trailer.payload_offset + trailer.payload_size
    with file.open("rb") as f:
        pos = trailer.payload_offset
        for _ in range(trailer.entry_count):
            f.seek(pos)
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise PayloadError(f"{file}: entry {len(entries)} is cut short")
            path_len, mode, kind, method, _, data_size, size, crc, head_crc = HEADER.unpack(head)
            name = f.read(path_len)
            if zlib.crc32(name, zlib.crc32(head[:32])) != head_crc:
                raise PayloadError(f"{file}: entry {len(entries)} has a corrupt header")
            pos += HEADER.size + path_len
            if pos + data_size > end:
                raise PayloadError(f"{file}: {name.decode(errors='replace')} is cut short")
            try:
                entries.append(Entry(name.decode(), Kind(kind), mode, Method(method), data_size, size, crc, pos))
            except ValueError as e:
                raise PayloadError(f"{file}: entry {len(entries)}: {e}") from e
            pos += data_size
    if pos != end:
        raise PayloadError(f"{file}: {end - pos} stray bytes after the last entry")
    return entries
