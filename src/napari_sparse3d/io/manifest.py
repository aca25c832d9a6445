"""The manifest of a project (``sparse3d.json``), read as untrusted input.

A project may come from a colleague or a download.  Its manifest names the arrays
and checkpoints of the current versions, and those names become paths; so every
field is checked here before anything is read or deleted: types, ranges, version
names of the project's own pattern that resolve inside the project folder, and no
symbolic links on the way.  :mod:`napari_sparse3d.project` uses the same checks
before it deletes anything.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARRAY_KINDS",
    "ARRAY_NAME",
    "CHECKPOINT_FILE",
    "MANIFEST",
    "PROJECT_FORMAT",
    "PROJECT_FORMAT_VERSION",
    "no_links",
    "read_manifest",
    "safe_version",
    "validate_manifest",
]

PROJECT_FORMAT = "napari-sparse3d-project"
PROJECT_FORMAT_VERSION = 1
MANIFEST = "sparse3d.json"


# the names a project gives its versions; nothing else is ever read as a version or deleted
ARRAY_KINDS = ("annotations", "prediction", "probabilities")
ARRAY_NAME = re.compile(r"^(annotations|prediction|probabilities)-(\d{6,})$")
_CHECKPOINT_NAME = re.compile(r"^checkpoints/(latest|best)-(\d{6,})\.pt$")
# a checkpoint file, or the leftover of a killed write (old ``.pt.tmp``, now ``.latest-….pt.partial-<hex>``)
CHECKPOINT_FILE = re.compile(r"^((latest|best)-\d{6,}\.pt(\.tmp)?|\.(latest|best)-\d{6,}\.pt\.partial-[0-9a-f]{12})$")
_CURRENT_KEYS = {
    "annotations": ARRAY_NAME,
    "prediction": ARRAY_NAME,
    "probabilities": ARRAY_NAME,
    "checkpoint_latest": _CHECKPOINT_NAME,
    "checkpoint_best": _CHECKPOINT_NAME,
}
_HASH = re.compile(r"^[0-9a-f]{64}$")


def no_links(root: Path, relative: str) -> bool:
    """Whether no component of ``root / relative`` below ``root`` is a symbolic link."""
    p = root
    for part in Path(relative).parts:
        p = p / part
        if p.is_symlink():
            return False
    return True


def safe_version(root: Path, name: str) -> bool:
    """A name of the project's own pattern that stays inside the project, through no link."""
    if not isinstance(name, str) or not (ARRAY_NAME.match(name) or _CHECKPOINT_NAME.match(name)):
        return False
    return no_links(root, name) and (root / name).resolve().parent in {root.resolve(), (root / "checkpoints").resolve()}


def validate_manifest(manifest: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a manifest read from ``path`` (untrusted) and return it; ``ValueError`` names the file and field."""
    root = Path(path)
    where = str(root / MANIFEST)

    def fail(field: str, expected: str, got: Any) -> ValueError:
        shown = repr(got)
        return ValueError(f"{where}: field {field!r} must be {expected}, got {shown[:120]}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: the manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != PROJECT_FORMAT:
        raise ValueError(f"path: {str(root)!r} is not a napari-sparse3d project (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not is_int(version) or version < 1:
        raise fail("format_version", "a positive integer", version)
    if version > PROJECT_FORMAT_VERSION:
        raise ValueError(
            f"path: {str(root)!r} was written by a newer napari-sparse3d (project format {version}, this"
            f" version reads up to {PROJECT_FORMAT_VERSION}); upgrade napari-sparse3d"
        )
    shape = manifest.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_int(s) and 0 < s < 2**31 for s in shape)):
        raise fail("shape", "a list of three positive integers", shape)
    image = manifest.get("image")
    if not isinstance(image, dict):
        raise fail("image", "an object with path, hash, shape and dtype", image)
    if image.get("path") is not None and not isinstance(image.get("path"), str):
        raise fail("image.path", "null or a string", image.get("path"))
    if not (isinstance(image.get("hash"), str) and _HASH.match(image["hash"])):
        raise fail("image.hash", "a SHA-256 hex digest", image.get("hash"))
    ishape = image.get("shape")
    if not (isinstance(ishape, list) and 3 <= len(ishape) <= 4 and all(is_int(s) and s > 0 for s in ishape)):
        raise fail("image.shape", "a list of 3 or 4 positive integers", ishape)
    try:
        if np.dtype(image.get("dtype")).kind not in "biuf":
            raise TypeError
    except TypeError:
        raise fail("image.dtype", "a numeric dtype name", image.get("dtype")) from None
    spacing = manifest.get("spacing")
    three_positive = isinstance(spacing, list) and len(spacing) == 3 and all(is_number(s) and s > 0 for s in spacing)
    if spacing is not None and not three_positive:
        raise fail("spacing", "null or three positive numbers", spacing)
    if manifest.get("config") is not None and not isinstance(manifest.get("config"), str):
        raise fail("config", "null or a JSON string", manifest.get("config"))
    slices = manifest.get("annotated_slices")
    if not isinstance(slices, dict):
        raise fail("annotated_slices", "an object {axis: [indices]}", slices)
    for axis, indices in slices.items():
        if axis not in ("0", "1", "2"):
            raise fail("annotated_slices", "keyed by axis 0, 1 or 2", axis)
        if not (isinstance(indices, list) and all(is_int(i) and 0 <= i < shape[int(axis)] for i in indices)):
            raise fail(f"annotated_slices.{axis}", f"a list of slice indices in [0, {shape[int(axis)]})", indices)
    counter = manifest.get("counter")
    if not is_int(counter) or counter < 0:
        raise fail("counter", "a non-negative integer", counter)
    current = manifest.get("current")
    if not isinstance(current, dict):
        raise fail("current", "an object naming the current versions", current)
    for key, name in current.items():
        pattern = _CURRENT_KEYS.get(key)
        if pattern is None:
            raise fail("current", f"keyed by {sorted(_CURRENT_KEYS)}", key)
        match = pattern.match(name) if isinstance(name, str) else None
        if match is None or (key in ARRAY_KINDS and match.group(1) != key):
            example = "checkpoints/latest-000001.pt" if key.startswith("checkpoint") else f"{key}-000001"
            raise fail(f"current.{key}", f"a version name like {example}", name)
        if not safe_version(root, name):
            raise fail(f"current.{key}", "a version inside the project folder, not a symbolic link", name)
        if int(match.group(2)) > counter:
            raise fail("counter", f"at least the number of every current version ({name})", counter)
    if image.get("path") is None and not no_links(root, "image"):
        raise fail("image", "stored in the project (image/ may not be a symbolic link)", "image -> link")
    history = manifest.get("history", [])
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise fail("history", "a list of objects", history)
    for i, entry in enumerate(history):  # a training step each: its number and its loss (NaN for a skipped one)
        if not (is_int(entry.get("iteration")) and entry["iteration"] >= 0 and isinstance(entry.get("loss"), (int, float))):
            raise fail(f"history[{i}]", "an object with a step number 'iteration' and a 'loss'", entry)
    for field in ("best_loss",):
        if manifest.get(field) is not None and not is_number(manifest[field]):
            raise fail(field, "a finite number", manifest[field])
    if manifest.get("revision") is not None and not (is_int(manifest["revision"]) and manifest["revision"] >= 0):
        raise fail("revision", "a non-negative integer", manifest["revision"])
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise ValueError(f"path: {str(path)!r} is not a napari-sparse3d project (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"path: the manifest of {str(path)!r} is unreadable ({exc})") from exc
    return validate_manifest(manifest, path)
