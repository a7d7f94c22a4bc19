"""The writing side of the engine directory: manifest writer, build lock, atomic staging.

The contract (file layout, manifest fields) and its one reader (`read_manifest` -> `Manifest`,
`check_engine_dir`) are in `vila_edge.engine_dir`, below the runtime.

Builds are atomic: everything is written to a hidden temp dir next to the target (".NAME.build-<pid>-*")
and renamed into place at the end; a lock file "NAME.lock" (created with O_EXCL, holding the pid) keeps
two builds off one directory. Leftovers of killed builds are removed by the next build of NAME and
ignored by everything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from vila_edge.engine_dir import MANIFEST, Manifest
from vila_edge.errors import EngineError


def file_table(root) -> dict[str, int]:
    """{relative path: size} of every file under root except the manifest (sorted, '/' separators)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def write_manifest(root, manifest: Manifest) -> None:
    """Write manifest.json (through a temp file + rename: a manifest is either absent or complete)."""
    root = Path(root)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, root / MANIFEST)


# ---- locking ---------------------------------------------------------------------------------


def lock_path(target) -> Path:
    target = Path(target)
    return target.parent / (target.name + ".lock")


def _pid_alive(pid: int, started: float | None) -> bool:
    try:
        import psutil

        proc = psutil.Process(pid)
        # a recycled pid belongs to a process that started after the lock was written
        return not (started is not None and proc.create_time() > started + 2.0)
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except Exception:  # psutil.NoSuchProcess, AccessDenied on a zombie, ...
        return False


class BuildLock:
    """`NAME.lock` next to the target, created with O_CREAT|O_EXCL; holds {"pid", "host", "started"}.

    A lock whose process is gone (same host) is stale and taken over; a live one is refused.
    """

    def __init__(self, target):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    # being written right now, or garbage: give a writer a moment, then judge it
                    time.sleep(0.2)
                    owner = self._read()
                if owner is not None and (owner.get("host") != info["host"]
                                          or _pid_alive(int(owner.get("pid", -1)), owner.get("started"))):
                    raise EngineError(
                        f"{self.target}: another build (pid {owner.get('pid')} on {owner.get('host')}) is writing it; "
                        f"wait for it, or delete {self.path} if that build is gone"
                    ) from None
                # stale: move it aside atomically (only one contender wins the rename), then retry
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                try:
                    moved = json.loads(aside.read_text())
                except (OSError, ValueError):
                    moved = None
                if owner is not None and moved is not None and moved != owner:
                    # another contender replaced the stale lock with a live one in between: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, self.path)
                    with contextlib.suppress(OSError):
                        os.unlink(aside)
                    raise EngineError(f"{self.target}: another build (pid {moved.get('pid')}) is writing it; wait for it") from None
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise EngineError(f"{self.path}: could not take the build lock; delete it if no build is running")

    def release(self) -> None:
        if self.held:
            owner = self._read()
            if owner is None or owner.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- atomic publication ------------------------------------------------------------------------


def temp_prefix(target) -> str:
    return f".{Path(target).name}.build-"


def clean_stale(target) -> list[Path]:
    """Remove temp dirs left by killed builds of `target`. Call only while holding its BuildLock."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if p.name.startswith(temp_prefix(target)) or p.name.startswith(f".{target.name}.replaced-"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staging(target):
    """Yield a fresh temp dir next to `target`; on success it replaces `target` (rename), on any
    exception (Ctrl-C included) it is deleted and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the published directory should not be
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, target: Path) -> None:
    """Move tmp into target's place. An existing target is renamed aside first, then deleted."""
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = target.parent / f".{target.name}.replaced-{os.getpid()}-{int(time.time() * 1000)}"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (same filesystem: instant, no extra disk) or copy one file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
