#!/usr/bin/env python3
"""Pack a root filesystem directory into a one-layer OCI image layout, without a registry.

    python3 oci_layout.py ROOTFS OUT [--tag latest] [--env K=V ...] [--workdir DIR]

``OUT`` becomes an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) that
boxlite takes as ``BoxOptions(rootfs_path=OUT)``. The layer is the whole tree as one gzip tar;
the config's ``rootfs.diff_ids`` holds the sha256 of the *uncompressed* tar, which is what
runtimes verify after unpacking (the manifest's layer digest is the compressed blob's).

Stdlib only, so it runs on a bare build host. Entries are written in sorted order with numeric
owners and no user/group names, and gzip carries no timestamp: the same tree gives the same
digests, and host account names never leak into the image.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

LAYOUT_VERSION = "1.0.0"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

# OCI names architectures as Go does (GOARCH), not as uname does.
_GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Layout:
    """What was written: the manifest's descriptor and the layer's two digests."""

    path: Path
    manifest: Descriptor
    layer: Descriptor
    diff_id: str


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it to ``sink``."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def go_arch(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    try:
        return _GO_ARCH[machine.lower()]
    except KeyError:
        raise ValueError(f"no OCI architecture name known for machine {machine!r}") from None


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = info.gname = ""
    return info


def write_layer(rootfs: Path, sink: _Sink) -> tuple[str, Descriptor]:
    """Write ``rootfs`` as a gzip tar to ``sink``; return (diff_id, compressed descriptor)."""
    compressed = _HashingWriter(sink)
    # filename="" and mtime=0 keep the gzip header free of anything that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
        uncompressed = _HashingWriter(gz)
        # Stream mode ("w|") only ever writes, so a write-only object is all it needs.
        stream = cast(IO[bytes], uncompressed)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for entry in sorted(os.listdir(rootfs)):
                tar.add(rootfs / entry, arcname=entry, recursive=True, filter=_anonymous)
    return uncompressed.digest, Descriptor(MEDIA_LAYER_GZIP, compressed.digest, compressed.size)


def _write_blob(blobs: Path, data: bytes, media_type: str) -> Descriptor:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return Descriptor(media_type, f"sha256:{digest}", len(data))


def _canonical(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def image_config(
    diff_id: str,
    arch: str,
    env: Sequence[str],
    workdir: str,
    cmd: Sequence[str],
) -> dict[str, object]:
    return {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": list(env), "WorkingDir": workdir, "Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "claudebox-pool deploy/image/oci_layout.py"}],
    }


def write_layout(
    rootfs: Path,
    out: Path,
    *,
    tag: str = "latest",
    env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    workdir: str = "/",
    cmd: Sequence[str] = ("/bin/sh",),
    arch: str | None = None,
) -> Layout:
    """Write ``rootfs`` as the OCI image layout ``out`` (which must not exist yet)."""
    if not rootfs.is_dir():
        raise NotADirectoryError(f"root filesystem {rootfs} is not a directory")
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first, a layout is written whole")
    arch = arch or go_arch()
    # Built beside ``out`` and renamed at the end, so a failed run never leaves a half layout
    # that a runtime would import.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        blobs = staging / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        partial = blobs / "layer.partial"
        with partial.open("wb") as sink:
            diff_id, layer = write_layer(rootfs, sink)
        partial.rename(blobs / layer.digest.removeprefix("sha256:"))
        config = _write_blob(
            blobs, _canonical(image_config(diff_id, arch, env, workdir, cmd)), MEDIA_CONFIG
        )
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json()],
        }
        manifest = _write_blob(blobs, _canonical(manifest_doc), MEDIA_MANIFEST)
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    **manifest.to_json(),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {REF_NAME: tag},
                }
            ],
        }
        (staging / "index.json").write_bytes(_canonical(index))
        (staging / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": LAYOUT_VERSION}))
        # mkdtemp made it private; workers may run as another user than the builder.
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Layout(out, manifest, layer, diff_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rootfs", type=Path, help="directory to pack (the image's /)")
    parser.add_argument("out", type=Path, help="OCI layout directory to create")
    parser.add_argument("--tag", default="latest", help="ref name annotation in index.json")
    parser.add_argument(
        "--env", action="append", metavar="K=V", help="image environment, repeatable"
    )
    parser.add_argument("--workdir", default="/", help="image working directory")
    args = parser.parse_args(argv)
    extra = {"env": args.env} if args.env else {}
    layout = write_layout(args.rootfs, args.out, tag=args.tag, workdir=args.workdir, **extra)
    print(f"{layout.path}: manifest {layout.manifest.digest}, layer {layout.layer.size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
