"""Writing WebDataset shards: image files -> `<prefix>-000000.tar, ...` + `manifest.json`.

Samples are `<key>.<jpg|png|webp>` + `<key>.json` (source path and size). Keys are zero-padded indices
(a dot in a key would split the sample in WebDataset's grouper). Encoded bytes are stored as they are unless
the image must be downscaled or is in another format (then re-encoded: JPEG q95, or PNG when it has alpha).

Also the atomic writers every tool here uses: `ShardWriter` (a tar written to `<name>.tmp`, fsynced, renamed) and
`write_atomic` (one file, the same way), and `check_output_folder`, the check of an `--out` folder before any work.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ShardReport:
    shards: list[dict] = field(default_factory=list)  # [{"name", "samples"}]
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    pattern: str = ""  # brace pattern of the shards written

    @property
    def total(self) -> int:
        return sum(s["samples"] for s in self.shards)


def list_images(source: str | os.PathLike) -> list[Path]:
    """A folder (searched recursively) or a text file with one image path per line (relative to the file)."""
    src = Path(source)
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if src.is_file():
        lines = [ln.strip() for ln in src.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return [p if p.is_absolute() else src.parent / p for p in map(Path, lines)]
    raise ValueError(f"source {str(src)!r} is neither a folder of images nor a file list; check the path")


def encode_image(data: bytes, max_side: int | None) -> tuple[bytes, str, tuple[int, int]]:
    """Return (bytes, extension, (w, h)); re-encode only when downscaling or when the format is not stored as is."""
    im = Image.open(io.BytesIO(data))
    ext = STORED_FORMATS.get(im.format or "")
    size = im.size
    if ext is not None and (max_side is None or max(size) <= max_side):
        im.verify()  # cheap integrity check of the container; the full decode happens at training time
        return data, ext, size
    im.load()
    if max_side is not None and max(size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    out = io.BytesIO()
    if has_alpha:
        im.save(out, format="PNG")
        return out.getvalue(), "png", im.size
    im.convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue(), "jpg", im.size


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: same input -> same bytes
    tar.addfile(info, io.BytesIO(payload))


# Atomic files ---------------------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make the renames inside `folder` durable (a crash after os.replace could otherwise undo them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """Check, before a tool does its work, that the folder `path` can be created (or exists) and written in: a
    wrong `--out` (a file, a folder under a file, no permission, a read-only mount) costs seconds, not a finished
    evaluation. Creates nothing: the nearest existing folder on the way gets an unnamed test file. Raises
    ValueError naming the flag, the path and the reason."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path}: is a file; give a folder (it is created if missing)")
        # a dangling symlink counts as there (and not a folder): mkdir would fail on it after the work
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink() or p == Path(p.anchor))
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        try:
            with tempfile.TemporaryFile(dir=existing):  # permissions, read-only file systems, no inodes left
                pass
        except OSError as err:  # it names a random temporary name: name the folder instead
            raise OSError(err.errno, err.strerror, str(existing)) from None
    except OSError as err:
        where = f" at {err.filename}" if err.filename and str(err.filename) != str(path) else ""
        reason = f"{err.strerror}{where}"
        raise ValueError(f"{flag} {path}: cannot write there ({reason}); give a folder you can write to") from None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """`check_output_folder` for the folder of a file the tool will write at `path`."""
    path = Path(path)
    check_output_folder(path.parent, f"{flag} {path}: the folder")


def write_atomic(path: str | os.PathLike, payload: bytes, *, replace: bool = True) -> bool:
    """Write `payload` to `path` via a temporary name in the same folder, fsync, rename: whoever reads `path`,
    even after a crash, sees the old file or the new one, never a part. Concurrent writers do not collide.

    `replace=False` keeps an existing file (a hard link, unlike a rename, fails when the name exists): returns
    whether this call wrote it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    written = True
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            written = False
        tmp.unlink()
    fsync_dir(path.parent)
    return written


class ShardWriter:
    """A tar shard written member by member to `<path>.tmp` and renamed to `<path>` by `commit()`, so a shard under
    its final name is always complete. Members get fixed metadata: the same members give the same bytes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        # Both stay open across calls (a shard outlives any with-block); commit() or abort() closes them.
        self._file = open(self.tmp, "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w")  # noqa: SIM115

    def add(self, name: str, payload: bytes) -> None:
        _add(self._tar, name, payload)

    def commit(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; the file object stays open for the fsync
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def _write_shard(path: Path, samples: list[tuple[str, bytes, str, dict]]) -> None:
    writer = ShardWriter(path)
    for key, data, ext, meta in samples:
        writer.add(f"{key}.{ext}", data)
        writer.add(f"{key}.json", json.dumps(meta).encode())
    writer.commit()  # a reader never sees a half-written shard


def write_shards(
    images: Sequence[str | os.PathLike] | Iterable[tuple[str, bytes]],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    max_side: int | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardReport:
    """Write images (paths, or (name, encoded bytes) pairs) into shards of `samples_per_shard` + manifest.json.

    Shuffles the order first (seeded; `shuffle_seed=None` keeps it) so that each shard is a random sample.
    Unreadable images are skipped and listed in the manifest. Refuses to touch a folder that already holds
    shards or a manifest unless `overwrite=True`.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if "." in prefix or "/" in prefix:
        raise ValueError(f"prefix={prefix!r} must not contain '.' or '/' (it names files inside out_dir)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = [out / "manifest.json"] if (out / "manifest.json").exists() else []
    existing = sorted(out.glob(f"{prefix}-*.tar")) + manifest
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} shard/manifest file(s) (e.g. {existing[0].name}); "
            "pass overwrite=True (--overwrite) or choose another folder"
        )
    for p in existing:
        p.unlink()
    items = list(images)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    report = _write_all(items, out, samples_per_shard, prefix, max_side, progress)
    summary = {"pattern": report.pattern, "total": report.total, "shards": report.shards, "skipped": report.skipped}
    write_atomic(out / "manifest.json", json.dumps(summary, indent=1).encode())
    return report


def _read(item: str | os.PathLike | tuple[str, bytes]) -> tuple[str, bytes]:
    if isinstance(item, tuple):
        return item
    return str(item), Path(item).read_bytes()


def _write_all(items: list, out: Path, per_shard: int, prefix: str, max_side: int | None, progress: bool):
    report, pending, index = ShardReport(), [], 0
    for item in tqdm(items, desc="shards", unit="img", disable=not progress):
        try:
            name, data = _read(item)
            payload, ext, (w, h) = encode_image(data, max_side)
        except Exception as e:  # unreadable file: record and go on (the manifest lists it)
            report.skipped.append({"path": str(item[0] if isinstance(item, tuple) else item), "reason": repr(e)})
            continue
        pending.append((f"{index:09d}", payload, ext, {"source": name, "width": w, "height": h}))
        index += 1
        if len(pending) == per_shard:
            _flush(report, out, prefix, pending)
            pending = []
    if pending:
        _flush(report, out, prefix, pending)
    n = len(report.shards)
    report.pattern = str(out / f"{prefix}-{{000000..{n - 1:06d}}}.tar") if n else ""
    return report


def _flush(report: ShardReport, out: Path, prefix: str, samples: list) -> None:
    name = f"{prefix}-{len(report.shards):06d}.tar"
    _write_shard(out / name, samples)
    report.shards.append({"name": name, "samples": len(samples)})
