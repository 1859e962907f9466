"""Run directories and manifests: the contract between stages.

A run directory is a local path or an object-store URI (``s3://bucket/runs/x``). Each stage writes its
outputs under ``<run>/<stage>/`` and ends by writing ``<run>/<stage>/manifest.json``. Later stages find
their inputs only through manifests. All I/O goes through pyarrow filesystems so local paths and
URIs behave the same; writes are atomic (temporary name, then rename — object stores commit a whole
object at once), so a crash never leaves a half-written file that looks complete.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
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

    def local_path(self, *parts: str) -> Path:
        if not is_local(self.uri):
            raise ConfigError(f"run {self.uri}: this step needs a local run directory")
        return Path(self.path(*parts))

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
