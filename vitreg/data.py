"""Training data: what to pair, checked up front, framed once into a memory-mapped cache.

Where the data can come from (:func:`read_dataset`):

- a CSV with one image per row, columns ``image`` and optional ``labels``, ``split``
  (train/val/test): pairs of two different training images are drawn at random; with an atlas
  (``atlas=FILE``) every image is paired with the atlas instead;
- a CSV of explicit pairs, columns ``fixed,moving`` and optional
  ``fixed_labels,moving_labels``, ``split``;
- a folder in the OASIS layout of Learn2Reg (one folder per subject holding
  ``aligned_norm.nii.gz`` and optionally ``aligned_seg35.nii.gz``);
- a folder in the layout of the authors' TransMorph IXI data (``atlas.pkl``, ``Train/*.pkl``,
  ``Val/*.pkl``; each pickle holds the tuple ``(image, label)`` of numpy arrays, 1 mm LIA).
  Pickles are read by an unpickler that only rebuilds numpy arrays; nothing else is run.

Paths in a CSV are relative to the CSV's folder. Rows whose split is ``test`` are ignored;
without any ``val`` row, the last ``val_fraction`` of the rows are held out for validation.

**Pair sources.** The training loop draws every batch from a *pair source*: any object with

    pairs_per_epoch: int
    def batch(self, draw: int, batch_size: int, generator: torch.Generator,
              device: torch.device) -> TrainBatch

``draw`` numbers the batches drawn by all processes together (process r of N draws number
``global_step * N + r``), so a source can lay its pairs out as one stream; ``generator`` (a
CPU ``torch.Generator`` the loop seeds, saves and restores) must be the only randomness the
source uses, which makes resuming exact. :class:`CachedPairs` is the source for files on
disk; a source that synthesises images on the GPU plugs in the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vitreg.errors import OptionError, VitregError
from vitreg.files import atomic_path, make_folder, write_text
from vitreg.frame import ModelFrame, frame_affine, frame_image, frame_labels
from vitreg.image import Volume, load_image, load_labels, read_grid
from vitreg.pairs import Pair, check_pairs, pairs_from_rows, read_table

PICKLE_ORIENTATION = "LIA"  # TransMorph's IXI arrays: 1 mm voxels, axes Left, Inferior, Anterior
OASIS_IMAGE = "aligned_norm.nii.gz"
OASIS_LABELS = "aligned_seg35.nii.gz"
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# The pair-source interface


@dataclass(frozen=True)
class TrainBatch:
    """One batch of pairs in the model frame, on the training device.

    ``fixed``/``moving``: (B, 1, D, H, W) float32 in [0, 1]. ``fixed_labels``/``moving_labels``:
    (B, 1, D, H, W) int64 class indices 0..``num_classes``-1 (0 = background), or None.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None = None
    moving_labels: torch.Tensor | None = None
    num_classes: int = 0


