"""Checkpoints: the registry, verified cached downloads, safe loading, the official import.

Our format (``vitreg-checkpoint-1``) is a safetensors file of the model tensors whose metadata
(a string dict, JSON-encoded values) holds ``format``, ``config``, ``frame``, ``recipe`` and
``vitreg_version``. Nothing is ever unpickled: our files are read with safetensors only, and
the authors' ``torch.save`` files with ``torch.load(weights_only=True)``.

A checkpoint name resolves (:func:`resolve`) to, in order: an existing path; a file shipped in
the package (``weights/<name>.safetensors``); the user cache (``$VITREG_HOME``, else the
platform's user cache folder); a download from the registry's URLs (:func:`fetch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import torch

from vitreg import __version__
from vitreg.container import read_container, write_container
from vitreg.errors import OptionError, VitregError
from vitreg.files import plain_file_mode
from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig, load_state_dict

FORMAT = "vitreg-checkpoint-1"
SUFFIX = ".safetensors"
REGISTRY_FILE = "registry.json"
OFFICIAL_NAME = "vitvnet-ixi-official"
DEFAULT_ALIAS = "default"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PATH_SUFFIXES = (SUFFIX, ".pth", ".pt", ".tar", ".ckpt", ".bin")
DOWNLOAD_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60

ProgressCallback = Callable[[int, int], None]
"""Called as ``report(bytes_done, bytes_total)`` while a download runs."""


@dataclass(frozen=True)
class Checkpoint:
    """A vitreg checkpoint read from disk: tensors plus what is needed to use them."""

    config: VitVNetConfig
    frame: ModelFrame
    recipe: dict
    vitreg_version: str
    state_dict: dict[str, torch.Tensor]
    path: Path


@dataclass(frozen=True)
class RegistryEntry:
    """One registry checkpoint: where to download it (size in bytes) and what it holds."""

    name: str
    description: str
    urls: tuple[str, ...]
    sha256: str | None
    size: int | None
    config: dict
    frame: dict
    licence: str
    import_only: bool
    how_to_get: str
    frame_note: str = ""


@dataclass(frozen=True)
class Registry:
    """The checkpoint registry read from ``source`` (a file path, for messages)."""

    source: str
    default: str
    entries: dict[str, RegistryEntry]


# ---------------------------------------------------------------------------------------------
# Folders and the registry


def shipped_dir() -> Path:
    """The folder shipped as ``vitreg._weights`` (``weights/`` in the source tree)."""
    try:
        return Path(str(resources.files("vitreg._weights")))
    except ModuleNotFoundError:  # a source tree on sys.path that was never pip-installed
        return Path(__file__).resolve().parent.parent / "weights"


def cache_dir() -> Path:
    """``$VITREG_HOME``, else the platform's user cache folder for vitreg."""
    if os.environ.get("VITREG_HOME"):
        return Path(os.environ["VITREG_HOME"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vitreg"))


def registry_path() -> Path:
    """``$VITREG_REGISTRY`` (mirrors, tests), else the registry shipped in the package."""
    override = os.environ.get("VITREG_REGISTRY")
    return Path(override).expanduser() if override else shipped_dir() / REGISTRY_FILE


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and check a registry file (default :func:`registry_path`)."""
    path = Path(path) if path is not None else registry_path()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VitregError(f"{path}: cannot read the checkpoint registry ({error})") from None
    checkpoints = values.get("checkpoints") if isinstance(values, dict) else None
    if not isinstance(checkpoints, dict) or values.get("default") not in checkpoints:
        raise VitregError(f"{path}: a registry needs 'checkpoints' and a 'default' among them")
    entries = {name: _parse_entry(path, name, entry) for name, entry in checkpoints.items()}
    return Registry(source=str(path), default=values["default"], entries=entries)


def _parse_entry(source: Path, name: str, values: dict) -> RegistryEntry:
    """One registry entry, checked: a downloadable one needs urls, a sha256 and a size."""
    if not isinstance(values, dict):
        raise VitregError(f"{source}: checkpoint {name!r} is not a JSON object")
    entry = RegistryEntry(
        name=name,
        description=str(values.get("description", "")),
        urls=tuple(values.get("urls") or ()),
        sha256=values.get("sha256"),
        size=values.get("size"),
        config=dict(values.get("config") or {}),
        frame=dict(values.get("frame") or {}),
        licence=str(values.get("licence", "")),
        import_only=bool(values.get("import_only", False)),
        how_to_get=str(values.get("how_to_get", "")),
        frame_note=str(values.get("frame_note", "")),
    )
    if not NAME_PATTERN.fullmatch(name):
        raise VitregError(f"{source}: checkpoint name {name!r} is not a plain name")
    if entry.import_only:
        return entry
    if not entry.urls or not re.fullmatch(r"[0-9a-f]{64}", str(entry.sha256)):
        raise VitregError(f"{source}: checkpoint {name!r} needs 'urls' and a hex 'sha256'")
    if not isinstance(entry.size, int) or entry.size <= 0:
        raise VitregError(f"{source}: checkpoint {name!r} needs its 'size' in bytes")
    return entry


def _canonical_name(name: str, registry: Registry) -> str:
    """``default`` -> the registry's default name; other names unchanged."""
    return registry.default if name == DEFAULT_ALIAS else name


def _unknown_name_error(name: str, registry: Registry) -> VitregError:
    """The error for a name that is neither a file, a local checkpoint nor in the registry."""
    known = sorted(set(registry.entries) | set(local_names()))
    return VitregError(
        f"unknown checkpoint {name!r}; known: {', '.join(known)} (or give a file path)"
    )


def _import_hint(entry: RegistryEntry) -> str:
    """How to get an import-only checkpoint: the registry's words, else the import command."""
    return entry.how_to_get or f"import it with: vitreg weights import FILE --name {entry.name}"


def _looks_like_path(text: str) -> bool:
    """True for strings that name a file rather than a checkpoint."""
    return "/" in text or os.sep in text or text.startswith("~") or text.endswith(PATH_SUFFIXES)


def local_path(name: str) -> Path | None:
    """``<name>.safetensors`` shipped in the package, else in the user cache, else None."""
    for folder in (shipped_dir(), cache_dir()):
        candidate = folder / f"{name}{SUFFIX}"
        if candidate.is_file():
            return candidate
    return None


def local_names() -> list[str]:
    """Names of the checkpoint files shipped in the package or present in the user cache."""
    names = set()
    for folder in (shipped_dir(), cache_dir()):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob(f"*{SUFFIX}") if not p.name.startswith("."))
    return sorted(names)


def offline_mode(offline: bool | None) -> bool:
    """The explicit flag, else ``VITREG_OFFLINE=1`` (or true/yes) in the environment."""
    if offline is not None:
        return offline
    return os.environ.get("VITREG_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Resolution and download


def resolve(
    name_or_path: str | Path,
    offline: bool | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Checkpoint file for a path or name: the path; shipped; cached; else downloaded.

    ``offline`` (default ``$VITREG_OFFLINE``) forbids the download. ``progress`` is called
    as ``report(bytes_done, bytes_total)`` while a download runs.
    """
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.is_file():
        return candidate
    if _looks_like_path(text):
        raise VitregError(f"{text}: no such checkpoint file")
    registry = load_registry()
    name = _canonical_name(text, registry)
    found = local_path(name) if NAME_PATTERN.fullmatch(name) else None
    if found is not None:
        return found
    entry = registry.entries.get(name)
    if entry is None:
        raise _unknown_name_error(name, registry)
    if entry.import_only:
        raise VitregError(
            f"checkpoint {name!r} is not installed in {cache_dir()} and cannot be downloaded; "
            f"{_import_hint(entry)}"
        )
    if offline_mode(offline):
        raise VitregError(
            f"checkpoint {name!r} is not in the cache {cache_dir()} and offline mode is on; "
            f"fetch it first (online) with: vitreg weights fetch {name}"
        )
    return fetch(name, progress=progress)


def fetch(name: str, progress: ProgressCallback | None = None) -> Path:
    """Download a registry checkpoint into the cache, verified by size and sha256.

    A file lock in the cache folder makes concurrent fetches of one checkpoint download it
    once (the others wait, then find the file). The download is streamed into a temporary
    file in ``<cache>/.downloads/<name>/`` and renamed into place only once verified, so a
    failure (hash mismatch, dropped connection, interrupt) leaves nothing in the cache.
    """
    from filelock import FileLock

    registry = load_registry()
    name = _canonical_name(name, registry)
    entry = registry.entries.get(name)
    if entry is None:
        raise _unknown_name_error(name, registry)
    if entry.import_only:
        raise VitregError(f"checkpoint {name!r} cannot be downloaded; {_import_hint(entry)}")
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f".{name}.lock"))
        lock.acquire()
    except OSError as error:
        raise VitregError(f"{folder}: cannot use the checkpoint cache ({error})") from None
    try:
        target = folder / f"{name}{SUFFIX}"
        if target.is_file():
            return target
        return _download_from_mirrors(entry, target, progress)
    finally:
        lock.release()


class _TransferError(Exception):
    """A download that failed on the way (network, short read): the next URL may work."""


def _download_from_mirrors(
    entry: RegistryEntry, target: Path, report: ProgressCallback | None
) -> Path:
    """Try each URL in turn; a verification failure stops at once, a transfer error does not."""
    # pooch writes its temporary file beside ``fname``: a staging folder of this checkpoint's
    # own, so that leftovers of a killed download can be removed here (we hold its lock).
    staging = target.parent / ".downloads" / entry.name
    shutil.rmtree(staging, ignore_errors=True)
    failures = []
    try:
        for url in entry.urls:
            try:
                _download_verified(url, entry, staging / target.name, report)
            except _TransferError as error:
                failures.append(f"{url}: {error}")
                continue
            os.chmod(staging / target.name, plain_file_mode())
            os.replace(staging / target.name, target)
            return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raise VitregError(
        f"could not download checkpoint {entry.name!r} into {target.parent} "
        f"(nothing was written there): {'; '.join(failures)}"
    )


def _download_verified(
    url: str, entry: RegistryEntry, staged: Path, report: ProgressCallback | None
) -> None:
    """Download one URL to ``staged`` with ``pooch.retrieve``; our downloader verifies it.

    Why the checks are ours and not only pooch's ``known_hash``: pooch's mismatch is a bare
    ValueError (we want the file, expected and actual hashes in a VitregError), it has no size
    check (we stop a download as soon as it runs past the registry's size, and tell a short
    read from a corrupt file), and its progress counts are rounded to chunks. pooch still gets
    ``known_hash`` as a second check; it streams into a temporary file beside ``staged``,
    deletes it on any exception and renames it to ``staged`` only after both checks.
    """
    import pooch

    try:
        with _quiet_pooch_logger():
            pooch.retrieve(
                url,
                known_hash=f"sha256:{entry.sha256}",
                fname=staged.name,
                path=staged.parent,
                downloader=_VerifyingDownloader(entry, report),
                progressbar=False,
            )
    except ValueError as error:  # pooch's own hash check; ours runs first, so not expected
        raise VitregError(f"{url}: {staged.name}: {error}") from None


@contextmanager
def _quiet_pooch_logger() -> Iterator[None]:
    """Silence pooch's INFO lines on stderr ("Downloading data from ...") for the duration."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class _VerifyingSink:
    """File-like target for pooch's HTTPDownloader: writes, counts, hashes and reports bytes."""

    def __init__(
        self, handle: BinaryIO, entry: RegistryEntry, url: str, report: ProgressCallback | None
    ):
        self.handle, self.entry, self.url, self.report = handle, entry, url, report
        self.digest = hashlib.sha256()
        self.done = 0

    def write(self, chunk: bytes) -> int:
        """Append ``chunk``; stop the download at once if it runs past the registry's size."""
        self.done += len(chunk)
        if self.done > self.entry.size:
            raise VitregError(
                f"{self.url}: {self.entry.name}{SUFFIX} is larger than the registry's "
                f"{self.entry.size} bytes; the download was stopped and deleted"
            )
        self.handle.write(chunk)
        self.digest.update(chunk)
        if self.report is not None:
            self.report(self.done, self.entry.size)
        return len(chunk)

    def flush(self) -> None:
        """Flush the underlying file."""
        self.handle.flush()


class _VerifyingDownloader:
    """pooch downloader: HTTP(S) stream into pooch's temporary file, then size and sha256."""

    def __init__(self, entry: RegistryEntry, report: ProgressCallback | None):
        self.entry, self.report = entry, report

    def __call__(self, url: str, temporary: str, _pooch: object) -> None:
        import pooch

        http = pooch.HTTPDownloader(chunk_size=DOWNLOAD_CHUNK_BYTES, timeout=DOWNLOAD_TIMEOUT_S)
        with open(temporary, "wb") as handle:
            sink = _VerifyingSink(handle, self.entry, url, self.report)
            try:
                http(url, sink, None)
            except OSError as error:  # requests' errors are OSErrors, as are disk errors
                raise _TransferError(
                    f"transfer failed after {sink.done} of {self.entry.size} bytes "
                    f"({type(error).__name__}: {error})"
                ) from None
        if sink.done < self.entry.size:
            raise _TransferError(f"connection closed after {sink.done} of {self.entry.size} bytes")
        actual = sink.digest.hexdigest()
        if actual != self.entry.sha256:
            raise VitregError(
                f"{url}: sha256 mismatch for {self.entry.name}{SUFFIX}: expected "
                f"{self.entry.sha256}, got {actual}; the download was deleted"
            )


# ---------------------------------------------------------------------------------------------
# Our format: write, read, build


def save_checkpoint(
    path: str | Path, model: VitVNet, frame: ModelFrame, recipe: dict | None = None
) -> Path:
    """Write ``model``'s tensors, config, ``frame`` and ``recipe`` as safetensors, atomically."""
    return _write_checkpoint(Path(path), model.state_dict(), model.config, frame, recipe or {})


def _write_checkpoint(
    path: Path,
    state: dict[str, torch.Tensor],
    config: VitVNetConfig,
    frame: ModelFrame,
    recipe: dict,
) -> Path:
    """safetensors file at ``path`` (temporary file beside it, then os.replace)."""
    fields = {"config": config.to_dict(), "frame": frame.to_dict(), "recipe": recipe}
    return write_container(path, state, FORMAT, fields)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a vitreg safetensors checkpoint (no pickle); a foreign or corrupt file is refused."""
    path = Path(path)
    hint = "; convert the authors' checkpoints with: vitreg weights import"
    fields, state = read_container(path, FORMAT, "vitreg checkpoint", hint)
    try:
        config = VitVNetConfig.from_dict(fields["config"])
        frame = ModelFrame.from_dict(fields["frame"])
    except (KeyError, TypeError, VitregError) as error:
        raise VitregError(f"{path}: malformed vitreg metadata ({error})") from None
    return Checkpoint(
        config=config,
        frame=frame,
        recipe=fields.get("recipe", {}),
        vitreg_version=fields["vitreg_version"],
        state_dict=state,
        path=path,
    )


def build_model(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> VitVNet:
    """The checkpoint's ViT-V-Net with its weights, in eval mode, on ``device``."""
    model = VitVNet(checkpoint.config)
    try:
        load_state_dict(model, checkpoint.state_dict)
    except VitregError as error:
        raise VitregError(f"{checkpoint.path}: {error}") from None
    return model.to(device).eval()


def default_installed() -> bool:
    """Whether the registry's default checkpoint is on this machine (shipped in the package,
    or in the cache): what ``default`` stands for without a download."""
    registry = load_registry()
    return local_path(_canonical_name(DEFAULT_ALIAS, registry)) is not None


NO_DEFAULT_NOTE = (
    "no trained checkpoint is installed (see 'vitreg weights list'): registering by "
    "test-time optimisation alone (greedy local NCC from a zero field)"
)
"""What the command line says once when ``default`` falls back to optimisation alone."""


def load_model(
    model: VitVNet | str | Path | None,
    frame: ModelFrame | None = None,
    offline: bool | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[VitVNet | None, ModelFrame]:
    """The network and frame to register with.

    A checkpoint name or path (see :func:`resolve`; ``offline`` and ``progress`` as there) is
    loaded and brings its own frame; 'none' or None means no network, and so does 'default'
    while the default checkpoint is not installed (:func:`default_installed`: it is never
    downloaded implicitly); a VitVNet is used as it is. Without a checkpoint the frame is
    ``frame``, else the default ModelFrame.
    """
    if isinstance(model, str | Path):
        no_default = str(model) == DEFAULT_ALIAS and not default_installed()
        if str(model).lower() == "none" or no_default:
            return None, frame or ModelFrame()
        checkpoint = read_checkpoint(resolve(model, offline=offline, progress=progress))
        return build_model(checkpoint), checkpoint.frame
    return model, frame or ModelFrame()


# ---------------------------------------------------------------------------------------------
# The authors' published checkpoint


def import_official(
    path: str | Path,
    name: str,
    config: VitVNetConfig | None = None,
    frame: ModelFrame | None = None,
) -> Path:
    """Convert the authors' ``torch.save`` checkpoint into ``<cache>/<name>.safetensors``.

    Accepts their training dict (``state_dict`` plus ``optimizer``, ``epoch``, ``best_dsc``)
    or a bare state dict, loaded with ``weights_only=True``. Keeps only the model tensors,
    drops the ``spatial_trans.grid`` buffer and checks every key and shape against ``config``
    (default: the published 160x192x224 one). ``frame`` defaults to the registry entry's (the
    IXI data: LIA, 1 mm, 160x192x224, intensities divided by 255), with the shape set to
    ``config.img_size``; the entry's ``frame_note`` (what inputs the weights expect) goes into
    the recipe as ``frame_note``.
    """
    path = Path(path)
    _check_import_name(name)
    config = config or VitVNetConfig()
    loaded = _load_weights_only(path)
    state = _model_tensors(path, loaded)
    model = VitVNet(config)
    try:
        load_state_dict(model, state)
    except VitregError as error:
        raise VitregError(f"{path}: {error}") from None
    recipe = _import_recipe(path, loaded)
    if frame is None:
        official, note = _official_frame(name)
        frame = replace(official, shape=tuple(config.img_size))
        if note:
            recipe["frame_note"] = note
    return _write_checkpoint(
        cache_dir() / f"{name}{SUFFIX}", model.state_dict(), config, frame, recipe
    )


def _check_import_name(name: str) -> None:
    """Refuse names that are not plain, or that would shadow a downloadable checkpoint."""
    if not NAME_PATTERN.fullmatch(name or "") or name in (DEFAULT_ALIAS, "none"):
        raise OptionError(
            "name", name, "give a plain checkpoint name (letters, digits, '.', '_', '-')"
        )
    entry = load_registry().entries.get(name)
    if entry is not None and not entry.import_only:
        raise OptionError("name", name, "is a downloadable registry checkpoint; choose another")


def _load_weights_only(path: Path) -> object:
    """``torch.load(weights_only=True)``: tensors and plain containers only, nothing executed."""
    if not path.is_file():
        raise VitregError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only refusals come in many types
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise VitregError(
                f"{path}: refused by torch.load(weights_only=True): it holds a Python object "
                f"({refused.group(1)}) besides tensors; nothing in it was run"
            ) from None
        raise VitregError(
            f"{path}: not a PyTorch checkpoint, or damaged ({type(error).__name__}: {error})"
        ) from None


def _model_tensors(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    """The model tensors: ``loaded['state_dict']``, or ``loaded`` itself if a bare state dict."""
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise VitregError(f"{path}: holds no model 'state_dict'")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise VitregError(f"{path}: state_dict entry {not_tensors[0]!r} is not a tensor")
    return dict(state)


def _official_frame(name: str) -> tuple[ModelFrame, str]:
    """The frame recorded in the registry for ``name``, else for the official entry, and the
    entry's note on the inputs it expects ('' if none)."""
    entries = load_registry().entries
    for key in (name, OFFICIAL_NAME):
        if key in entries and entries[key].frame:
            return ModelFrame.from_dict(entries[key].frame), entries[key].frame_note
    return ModelFrame(), ""


def _import_recipe(path: Path, loaded: object) -> dict:
    """Where the weights came from: source file name and sha256, epoch and best Dice if given."""
    recipe: dict = {
        "source": path.name,
        "source_sha256": sha256_of(path),
        "converted_by": f"vitreg {__version__} weights import",
    }
    if isinstance(loaded, dict):
        for key in ("epoch", "best_dsc"):
            value = loaded.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, int | float) and not isinstance(value, bool):
                recipe[key] = value
    return recipe


# ---------------------------------------------------------------------------------------------
# Listing and description


def list_checkpoints() -> list[dict]:
    """Rows name, size (bytes or None), cached, default, description; registry first.

    Checkpoints found locally but not in the registry (imports under other names) follow.
    """
    registry = load_registry()
    rows = [_row(entry, registry.default) for entry in registry.entries.values()]
    for name in local_names():
        if name not in registry.entries:
            path = local_path(name)
            rows.append(
                {
                    "name": name,
                    "size": path.stat().st_size if path else None,
                    "cached": True,
                    "default": False,
                    "description": "local file, not in the registry",
                }
            )
    return rows


def _row(entry: RegistryEntry, default: str) -> dict:
    """The list row of one registry entry; the size is the local file's when there is one."""
    path = local_path(entry.name)
    return {
        "name": entry.name,
        "size": path.stat().st_size if path else entry.size,
        "cached": path is not None,
        "default": entry.name == default,
        "description": entry.description,
    }


def checkpoint_info(name_or_path: str) -> dict:
    """Config, frame and recipe of a local checkpoint, else the registry entry (no download)."""
    text = str(name_or_path)
    registry = load_registry()
    name = _canonical_name(text, registry)
    local = Path(text).expanduser()
    if not local.is_file():
        local = None if _looks_like_path(text) else local_path(name)
    if local is not None:
        return _file_info(read_checkpoint(local), registry.entries.get(name))
    if _looks_like_path(text):
        raise VitregError(f"{text}: no such checkpoint file")
    entry = registry.entries.get(name)
    if entry is None:
        raise _unknown_name_error(name, registry)
    return {
        "name": entry.name,
        "cached": False,
        "description": entry.description,
        "config": VitVNetConfig.from_dict(entry.config).to_dict(),
        "frame": entry.frame,
        "frame_note": entry.frame_note or None,
        "recipe": None,
        "licence": entry.licence,
        "urls": list(entry.urls),
        "sha256": entry.sha256,
        "size": entry.size,
        "how_to_get": entry.how_to_get or None,
    }


def _file_info(checkpoint: Checkpoint, entry: RegistryEntry | None) -> dict:
    """What :func:`checkpoint_info` says about a file, with the registry's licence if known."""
    learned = {
        k: t for k, t in checkpoint.state_dict.items() if "running_" not in k and "batches" not in k
    }
    info = {
        "path": str(checkpoint.path),
        "cached": True,
        "vitreg_version": checkpoint.vitreg_version,
        "parameters": sum(t.numel() for t in learned.values()),
        "config": checkpoint.config.to_dict(),
        "frame": checkpoint.frame.to_dict(),
        "recipe": checkpoint.recipe,
    }
    if entry is not None:
        info.update(name=entry.name, description=entry.description, licence=entry.licence)
    return info
