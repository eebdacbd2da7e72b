"""The single-file launcher, for real: the real C stub compiled here, real trees packed, the packed file run.

What matters to users: the first start unpacks once and runs the program as if started directly; later starts
reuse the unpacked folder; a noexec cache or /tmp is skipped; a damaged download says so in one line; crashes and
concurrent starts never leave a broken or doubled unpack; old builds are pruned but never one that is running.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.packaging.conftest import Packed, Run

DAMAGED = "appliance: this file is damaged or incomplete (download it again): "
PackTree = Callable[..., Packed]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_works(), reason="unshare --user --mount is not allowed here")


def test_pack_stores_what_does_not_compress_and_is_reproducible(payload: ModuleType, pack_tree: PackTree) -> None:
    first, again = pack_tree(), pack_tree()
    assert first.build_id == again.build_id  # an unchanged tree does not make users unpack again
    assert pack_tree(marker="changed").build_id != first.build_id
    entries = {e.path: e for e in payload.read_index(first.file)}
    assert entries["app/lib/data.txt"].method == payload.Method.DEFLATE
    assert entries["app/lib/blob.bin"].method == payload.Method.STORED  # random bytes: compression saves < 5 %
    assert entries["app/lib/weights.gguf"].method == payload.Method.STORED  # by suffix, though zeros compress
    assert entries["app/link"].kind == payload.Kind.SYMLINK
    assert entries["app/lib/tool"].mode == 0o750
    assert list(entries).index("app/lib") < list(entries).index("app/lib/data.txt")
    assert payload.read_trailer(first.file).program == "app/prog"


def test_first_run_unpacks_and_execs_the_program(pack_tree: PackTree) -> None:
    packed = pack_tree()
    args = ["two words", 'a "quoted" one', "it's", "", "--flag=$HOME"]
    proc = subprocess.Popen(
        [str(packed.file), *args], env=packed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=60)
    run = Run(proc.returncode, out, err)
    assert run.returncode == 0, run.stderr
    assert run.facts("arg") == args
    assert run.fact("pid") == str(proc.pid)  # exec'd in place: signals and exit status reach the program itself
    build = packed.build_dir
    assert run.fact("zero") == str(build / "app" / "prog")
    assert run.fact("exe") == str(packed.file)
    assert run.fact("unpacked") == str(build)
    assert "unpacked 6 files" in run.stderr
    assert (build / "app" / "lib" / "data.txt").read_text().startswith("compressible line")
    assert (build / "app" / "lib" / "nested" / "deep" / "empty").stat().st_size == 0
    assert (build / "app" / "lib" / "tool").stat().st_mode & 0o777 == 0o750
    assert os.readlink(build / "app" / "link") == "lib/data.txt"
    assert (build / "app" / "link").read_text() == (build / "app" / "lib" / "data.txt").read_text()
    assert leftovers(packed.unpack_root) == [".lock", packed.build_id]


def test_exit_status_stdin_and_umask_pass_through(pack_tree: PackTree) -> None:
    packed = pack_tree()
    assert packed.run("--exit", "7").returncode == 7
    assert packed.run(umask=0o027).fact("umask") == "0027"  # the launcher's own 077 is not handed on
    assert packed.run("--stdin", stdin="hello there\n").fact("stdin") == "hello there"


def test_argv0_stays_what_the_user_typed(payload: ModuleType, launcher: Path, cc: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    source = tmp_path / "argv0.c"
    source.write_text('#include <stdio.h>\nint main(int c, char **v) { (void)c; printf("argv0=%s\\n", v[0]); }\n')
    subprocess.run([cc, "-o", str(tree / "argv0"), str(source)], check=True)
    report = payload.pack(tree, "argv0", launcher, tmp_path / "appliance")
    env = {"APPLIANCE_UNPACK_DIR": str(tmp_path / "unpack")}
    for _ in range(2):  # the unpacking start and the reusing one
        done = subprocess.run(["what-i-typed"], executable=report.out, env=env, capture_output=True, text=True)
        assert done.stdout == "argv0=what-i-typed\n", done.stderr


def test_second_run_reuses_the_unpacked_folder(pack_tree: PackTree) -> None:
    packed = pack_tree()
    assert packed.run().returncode == 0
    program = packed.build_dir / "app" / "prog"
    inode = program.stat().st_ino
    os.utime(packed.build_dir / ".complete", (1000, 1000))
    again = packed.run("x")
    assert again.returncode == 0
    assert "reused" in again.stderr and "unpacked" not in again.stderr
    assert program.stat().st_ino == inode
    assert (packed.build_dir / ".complete").stat().st_mtime > 1000  # "last used", for pruning


def test_runs_with_an_empty_environment_but_the_unpack_dir(pack_tree: PackTree) -> None:
    packed = pack_tree()
    for _ in range(2):
        run = packed.run("a", env={"APPLIANCE_UNPACK_DIR": str(packed.unpack_root)})  # as `env -i` leaves it
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""  # silent unless asked
        assert run.fact("unpacked") == str(packed.build_dir)


@pytest.mark.parametrize("xdg", [False, True], ids=["home", "xdg"])
def test_env_i_with_home_unpacks_into_the_user_cache(pack_tree: PackTree, tmp_path: Path, xdg: bool) -> None:
    packed = pack_tree()
    home = tmp_path / "h"
    cache = tmp_path / "xdg" if xdg else home / ".cache"
    env = ["HOME=" + str(home)] + (["XDG_CACHE_HOME=" + str(cache)] if xdg else [])
    done = subprocess.run(["env", "-i", *env, str(packed.file), "a"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    root = cache / "appliance" / "unpacked"
    assert (root / packed.build_id / ".complete").is_file()
    assert root.stat().st_mode & 0o777 == 0o700
    assert not packed.unpack_root.exists()


def test_an_unsafe_unpack_dir_is_skipped(pack_tree: PackTree) -> None:
    packed = pack_tree()
    packed.unpack_root.mkdir()
    packed.unpack_root.chmod(0o777)  # anyone could swap our files there
    run = packed.run()
    assert run.returncode == 0
    assert "writable by others" in run.stderr
    assert run.fact("unpacked") == str(packed.home / ".cache" / "appliance" / "unpacked" / packed.build_id)


def test_no_usable_folder_names_what_was_tried(pack_tree: PackTree, tmp_path: Path) -> None:
    packed = pack_tree()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    run = packed.run(
        env={"APPLIANCE_UNPACK_DIR": str(not_a_dir), "HOME": str(not_a_dir / "home"), "TMPDIR": str(not_a_dir)}
    )
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert line.startswith("appliance: no folder to unpack into (")
    assert f"{not_a_dir} is not a folder" in line
    assert f"cannot create {not_a_dir / 'home'}" in line and f"cannot create {not_a_dir / 'appliance-'}" in line
    assert "set APPLIANCE_UNPACK_DIR" in line


@needs_unshare
def test_a_noexec_cache_falls_back_to_the_temp_folder(pack_tree: PackTree) -> None:
    packed = pack_tree()
    cache = packed.home / ".cache"
    cache.mkdir(parents=True)
    env = packed.env()
    del env["APPLIANCE_UNPACK_DIR"]
    script = 'mount -t tmpfs -o noexec none "$1" && exec "$2" hello'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(cache), str(packed.file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    run = Run(done.returncode, done.stdout, done.stderr)
    assert run.returncode == 0, run.stderr
    assert "noexec" in run.stderr
    assert run.facts("arg") == ["hello"]
    (build,) = packed.tmpdir.glob(f"appliance-*/unpacked/{packed.build_id}")
    assert run.fact("unpacked") == str(build)
    assert (build / ".complete").is_file()


@needs_unshare
@pytest.mark.parametrize(
    ("limit", "detail"),
    [("size=1m", "not enough free space"), ("size=10m,nr_inodes=6", "No space left on device")],
    ids=["checked-before", "runs-out-midway"],
)
def test_a_full_disk_says_how_much_is_needed(pack_tree: PackTree, tmp_path: Path, limit: str, detail: str) -> None:
    tree = tmp_path / "big"
    (tree / "app" / "more").mkdir(parents=True)
    (tree / "app" / "prog").write_text("#!/bin/sh\n")
    (tree / "app" / "prog").chmod(0o755)
    (tree / "app" / "noise").write_bytes(os.urandom(3_000_000))
    for i in range(5):
        (tree / "app" / "more" / str(i)).write_text(str(i))
    packed = pack_tree(tree)
    packed.unpack_root.mkdir()
    script = f'mount -t tmpfs -o {limit} none "$1" && chmod 700 "$1" && "$2"; rc=$?; ls -A "$1"; exit $rc'
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", packed.unpack_root, packed.file],
        env=packed.env(APPLIANCE_LAUNCHER_VERBOSE="0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert detail in line and "needs 3 MB" in line and "APPLIANCE_UNPACK_DIR" in line, line
    assert done.stdout.split() == [".lock"]  # no partial folder left on the full disk


def test_a_dead_unpacks_leftovers_are_removed_but_a_live_ones_kept(pack_tree: PackTree) -> None:
    packed = pack_tree()
    dead = subprocess.Popen(["true"])
    dead.wait()
    root = packed.unpack_root
    stale = [root / f"{packed.build_id}.partial-{dead.pid}", root / f"{'0' * 32}.trash-{dead.pid}"]
    live = root / f"{packed.build_id}.partial-{os.getpid()}"
    for folder in [*stale, live]:
        (folder / "x").mkdir(parents=True)
        (folder / "x" / "f").write_text("half")
    run = packed.run()
    assert run.returncode == 0
    assert "removed 2 leftover" in run.stderr
    assert not any(folder.exists() for folder in stale)
    assert live.exists()


def test_kill_during_unpack_then_a_rerun_works(pack_tree: PackTree, tmp_path: Path) -> None:
    tree = tmp_path / "big"
    (tree / "app").mkdir(parents=True)
    (tree / "app" / "prog").write_text("#!/bin/sh\necho ran\n")
    (tree / "app" / "prog").chmod(0o755)
    block = os.urandom(1 << 20)
    with (tree / "app" / "model.gguf").open("wb") as f:
        for _ in range(300):
            f.write(block)
    packed = pack_tree(tree)
    shutil.rmtree(tree)
    proc = subprocess.Popen([str(packed.file)], env=packed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = packed.unpack_root / f"{packed.build_id}.partial-{proc.pid}"
    while proc.poll() is None and not partial.exists():
        time.sleep(0.0002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the unpack finished before it could be killed"
    assert partial.exists() and not packed.build_dir.exists()
    run = packed.run()
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ran\n"
    assert "removed 1 leftover" in run.stderr
    assert leftovers(packed.unpack_root) == [".lock", packed.build_id]
    assert (packed.build_dir / "app" / "model.gguf").stat().st_size == 300 << 20
    shutil.rmtree(packed.build_dir)  # 600 MB less left in pytest's kept temp folders
    packed.file.unlink()


def test_concurrent_first_starts_unpack_once(pack_tree: PackTree) -> None:
    packed = pack_tree()
    procs = [
        subprocess.Popen(
            [str(packed.file), str(i)], env=packed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    runs = [Run(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
    assert [r.returncode for r in runs] == [0, 0, 0, 0]
    assert [r.facts("arg") for r in runs] == [["0"], ["1"], ["2"], ["3"]]
    assert sum("unpacked 6 files" in r.stderr for r in runs) == 1
    assert sum("reused" in r.stderr for r in runs) == 3
    assert leftovers(packed.unpack_root) == [".lock", packed.build_id]


def damage(file: Path, out: Path, cut: int | None = None, flip: int | None = None) -> Path:
    data = bytearray(file.read_bytes())
    if flip is not None:
        data[flip] ^= 0x40
    out.write_bytes(bytes(data[:cut]))
    out.chmod(0o755)
    return out


def assert_refused(run: Run, packed: Packed, detail: str) -> None:
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()  # one clear line, no crash
    assert line.startswith(DAMAGED) and detail in line, line
    assert not packed.build_dir.exists()
    assert not [name for name in leftovers(packed.unpack_root) if ".partial-" in name]


@pytest.mark.parametrize("where", ["mid-payload", "mid-trailer", "last-byte"])
def test_a_truncated_file_is_refused(payload: ModuleType, pack_tree: PackTree, where: str) -> None:
    packed = pack_tree()
    trailer, size = payload.read_trailer(packed.file), packed.file.stat().st_size
    cut = {
        "mid-payload": trailer.payload_offset + trailer.payload_size // 2,
        "mid-trailer": size - 50,
        "last-byte": size - 1,
    }[where]
    packed.file = damage(packed.file, packed.file.with_name("cut"), cut=cut)
    assert_refused(packed.run(env=packed.env(APPLIANCE_LAUNCHER_VERBOSE="0")), packed, "no payload at its end")


def test_the_bare_launcher_is_refused(launcher: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(launcher)], env={"APPLIANCE_UNPACK_DIR": str(tmp_path)}, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (1, DAMAGED + "no payload at its end (cut short?)\n")


@pytest.mark.parametrize(
    ("path", "where", "detail"),
    [
        ("app/lib/data.txt", "data", "app/lib/data.txt: its"),
        ("app/lib/blob.bin", "data", "app/lib/blob.bin: its"),
        ("app/lib/tool", "header", "corrupt header"),
    ],
    ids=["deflated", "stored", "header"],
)
def test_a_flipped_byte_is_refused(
    payload: ModuleType, pack_tree: PackTree, path: str, where: str, detail: str
) -> None:
    packed = pack_tree()
    (entry,) = [e for e in payload.read_index(packed.file) if e.path == path]
    at = entry.offset + entry.compressed_size // 2 if where == "data" else entry.offset - len(path) - 10
    packed.file = damage(packed.file, packed.file.with_name("flipped"), flip=at)
    assert_refused(packed.run(env=packed.env(APPLIANCE_LAUNCHER_VERBOSE="0")), packed, detail)


def test_old_builds_are_pruned_but_never_one_in_use(pack_tree: PackTree) -> None:
    builds = [pack_tree(marker=str(i)) for i in range(6)]
    root = builds[0].unpack_root

    def start(i: int, used_at: float) -> None:
        assert builds[i].run().returncode == 0
        os.utime(builds[i].build_dir / ".complete", (used_at, used_at))

    start(0, 1000)
    holder = os.open(builds[0].build_dir / ".inuse", os.O_RDONLY)  # as a running appliance holds it
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        for i in (1, 2, 3):
            start(i, 1000 + i)
        start(4, 2000)  # others: 0 (in use, oldest), 1, 2, 3 -> keeps 3 and 2 (most recent) and 0 (in use)
        assert {p.name for p in root.iterdir()} == {".lock", *(builds[i].build_id for i in (0, 2, 3, 4))}
        start(0, 1000)  # the in-use build still starts (and stays the least recently used one)
    finally:
        os.close(holder)
    start(5, 3000)  # others: 0 (no longer in use), 2, 3, 4 -> keeps 4 and 3
    assert {p.name for p in root.iterdir()} == {".lock", *(builds[i].build_id for i in (3, 4, 5))}


def hostile(payload: ModuleType, launcher: Path, out: Path, entries: list[tuple[str, int, bytes]]) -> Path:
    """A packed file with hand-made entries that pack() would never write."""
    writer = payload.PayloadWriter(out, launcher)
    writer.add("app", payload.Kind.DIR, 0o755)
    writer.add("app/prog", payload.Kind.FILE, 0o755, b"#!/bin/sh\necho ran\n")
    for path, kind, data in entries:
        writer.add(path, payload.Kind(kind), 0o755, data)
    return Path(writer.finish("app/prog").out)


@pytest.mark.parametrize(
    ("entries", "detail"),
    [
        ([("../evil", 0, b"x")], 'refusing entry path "../evil"'),
        ([("app/../../evil", 0, b"x")], "refusing entry path"),
        ([("{abs}", 0, b"x")], "refusing entry path"),
        ([("app/out", 2, b"../../evil")], "refusing symlink app/out"),
        ([("app/abs", 2, b"/etc")], "refusing symlink app/abs"),
        ([("app/here", 2, b"."), ("app/here/out", 2, b"../evil")], "inside symlink app/here"),
        ([(".complete", 0, b"")], 'refusing entry path ".complete"'),
    ],
    ids=["dotdot", "inner-dotdot", "absolute", "link-out", "link-absolute", "link-in-link", "marker"],
)
def test_hostile_paths_are_refused(
    payload: ModuleType, launcher: Path, tmp_path: Path, entries: list[tuple[str, int, bytes]], detail: str
) -> None:
    evil = tmp_path / "evil"
    entries = [(p.replace("{abs}", str(evil)), kind, data) for p, kind, data in entries]
    file = hostile(payload, launcher, tmp_path / "appliance", entries)
    packed = Packed(file, payload.read_trailer(file).build_id, tmp_path / "unpack", tmp_path / "h", tmp_path / "t")
    assert_refused(packed.run(env=packed.env(APPLIANCE_LAUNCHER_VERBOSE="0")), packed, detail)
    assert not evil.exists() and not (packed.unpack_root / "evil").exists()