class PairSource(Protocol):
    """Where the training loop gets its batches from (see the module docstring)."""

    pairs_per_epoch: int

    def batch(
        self, draw: int, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> TrainBatch:
        """Batch number ``draw`` of ``batch_size`` pairs, using only ``generator``'s randomness."""
        ...


# ---------------------------------------------------------------------------------------------
# What the data names


@dataclass(frozen=True)
class ImageFile:
    """One image and its optional label map, as named in the data.

    ``where`` says where it was named (e.g. ``data.csv line 3``) for messages; ``pickled``
    marks a TransMorph ``.pkl`` holding ``(image, label)``.
    """

    image: Path
    labels: Path | None = None
    where: str = ""
    pickled: bool = False


@dataclass(frozen=True)
class Dataset:
    """What to train on.

    ``mode`` is ``images`` (random pairs of two training images), ``atlas`` (each image with
    ``atlas``, which is the fixed image unless ``atlas_is_moving``) or ``pairs`` (explicit
    (fixed, moving) pairs). ``train``/``val`` hold ImageFiles, or (fixed, moving) tuples of
    them in ``pairs`` mode. ``centre_on_origin`` puts the frame grid's centre at the world
    origin (the IXI arrays, already in their frame) instead of the images' median centre.
    """

    mode: str
    origin: Path
    train: tuple
    val: tuple
    atlas: ImageFile | None = None
    atlas_is_moving: bool = False
    centre_on_origin: bool = False

    def files(self) -> list[ImageFile]:
        """Every distinct ImageFile used for training or validation, in first-use order."""
        found: dict[tuple, ImageFile] = {}
        entries = list(self.train) + list(self.val)
        flat = [f for entry in entries for f in (entry if isinstance(entry, tuple) else (entry,))]
        for item in ([self.atlas] if self.atlas else []) + flat:
            found.setdefault((item.image, item.labels), item)
        return list(found.values())


def read_dataset(
    path: str | Path,
    atlas: str | Path | None = None,
    atlas_is_moving: bool = False,
    val_fraction: float = 0.1,
) -> Dataset:
    """A CSV (images or pairs) or a folder in the OASIS or TransMorph-IXI layout."""
    path = Path(path)
    if path.is_dir():
        if (path / "atlas.pkl").is_file() or any(path.glob("Train/*.pkl")):
            if atlas is not None:
                raise OptionError("atlas", atlas, f"{path} is an IXI folder with its own atlas.pkl")
            return read_ixi(path)
        dataset = read_oasis(path, val_fraction)
    elif path.is_file():
        dataset = read_csv(path, val_fraction)
    else:
        raise VitregError(f"{path}: no such CSV file or data folder")
    if atlas is not None:
        if dataset.mode == "pairs":
            raise OptionError("atlas", atlas, f"goes with a list of images; {path} lists pairs")
        atlas_path = Path(atlas)
        atlas_file = ImageFile(atlas_path, where="{atlas}", pickled=atlas_path.suffix == ".pkl")
        return Dataset(
            mode="atlas",
            origin=dataset.origin,
            train=dataset.train,
            val=dataset.val,
            atlas=atlas_file,
            atlas_is_moving=atlas_is_moving,
        )
    return dataset


def _holdout(rows: list, val_fraction: float) -> tuple[list, list]:
    """Last ``val_fraction`` of ``rows`` (at least one, if any) held out for validation."""
    if not 0 <= val_fraction < 1:
        raise OptionError("val_fraction", val_fraction, "expected 0 <= fraction < 1")
    count = math.ceil(len(rows) * val_fraction) if len(rows) > 2 else 0
    return rows[: len(rows) - count], rows[len(rows) - count :]


def read_csv(path: str | Path, val_fraction: float = 0.1) -> Dataset:
    """Read a CSV of images (``image[,labels][,split]``) or of pairs (the pairs file of
    :mod:`vitreg.pairs`, with its ``split`` column); every bad row is named in one error."""
    path = Path(path)
    columns, rows = read_table(path)
    if {"fixed", "moving"} <= set(columns):
        pairs = pairs_from_rows(path, columns, rows, unique_names=False)
        check_pairs(pairs)
        mode, entries = "pairs", _pair_entries(path, pairs)
    elif "image" in columns:
        mode, entries = "images", _image_entries(path, rows)
    else:
        raise VitregError(
            f"{path}: a training CSV needs a header with 'image' (one image per row) or "
            f"'fixed,moving' (explicit pairs); found {sorted(columns)}"
        )
    problems = [entry for entry in entries if isinstance(entry, str)]
    if problems:
        raise VitregError(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems))
    by_split: dict[str, list] = {split: [] for split in SPLITS}
    for split, item in entries:
        by_split[split].append(item)
    train, val = by_split["train"], by_split["val"]
    if not val:
        train, val = _holdout(train, val_fraction)
    if not train:
        raise VitregError(f"{path}: no training rows")
    return Dataset(mode=mode, origin=path, train=tuple(train), val=tuple(val))


def _split_of(where: str, cells: dict[str, str]) -> str:
    """The row's split (train when empty); VitregError naming the row for anything else."""
    split = (cells.get("split") or "train").lower()
    if split not in SPLITS:
        raise VitregError(f"{where}: split {cells.get('split')!r} is not train, val or test")
    return split


def _image_entries(path: Path, rows: list[tuple[int, dict[str, str]]]) -> list:
    """(split, ImageFile) per row of an image list, or the row's problem as a string."""
    entries: list = []
    for line, cells in rows:
        where = f"{path.name} line {line}"
        try:
            split = _split_of(where, cells)
        except VitregError as error:
            entries.append(str(error))
            continue
        if not cells.get("image"):
            entries.append(f"{where}: the 'image' cell is empty")
            continue
        entries.append(
            (split, _image_file(path.parent, cells["image"], cells.get("labels", ""), where))
        )
    return entries


