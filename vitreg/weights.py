"""Checkpoints: the registry, download with hash check and lock, safe loading, official import.

Our checkpoint format is a safetensors file of the model tensors whose metadata holds the
model config, the model frame, the training recipe and the vitreg version. Nothing is ever
unpickled: our files are read with safetensors only, and the authors' ``torch.save`` files
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vitreg import __version__
from vitreg.errors import VitregError
from vitreg.frame import ModelFrame
from vitreg.image import atomic_path
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig, load_state_dict

FORMAT = "vitreg-checkpoint-1"
SUFFIX = ".safetensors"
REGISTRY_FILE = "registry.json"
OFFICIAL_GRID_KEY = "spatial_trans.grid"

Progress = Callable[[int, int], None]
"""Called as progress(bytes_done, bytes_total) while a download runs."""


@dataclass(frozen=True)
class Checkpoint:
    """A vitreg checkpoint read from disk: tensors plus what is needed to use them."""

    config: VitVNetConfig
    frame: ModelFrame
    recipe: dict
    vitreg_version: str
    state_dict: dict[str, torch.Tensor]
    path: Path


def shipped_dir() -> Path:
    """The folder of the registry and shipped checkpoints (``weights/`` in the source tree)."""
    try:
        return Path(str(resources.files("vitreg._weights")))
    except ModuleNotFoundError:  # running from a source tree that was not installed
        return Path(__file__).resolve().parent.parent / "weights"


def cache_dir() -> Path:
    """``$VITREG_HOME``, else the platform's user cache folder for vitreg."""
    if os.environ.get("VITREG_HOME"):
        return Path(os.environ["VITREG_HOME"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vitreg"))


def load_registry() -> dict:
    """The registry: ``{"default": NAME, "checkpoints": {NAME: entry}}``.

    ``$VITREG_REGISTRY`` may name another registry file (mirrors, tests).
    """
    path = Path(os.environ.get("VITREG_REGISTRY") or shipped_dir() / REGISTRY_FILE)
    try:
        registry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VitregError(f"{path}: cannot read the checkpoint registry ({error})") from None
    if "checkpoints" not in registry or registry.get("default") not in registry["checkpoints"]:
        raise VitregError(f"{path}: a registry needs 'checkpoints' and a 'default' among them")
    return registry


def _entry(name: str, registry: dict) -> dict:
    if name == "default":
        name = registry["default"]
    if name not in registry["checkpoints"]:
        known = ", ".join(sorted(registry["checkpoints"]))
        raise VitregError(f"unknown checkpoint {name!r}; known: {known} (or give a file path)")
    return {"name": name, **registry["checkpoints"][name]}


def offline_mode(offline: bool | None) -> bool:
    """The explicit flag, else ``VITREG_OFFLINE=1`` in the environment."""
    if offline is not None:
        return offline
    return os.environ.get("VITREG_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(
    name_or_path: str, offline: bool | None = None, progress: Progress | None = None
) -> Path:
    """Find a checkpoint file: an existing path; a file shipped in ``weights/``; the user cache;
    else download it from the registry (unless offline)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.suffix == SUFFIX or os.sep in name_or_path:
        raise VitregError(f"{name_or_path}: no such checkpoint file")
    entry = _entry(name_or_path, load_registry())
    for folder in (shipped_dir(), cache_dir()):
        path = folder / f"{entry['name']}{SUFFIX}"
        if path.is_file():
            return path
    if entry.get("import_only"):
        raise VitregError(
            f"checkpoint {entry['name']!r} is not installed and cannot be downloaded: "
            f"{entry.get('how_to_get', 'import it with vitreg weights import')}"
        )
    if offline_mode(offline):
        raise VitregError(
            f"checkpoint {entry['name']!r} is not in the cache {cache_dir()} and offline mode is "
            f"on; fetch it first with: vitreg weights fetch {entry['name']}"
        )
    return fetch(entry["name"], progress=progress)


class _PoochProgress:
    """The small tqdm-like object pooch's HTTPDownloader drives, forwarding to a callback."""

    def __init__(self, callback: Progress | None):
        self.callback = callback
        self.total = 0
        self.done = 0

    def update(self, amount: int) -> None:
        self.done = min(self.done + amount, self.total or self.done + amount)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        pass


def fetch(name: str, progress: Progress | None = None) -> Path:
    """Download a registry checkpoint into the cache, verified by size and sha256.

    pooch streams it into a temporary file that is only renamed into place once the sha256
    matches; a file lock makes concurrent fetches of one checkpoint download it once.
    """
    import pooch
    from filelock import FileLock

    entry = _entry(name, load_registry())
    if entry.get("import_only"):
        raise VitregError(
            f"checkpoint {entry['name']!r} cannot be downloaded: {entry['how_to_get']}"
        )
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitregError(f"{folder}: cannot create the checkpoint cache ({error})") from None
    target = folder / f"{entry['name']}{SUFFIX}"
    with FileLock(str(folder / f".{entry['name']}.lock")):
        if target.is_file():
            return target
        errors = []
        for url in entry["urls"]:
            try:
                downloader = pooch.HTTPDownloader(progressbar=_PoochProgress(progress), timeout=60)
                pooch.retrieve(
                    url,
                    known_hash=f"sha256:{entry['sha256']}",
                    fname=target.name,
                    path=folder,
                    downloader=downloader,
                )
            except ValueError as error:  # pooch's hash mismatch; the download is already gone
                target.unlink(missing_ok=True)
                actual = re.search(r"but got (\w+)", str(error))
                raise VitregError(
                    f"{url}: sha256 mismatch for {target.name}: expected {entry['sha256']}, "
                    f"got {actual.group(1) if actual else '?'}; the download was deleted"
                ) from None
            except Exception as error:  # network errors of many kinds; try the next URL
                target.unlink(missing_ok=True)
                errors.append(f"{url}: {type(error).__name__}: {error}")
                continue
            if target.stat().st_size != int(entry["size"]):
                size = target.stat().st_size
                target.unlink()
                raise VitregError(
                    f"{url}: {target.name} has {size} bytes, the registry says {entry['size']}"
                )
            return target
        raise VitregError(f"could not download {entry['name']!r}: " + "; ".join(errors))


def save_checkpoint(
    path: str | Path, model: VitVNet, frame: ModelFrame, recipe: dict | None = None
) -> Path:
    """Write ``model``'s tensors and metadata as a vitreg safetensors file, atomically."""
    return _write_safetensors(Path(path), model.state_dict(), model.config, frame, recipe or {})


def _write_safetensors(
    path: Path,
    state: dict[str, torch.Tensor],
    config: VitVNetConfig,
    frame: ModelFrame,
    recipe: dict,
) -> Path:
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict()),
        "frame": json.dumps(frame.to_dict()),
        "recipe": json.dumps(recipe),
        "vitreg_version": __version__,
    }
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitregError(f"{path.parent}: cannot create the folder ({error.strerror})") from None
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a vitreg safetensors checkpoint (no pickle); a foreign or corrupt file is refused."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise VitregError(f"{path}: not a vitreg checkpoint (safetensors: {error})") from None
    if metadata.get("format") != FORMAT:
        raise VitregError(
            f"{path}: safetensors file without vitreg metadata; convert the authors' "
            "checkpoints with vitreg weights import"
        )
    try:
        config = VitVNetConfig.from_dict(json.loads(metadata["config"]))
        frame = ModelFrame.from_dict(json.loads(metadata["frame"]))
        recipe = json.loads(metadata.get("recipe", "{}"))
    except (KeyError, json.JSONDecodeError) as error:
        raise VitregError(f"{path}: malformed vitreg metadata ({error})") from None
    return Checkpoint(
        config=config,
        frame=frame,
        recipe=recipe,
        vitreg_version=metadata.get("vitreg_version", "?"),
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
    return model.eval().to(device)


def import_official(
    path: str | Path,
    name: str,
    config: VitVNetConfig | None = None,
    frame: ModelFrame | None = None,
) -> Path:
    """Convert the authors' ``torch.save`` checkpoint into ``<cache>/<name>.safetensors``.

    Accepts their training dict (``state_dict`` plus ``optimizer``, ``epoch``...) or a bare
    state dict, loaded with ``weights_only=True``. Keeps only the model tensors, drops the
    sampling-grid buffer and checks every key and shape against ``config`` (default: the
    published 160x192x224 one). ``frame`` defaults to the IXI data's (LIA, 1 mm, 160x192x224).
    """
    path = Path(path)
    if not path.is_file():
        raise VitregError(f"{path}: no such file")
    if not name or os.sep in name or name.startswith("."):
        raise VitregError(f"--name {name!r}: give a plain checkpoint name")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only refusals all land here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise VitregError(
            f"{path}: cannot be loaded safely as a PyTorch checkpoint ({first_line})"
        ) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitregError(f"{path}: holds no model state_dict of tensors")
    config = config or VitVNetConfig()
    model = VitVNet(config)
    try:
        load_state_dict(model, state)
    except VitregError as error:
        raise VitregError(f"{path}: {error}") from None
    recipe = {
        "source": path.name,
        "source_sha256": sha256_of(path),
        "converted_by": f"vitreg {__version__} weights import",
    }
    if isinstance(loaded, dict) and isinstance(loaded.get("epoch"), int):
        recipe["epoch"] = loaded["epoch"]
    frame = frame or ModelFrame(shape=config.img_size)
    target = cache_dir() / f"{name}{SUFFIX}"
    return _write_safetensors(target, model.state_dict(), config, frame, recipe)


def list_checkpoints() -> list[dict]:
    """One row per registry entry: name, size, cached, default, description."""
    registry = load_registry()
    rows = []
    for name, entry in registry["checkpoints"].items():
        local = [d / f"{name}{SUFFIX}" for d in (shipped_dir(), cache_dir())]
        rows.append(
            {
                "name": name,
                "size": entry.get("size"),
                "cached": any(p.is_file() for p in local),
                "default": name == registry["default"],
                "description": entry.get("description", ""),
            }
        )
    return rows
