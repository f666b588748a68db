"""The completion marker of a run checkpoint, as a manifest: every file of the checkpoint with its size and sha256.

A checkpoint directory counts as written once its marker (`COMPLETE`) exists; the marker's content says what was
written, so a later reader can tell an intact checkpoint from one that was truncated, lost a file or had a byte
flipped since. Both engines (run_checkpoints: DeepSpeed, dcp_checkpoints: torch) use this one format:

    {"format": "megafusion-checkpoint/1", "step": 8, "checksum": "sha256",
     "files": {"rank0.pt": {"size": 48584, "sha256": "..."}, ...}}

A marker holding only the step number (checkpoints written before manifests existed) is *unverified*: loadable,
but nothing can be checked. Hashing is split by the caller: `file_records` hashes any subset of the files, so
the ranks of a run can each hash their share of a large checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megafusion.common.atomic import write_json_atomic
from megafusion.common.hashing import file_sha256

MARKER = "COMPLETE"
FORMAT = "megafusion-checkpoint/1"

# Verdict states, in the words `megafusion checkpoint verify` prints.
INTACT, UNVERIFIED, DAMAGED, INCOMPLETE = "intact", "unverified", "damaged", "incomplete"


@dataclass(frozen=True)
class Verdict:
    state: str
    reason: str = ""  # for DAMAGED: "<file>: <mismatch>"; for the others a short explanation

    @property
    def loadable(self) -> bool:
        return self.state in (INTACT, UNVERIFIED)

    def describe(self) -> str:
        return f"{self.state}: {self.reason}" if self.reason else self.state


def _is_temporary(name: str) -> bool:
    # common.atomic's temporary siblings (".<name>.tmp-<host>-<pid>-<id>") of a writer that may still be running.
    return name.startswith(".") and ".tmp-" in name


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint (relative POSIX paths, sorted), without the marker and temporary siblings."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*")
        if p.is_file() and p.name != MARKER and not _is_temporary(p.name)
    )


def file_records(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the named files of `directory`."""
    return {n: {"size": (directory / n).stat().st_size, "sha256": file_sha256(directory / n)} for n in names}


def write_manifest(directory: Path, step: int, records: dict[str, dict[str, Any]]) -> None:
    """Writes the marker atomically: it appears complete or not at all."""
    manifest = {"format": FORMAT, "step": step, "checksum": "sha256", "files": dict(sorted(records.items()))}
    write_json_atomic(directory / MARKER, manifest, indent=1)


def read_manifest(directory: Path) -> dict[str, Any] | None | Verdict:
    """The manifest; None for a legacy marker (a bare step number); a Verdict when the marker is missing or
    unreadable (nothing more to check then)."""
    marker = directory / MARKER
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return Verdict(INCOMPLETE, f"no {MARKER} marker: its save did not finish")
    except (OSError, UnicodeDecodeError) as err:
        return Verdict(DAMAGED, f"{MARKER}: unreadable ({err})")
    if text.strip().isdigit():
        return None
    try:
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"not a {FORMAT} manifest")
    except (ValueError, AttributeError) as err:
        return Verdict(DAMAGED, f"{MARKER}: unreadable manifest ({err})")
    return manifest


def check_files(directory: Path, manifest: dict[str, Any], names: list[str]) -> str | None:
    """The first of `names` (files of the manifest) that differs from it, as "<file>: <mismatch>"; None if all
    match. Sizes are compared before hashing so a truncated file costs no read."""
    for name in names:
        expected = manifest["files"][name]
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name}: missing (manifest: {expected['size']} bytes)"
        if size != expected["size"]:
            return f"{name}: size {size} bytes, manifest says {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name}: sha256 differs from the manifest (same size, {size} bytes: the content changed)"
    return None


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> Verdict:
    """Checks a checkpoint against its manifest. share=(i, n): only every n-th file from the i-th is read (the
    ranks of a run split the work); the marker itself is read whole by every caller."""
    manifest = read_manifest(directory)
    if manifest is None:
        return Verdict(UNVERIFIED, "no checksums (written before checkpoint manifests)")
    if isinstance(manifest, Verdict):
        return manifest
    index, count = share
    problem = check_files(directory, manifest, sorted(manifest["files"])[index::count])
    return Verdict(DAMAGED, problem) if problem else intact(manifest)


def intact(manifest: dict[str, Any]) -> Verdict:
    files = manifest["files"].values()
    return Verdict(INTACT, f"{len(files)} files, {sum(f['size'] for f in files) / 1e6:.1f} MB")