def _pair_entries(path: Path, pairs: list[Pair]) -> list:
    """(split, (fixed, moving) ImageFiles) per pair, or the row's problem as a string."""
    entries: list = []
    for pair in pairs:
        where = f"{path.name} line {pair.row}"
        try:
            split = _split_of(where, {"split": pair.split})
        except VitregError as error:
            entries.append(str(error))
            continue
        fixed = ImageFile(pair.fixed, pair.fixed_labels, where, pair.fixed.suffix == ".pkl")
        moving = ImageFile(pair.moving, pair.moving_labels, where, pair.moving.suffix == ".pkl")
        entries.append((split, (fixed, moving)))
    return entries


def _image_file(folder: Path, image: str, labels: str, where: str) -> ImageFile:
    """An ImageFile with paths relative to ``folder`` (absolute paths kept)."""
    image_path = folder / Path(image).expanduser()
    labels_path = folder / Path(labels).expanduser() if labels else None
    return ImageFile(image_path, labels_path, where, pickled=image_path.suffix == ".pkl")


def read_oasis(folder: str | Path, val_fraction: float = 0.1) -> Dataset:
    """Learn2Reg OASIS: ``<folder>/<subject>/aligned_norm.nii.gz`` (+ ``aligned_seg35``)."""
    folder = Path(folder)
    subjects = sorted(p.parent for p in folder.glob(f"*/{OASIS_IMAGE}"))
    if not subjects:
        raise VitregError(
            f"{folder}: not a training CSV, nor an OASIS folder (subject folders with "
            f"{OASIS_IMAGE}) nor an IXI folder (atlas.pkl, Train/*.pkl)"
        )
    images = [
        ImageFile(
            subject / OASIS_IMAGE,
            subject / OASIS_LABELS if (subject / OASIS_LABELS).exists() else None,
            where=subject.name,
        )
        for subject in subjects
    ]
    train, val = _holdout(images, val_fraction)
    return Dataset(mode="images", origin=folder, train=tuple(train), val=tuple(val))


def read_ixi(folder: str | Path) -> Dataset:
    """TransMorph IXI: ``atlas.pkl`` (moving) registered to each of ``Train/*.pkl`` (fixed)."""
    folder = Path(folder)
    atlas = folder / "atlas.pkl"
    if not atlas.is_file():
        raise VitregError(f"{folder}: the IXI layout needs atlas.pkl beside Train/ and Val/")

    def listing(split: str) -> tuple[ImageFile, ...]:
        files = sorted((folder / split).glob("*.pkl"))
        return tuple(ImageFile(f, where=f"{split}/{f.name}", pickled=True) for f in files)

    train = listing("Train")
    if not train:
        raise VitregError(f"{folder}: no Train/*.pkl files")
    return Dataset(
        mode="atlas",
        origin=folder,
        train=train,
        val=listing("Val"),
        atlas=ImageFile(atlas, where="atlas.pkl", pickled=True),
        atlas_is_moving=True,
        centre_on_origin=True,
    )


# ---------------------------------------------------------------------------------------------
# Safe pickles


