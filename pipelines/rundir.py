"""Run directories and manifests: the contract between stages.

A run directory is a local path or an object-store URI (``s3://bucket/runs/x``). Each stage writes its
outputs under ``<run>/<stage>/`` and ends by writing ``<run>/<stage>/manifest.json``. Later stages find
their inputs only through manifests. All I/O goes through pyarrow filesystems so local paths and
URIs behave the same; writes are atomic (temporary name, then rename — object stores commit a whole
object at once), so a crash never leaves a half-written file that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.config import ConfigError

MANIFEST = "manifest.json"


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI; a clear error for unknown schemes."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises several types for bad schemes / missing credentials
        raise ConfigError(f"path {uri}: cannot open its filesystem ({str(err).splitlines()[0]})") from None


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts if p]])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def cache_root() -> Path:
    """Where object-store files are copied on each node (``GROUNDUP_CACHE``, default ~/.cache/groundup)."""
    return Path(os.environ.get("GROUNDUP_CACHE", Path.home() / ".cache" / "groundup")).expanduser()


def _fingerprint(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of a file or of every file under a directory: a changed object gets a new copy."""
    if info.type == pafs.FileType.Directory:
        files = [e for e in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if e.type == pafs.FileType.File]
    else:
        files = [info]
    return sorted((e.path, e.size or 0, e.mtime_ns or 0) for e in files)


def local_copy(uri: str) -> Path:
    """A path on this node for the file or directory ``uri``.

    Local paths come back as they are. Object-store URIs are downloaded once per node into
    ``cache_root()`` (keyed by URI, sizes and modification times, so a rewritten object is fetched
    again); concurrent callers on one node (e.g. two training workers) wait on a file lock and share
    one copy, and a download interrupted half-way is never used.
    """
    if is_local(uri):
        return Path(resolve_filesystem(uri)[1])
    from filelock import FileLock

    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{uri}: not found")
    key = hashlib.sha256(json.dumps([uri, _fingerprint(fs, path, info)]).encode()).hexdigest()[:24]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key / (path.rstrip("/").rsplit("/", 1)[-1] or "root")
    if target.exists():
        return target
    with FileLock(str(root / f"{key}.lock")):
        if not target.exists():
            partial = root / key / f".partial-{uuid.uuid4().hex[:8]}"
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                download(uri, partial)
                os.replace(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
    return target


def download(uri: str, local: Path) -> Path:
    """Copy the file or directory ``uri`` (local or object store) to the local path ``local``."""
    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)  # copy_files creates the subdirectories, not the top one
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                    use_threads=True)
    return local


def upload(local: Path, uri: str, replace: bool = True) -> None:
    """Copy a local file or directory to ``uri`` (local or object store); ``replace`` clears a directory first."""
    fs, path = resolve_filesystem(uri)
    if is_local(uri) and Path(path).resolve() == Path(local).resolve():
        return
    if local.is_dir():
        if replace and fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        fs.create_dir(path, recursive=True)
    else:
        fs.create_dir(path.rstrip("/").rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)


def remove(uri: str) -> None:
    """Delete a file or directory (local or object store); missing is fine."""
    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def scratch_dir(uri: str, *parts: str) -> Path:
    """A node-local working directory standing in for ``uri`` while files are written (then uploaded)."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir(), "groundup-scratch", key).joinpath(*parts)


def code_version() -> str:
    """The git commit of the code that produced an artifact (or the package version outside git)."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "groundup-" + version("groundup")
        except PackageNotFoundError:
            return "unknown"


@dataclass(frozen=True)
class RunDir:
    """One run directory. ``uri`` is what the user gave; ``fs``/``root`` address it."""

    uri: str

    @property
    def _fs_root(self) -> tuple[pafs.FileSystem, str]:
        return resolve_filesystem(self.uri)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        return self._fs_root[1]

    def path(self, *parts: str) -> str:
        """Path inside ``fs`` (for pyarrow/Ray Data calls that take a filesystem)."""
        return join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """User-facing URI/path of a file in the run (local paths come back absolute)."""
        if is_local(self.uri):
            return join(self.root, *parts)
        return join(self.uri, *parts)

    @property
    def is_local(self) -> bool:
        return is_local(self.uri)

    def local_path(self, *parts: str) -> Path:
        if not is_local(self.uri):
            raise ConfigError(f"run {self.uri}: this step needs a local run directory")
        return Path(self.path(*parts))

    def working_path(self, *parts: str) -> Path:
        """Where this node writes ``parts`` of the run: the run itself when local, else a scratch
        directory whose contents the stage uploads (``upload``) before it writes its manifest."""
        if is_local(self.uri):
            return Path(self.path(*parts))
        return scratch_dir(self.uri, *parts)

    def check_writable(self, stage: str) -> None:
        """Fail in one line (ConfigError) when ``<run>/<stage>/`` cannot be written: a run path that is a
        file, a parent that is a file, a read-only place. Stages call this before any work."""
        probe = f"{stage}/.write-check-{uuid.uuid4().hex[:8]}"
        try:
            if is_local(self.uri):
                root = Path(self.root)
                for parent in (root, *root.parents):
                    if parent.exists():
                        if not parent.is_dir():
                            raise ConfigError(f"run {self.uri}: {parent} is a file, not a directory "
                                              "(give --run a directory path)")
                        break
            self.write_bytes(probe, b"")
            self.fs.delete_file(self.path(probe))
        except ConfigError:
            raise
        except Exception as err:  # permissions, read-only file systems, object-store access
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"run {self.uri}: cannot write the run directory ({detail})") from None

    def exists(self, *parts: str) -> bool:
        info = self.fs.get_file_info(self.path(*parts))
        return info.type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write atomically: temp name then rename on local disks; object stores commit whole objects."""
        target = self.path(relpath)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if is_local(self.uri):
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as out:
                out.write(data)
        return self.uri_of(relpath)

    def write_text(self, relpath: str, text: str) -> str:
        return self.write_bytes(relpath, text.encode("utf-8"))

    def write_json(self, relpath: str, obj: Any) -> str:
        return self.write_text(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_bytes(self, relpath: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(relpath)) as src:
                return src.read()
        except FileNotFoundError:
            raise ConfigError(f"{self.uri_of(relpath)}: not found") from None

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath).decode("utf-8"))

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> str:
        return self.write_json(f"{stage}/{MANIFEST}", manifest)

    def read_manifest(self, stage: str) -> dict[str, Any]:
        if not self.exists(stage, MANIFEST):
            raise ConfigError(
                f"run {self.uri}: no {stage}/{MANIFEST} (run `groundup {stage} --run {self.uri}` first)"
            )
        return self.read_json(f"{stage}/{MANIFEST}")


def new_manifest(stage: str, config: Any, started: float, **sections: Any) -> dict[str, Any]:
    """The common manifest shape; stages fill ``inputs``, ``outputs``, ``counts``, ``figures``."""
    finished = time.time()
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    manifest: dict[str, Any] = {
        "stage": stage,
        "config": cfg,
        "inputs": {},
        "outputs": {},
        "counts": {},
        "figures": {},
        "timings": {"started": started, "finished": finished, "wall_s": round(finished - started, 3)},
        "code_version": code_version(),
        "host": platform.node(),
    }
    for key, value in sections.items():
        if key == "timings":
            manifest["timings"].update(value)
        else:
            manifest[key] = value
    return manifest