def _numpy_rebuilders() -> dict[tuple[str, str], object]:
    """The callables numpy's own pickles name, found by reduction (whatever numpy's version)."""
    import codecs

    rebuilders: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    rebuilders[("numpy", "dtype")] = np.dtype
    # protocols 0-2 store bytes as _codecs.encode(text, 'latin1'): data, not code
    rebuilders[("_codecs", "encode")] = codecs.encode
    for reduced in (
        np.zeros(1).__reduce_ex__(2),
        np.zeros(1).__reduce_ex__(5),
        np.float32(1).__reduce__(),
    ):
        rebuild = reduced[0]
        for module in (rebuild.__module__, rebuild.__module__.replace("numpy._core", "numpy.core")):
            rebuilders[(module, rebuild.__name__)] = rebuild
    return rebuilders


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays, dtypes and scalars and refuses everything else."""

    allowed = _numpy_rebuilders()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def load_pickle_pair(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a TransMorph pickle ``(image, label)`` of (D, H, W) arrays; no code is run.

    Returns the image as float32 and the label map as int64 (None when the file has no label).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            loaded = _ArrayUnpickler(handle).load()
    except FileNotFoundError:
        raise VitregError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as error:
        raise VitregError(f"{path}: not a pickle of numpy arrays ({error})") from None
    if isinstance(loaded, np.ndarray):
        loaded = (loaded,)
    if not isinstance(loaded, tuple | list) or len(loaded) not in (1, 2):
        raise VitregError(
            f"{path}: expected a pickled (image, label) tuple of arrays, as the IXI files hold"
        )
    arrays = []
    for name, array in zip(("image", "label"), loaded, strict=False):
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise VitregError(f"{path}: the {name} is not a numeric numpy array")
        if array.ndim != 3 or min(array.shape) < 2:
            raise VitregError(f"{path}: the {name} has shape {array.shape}; expected (D, H, W)")
        arrays.append(array)
    image = arrays[0].astype(np.float32)
    if not np.isfinite(image).all():
        raise VitregError(f"{path}: the image has NaN or Inf voxels")
    if len(arrays) == 1:
        return image, None
    labels = arrays[1]
    if labels.shape != image.shape:
        raise VitregError(f"{path}: label shape {labels.shape} differs from image {image.shape}")
    rounded = np.rint(labels)
    if not np.array_equal(rounded, labels):
        raise VitregError(f"{path}: the label map holds non-integer values")
    return image, rounded.astype(np.int64)


def pickle_affine(shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-world matrix given to pickled arrays: 1 mm, LIA, grid centre at the origin."""
    grid = ModelFrame(orientation=PICKLE_ORIENTATION, shape=tuple(int(n) for n in shape))
    return frame_affine(grid, np.zeros(3))


def load_image_file(item: ImageFile) -> tuple[Volume, Volume | None]:
    """The image and its label map (or None) of one ImageFile, fully read and checked."""
    if item.pickled:
        image, labels = load_pickle_pair(item.image)
        affine = pickle_affine(image.shape)
        labels_volume = None
        if labels is not None:
            labels_volume = Volume(data=labels, affine=affine, header=None, path=item.image)
        return Volume(data=image, affine=affine, header=None, path=item.image), labels_volume
    image = load_image(item.image)
    if item.labels is None:
        return image, None
    labels = load_labels(item.labels)
    _check_label_grid(item.labels, labels.shape, labels.affine, image.shape, image.affine)
    return image, labels


def _check_label_grid(
    path: Path, shape: tuple, affine: np.ndarray, image_shape: tuple, image_affine: np.ndarray
) -> None:
    """A label map must lie on its image's grid."""
    if tuple(shape) != tuple(image_shape) or not np.allclose(affine, image_affine, atol=1e-3):
        raise VitregError(
            f"{path}: the label map's grid (shape {tuple(shape)}) differs from its image's "
            f"(shape {tuple(image_shape)}) or their affines differ"
        )


# ---------------------------------------------------------------------------------------------
# Checking every file before training


def check_files(dataset: Dataset) -> np.ndarray:
    """Check every file's header (NIfTI) or existence (pickles); all bad rows in one error.

    Returns the world centre (RAS mm) of the common frame grid: the median of the image grid
    centres (the origin for the IXI layout, whose arrays are already in their frame).
    """
    problems: list[str] = []
    centres = []
    for item in dataset.files():
        where = f"{item.where}: " if item.where else ""
        try:
            if item.pickled:
                if item.labels is not None:
                    raise VitregError(f"{item.labels}: a .pkl image brings its own labels")
                if not item.image.is_file():
                    raise VitregError(f"{item.image}: no such file")
                centres.append(np.zeros(3))
                continue
            shape, affine = read_grid(item.image)
            centres.append(affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3])
            if item.labels is not None:
                label_shape, label_affine = read_grid(item.labels)
                _check_label_grid(item.labels, label_shape, label_affine, shape, affine)
        except VitregError as error:
            problems.append(f"{where}{error}")
    if problems:
        raise VitregError(f"{dataset.origin}: {len(problems)} bad row(s): " + "; ".join(problems))
    if dataset.centre_on_origin:
        return np.zeros(3)
    return np.median(np.stack(centres), axis=0)


# ---------------------------------------------------------------------------------------------
# The cache of framed arrays


@dataclass(frozen=True)
class CacheEntry:
    """Where one ImageFile's framed arrays live: ``<key>.image.npy`` (+ ``.labels.npy``), and
    ``<key>.json`` (label values; written last, so its presence means the entry is complete).
    """

    item: ImageFile
    folder: Path
    key: str

    @property
    def image_path(self) -> Path:
        return self.folder / f"{self.key}.image.npy"

    @property
    def labels_path(self) -> Path:
        return self.folder / f"{self.key}.labels.npy"

    @property
    def info_path(self) -> Path:
        return self.folder / f"{self.key}.json"


def _stamp(path: Path | None) -> list:
    """Identity of a file for the cache key: absolute path, size and modification time."""
    if path is None:
        return []
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_entries(
    dataset: Dataset, frame: ModelFrame, grid_affine: np.ndarray, folder: Path
) -> list[CacheEntry]:
    """The cache entry of every file of ``dataset`` (the key changes with file, frame or grid)."""
    entries = []
    for item in dataset.files():
        identity = {
            "format": CACHE_FORMAT,
            "image": _stamp(item.image),
            "labels": _stamp(item.labels),
            "frame": frame.to_dict(),
            "grid": np.round(grid_affine, 6).tolist(),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        entries.append(CacheEntry(item=item, folder=folder, key=key))
    return entries


def build_cache_entry(entry: CacheEntry, frame: ModelFrame, grid_affine: np.ndarray) -> None:
    """Read, frame (as ``register`` does) and store one file's arrays; no-op if present."""
    if entry.info_path.is_file():
        return
    image, labels = load_image_file(entry.item)
    framed = frame_image(frame, image, grid_affine)[0, 0].numpy().astype(np.float32)
    _save_npy(entry.image_path, framed)
    values: list[int] = []
    if labels is not None:
        if labels.data.min() < 0:
            raise VitregError(f"{labels.path}: negative label values are not supported")
        framed_labels = frame_labels(frame, labels, grid_affine)[0, 0].numpy()
        _save_npy(entry.labels_path, framed_labels.astype(np.int32))
        values = [int(v) for v in np.unique(framed_labels)]
    info = {"image": str(entry.item.image), "label_values": values}
    write_text(entry.info_path, json.dumps(info))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        np.save(handle, array)


@dataclass
class CachedImage:
    """One framed image (D, H, W) float32 and label map (D, H, W) int32 or None, memory-mapped."""

    image: np.ndarray
    labels: np.ndarray | None
    label_values: list[int] = field(default_factory=list)


def open_cache_entry(entry: CacheEntry) -> CachedImage:
    """Memory-map a built cache entry."""
    info = json.loads(entry.info_path.read_text())
    labels = np.load(entry.labels_path, mmap_mode="r") if entry.labels_path.is_file() else None
    return CachedImage(
        image=np.load(entry.image_path, mmap_mode="r"),
        labels=labels,
        label_values=list(info["label_values"]),
    )


# ---------------------------------------------------------------------------------------------
# The pair source over cached files


class CachedPairs:
    """Pairs of cached images; implements the pair-source interface (module docstring).

    ``items`` are (fixed, moving) indices into ``images``, moving -1 meaning "a random other
    image among ``partners``". Item order is a fresh permutation every ``len(items)`` items
    (seeded by ``seed`` and the pass number); partners and flips come from the generator.
    """

    def __init__(
        self,
        images: list[CachedImage],
        items: list[tuple[int, int]],
        partners: list[int],
        seed: int,
        flip: bool,
    ):
        self.images, self.items, self.partners = images, items, partners
        self.seed, self.flip = seed, flip
        self.pairs_per_epoch = len(items)
        values = sorted({v for image in images for v in image.label_values} | {0})
        self.num_classes = len(values)
        self.lookup = np.zeros(max(values) + 1, dtype=np.int64)
        self.lookup[values] = np.arange(len(values))
        self._orders: dict[int, torch.Tensor] = {}

    def _item(self, position: int) -> tuple[int, int]:
        """The item at ``position`` of the endless stream of permutations."""
        rounds, index = divmod(position, len(self.items))
        if rounds not in self._orders:
            self._orders = {
                rounds: torch.randperm(
                    len(self.items),
                    generator=torch.Generator().manual_seed(self.seed * 1_000_003 + rounds),
                )
            }
        return self.items[int(self._orders[rounds][index])]

    def _labels(self, index: int) -> np.ndarray:
        return self.lookup[np.asarray(self.images[index].labels)]

    def pair(self, fixed: int, moving: int, flips: Sequence[bool] = (False,) * 3) -> TrainBatch:
        """One pair as a batch of one on the CPU, flipped along the array axes in ``flips``."""
        axes = [axis for axis, flipped in enumerate(flips) if flipped]

        def tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            array = np.flip(array, axes) if axes else array
            # a copy: the cache is memory-mapped read-only
            return torch.from_numpy(np.array(array, order="C")).to(dtype)[None, None]

        fixed_image = tensor(self.images[fixed].image, torch.float32)
        moving_image = tensor(self.images[moving].image, torch.float32)
        if self.images[fixed].labels is None or self.images[moving].labels is None:
            return TrainBatch(fixed=fixed_image, moving=moving_image)
        return TrainBatch(
            fixed=fixed_image,
            moving=moving_image,
            fixed_labels=tensor(self._labels(fixed), torch.int64),
            moving_labels=tensor(self._labels(moving), torch.int64),
            num_classes=self.num_classes,
        )

    def batch(
        self, draw: int, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> TrainBatch:
        """Batch number ``draw``: items ``draw * batch_size`` onwards of the stream."""
        pairs = []
        for position in range(draw * batch_size, (draw + 1) * batch_size):
            fixed, moving = self._item(position)
            if moving < 0:
                others = [i for i in self.partners if i != fixed]
                moving = others[int(torch.randint(len(others), (1,), generator=generator))]
            flips = (torch.rand(3, generator=generator) < 0.5).tolist() if self.flip else []
            pairs.append(self.pair(fixed, moving, flips or (False,) * 3))
        return stack_batches(pairs, device)

    def validation(self, pairs: list[tuple[int, int]]) -> ValidationPairs:
        """Fixed validation pairs, unflipped, each a batch of one on the CPU (read lazily)."""
        return ValidationPairs(self, pairs)


class ValidationPairs(Sequence):
    """A sequence of TrainBatches of one pair, read from the cache when indexed."""

    def __init__(self, source: CachedPairs, pairs: list[tuple[int, int]]):
        self.source, self.pairs = source, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TrainBatch:
        return self.source.pair(*self.pairs[index])


def stack_batches(batches: list[TrainBatch], device: torch.device | str) -> TrainBatch:
    """Concatenate batches along B and move them to ``device``."""

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in batches]
        if any(part is None for part in parts):
            return None
        return torch.cat(parts).to(device, non_blocking=True)

    return TrainBatch(
        fixed=cat("fixed"),
        moving=cat("moving"),
        fixed_labels=cat("fixed_labels"),
        moving_labels=cat("moving_labels"),
        num_classes=batches[0].num_classes,
    )


def pair_indices(dataset: Dataset) -> tuple[list, list, list, list[ImageFile]]:
    """Training items, partner pool and validation pairs as indices into ``dataset.files()``.

    Returns (train items, partners, val pairs, files). Random-pair mode needs two training
    images; its validation pairs each val image with the next one (cyclically).
    """
    files = dataset.files()
    index = {(f.image, f.labels): i for i, f in enumerate(files)}

    def at(item: ImageFile) -> int:
        return index[(item.image, item.labels)]

    if dataset.mode == "pairs":
        return (
            [(at(f), at(m)) for f, m in dataset.train],
            [],
            [(at(f), at(m)) for f, m in dataset.val],
            files,
        )
    if dataset.mode == "atlas":
        atlas = at(dataset.atlas)

        def with_atlas(item: ImageFile) -> tuple[int, int]:
            return (atlas, at(item)) if not dataset.atlas_is_moving else (at(item), atlas)

        return (
            [with_atlas(i) for i in dataset.train],
            [],
            [with_atlas(i) for i in dataset.val],
            files,
        )
    train = [at(i) for i in dataset.train]
    if len(set(train)) < 2:
        raise VitregError(f"{dataset.origin}: random pairs need at least two training images")
    val = [at(i) for i in dataset.val]
    val_pairs = [(val[k], val[(k + 1) % len(val)]) for k in range(len(val))] if len(val) > 1 else []
    return [(i, -1) for i in train], train, val_pairs, files


def cache_folder(output: Path, cache: Path | None) -> Path:
    """The cache folder (``<output>/cache`` unless given), created."""
    folder = make_folder(cache or output / "cache", "cache folder")
    if not os.access(folder, os.W_OK):
        raise VitregError(f"{folder}: the cache folder is not writable")
    return folder
