"""Training data: CSV and folder layouts, up-front checks, safe pickles, cache, pair source."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.volumes import write_head_set
from vitreg.data import (
    CachedPairs,
    build_cache_entry,
    cache_entries,
    check_files,
    load_pickle_pair,
    open_cache_entry,
    pair_indices,
    read_dataset,
)
from vitreg.errors import VitregError
from vitreg.frame import ModelFrame, frame_affine, normalise

FRAME = ModelFrame(spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32))


def cached_source(dataset, folder: Path, frame: ModelFrame = FRAME, flip: bool = True):
    """Frame every file of ``dataset`` into ``folder`` and open the pair source over it."""
    folder.mkdir()
    grid = frame_affine(frame, check_files(dataset))
    entries = cache_entries(dataset, frame, grid, folder)
    for entry in entries:
        build_cache_entry(entry, frame, grid)
    items, partners, val_pairs, _ = pair_indices(dataset)
    images = [open_cache_entry(entry) for entry in entries]
    return CachedPairs(images, items, partners, seed=3, flip=flip), val_pairs


def test_csv_lists_every_bad_row_in_one_error(tmp_path):
    (image, labels), _ = write_head_set(tmp_path, 2)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20).astype(np.float32), np.eye(4)), str(flat))
    csv = tmp_path / "data.csv"
    csv.write_text(
        f"image,labels\n{image.name},{labels.name}\nmissing.nii.gz,\nflat.nii.gz,\n"
        "sub1.nii.gz,sub1_seg.nii.gz\n"
    )
    with pytest.raises(VitregError) as error:
        check_files(read_dataset(csv, val_fraction=0))
    message = str(error.value)
    assert "2 bad row(s)" in message
    assert "data.csv line 3" in message and "missing.nii.gz: no such file" in message
    assert "data.csv line 4" in message and "2D image" in message
    assert "line 2" not in message and "line 5" not in message


def test_csv_paths_are_relative_to_the_csv_and_the_split_column_is_used(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    heads = write_head_set(folder, 4)
    rows = ["image,labels,split"] + [
        f"images/{image.name},images/{labels.name},{split}"
        for (image, labels), split in zip(heads, ("train", "train", "val", "test"), strict=True)
    ]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path.parent)  # relative to the CSV, not to the working folder
    dataset = read_dataset(tmp_path / "data.csv")
    assert dataset.mode == "images"
    assert [f.image for f in dataset.train] == [heads[0][0], heads[1][0]]
    assert [f.labels for f in dataset.val] == [heads[2][1]]
    assert heads[3][0] not in [f.image for f in dataset.files()]  # test rows are not used


def test_pairs_csv_and_atlas_give_the_requested_directions(tmp_path):
    heads = write_head_set(tmp_path, 3)
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels,split\n"
        "sub0.nii.gz,sub1.nii.gz,sub0_seg.nii.gz,sub1_seg.nii.gz,train\n"
        "sub2.nii.gz,sub0.nii.gz,,,val\n"
    )
    pairs = read_dataset(tmp_path / "pairs.csv")
    assert pairs.mode == "pairs"
    assert (pairs.train[0][0].image, pairs.train[0][1].labels) == (heads[0][0], heads[1][1])
    assert pairs.val[0][1].labels is None
    (tmp_path / "images.csv").write_text("image\nsub1.nii.gz\nsub2.nii.gz\n")
    atlas = read_dataset(tmp_path / "images.csv", atlas=heads[0][0], val_fraction=0)
    items, _, _, files = pair_indices(atlas)
    assert [(files[f].image.name, files[m].image.name) for f, m in items] == [
        ("sub0.nii.gz", "sub1.nii.gz"),
        ("sub0.nii.gz", "sub2.nii.gz"),
    ]


def test_oasis_layout_reads_subject_folders_and_frames_images_and_labels(tmp_path):
    for k, (image, labels) in enumerate(write_head_set(tmp_path, 4)):
        subject = tmp_path / f"OASIS_OAS1_{k + 1:04d}_MR1"
        subject.mkdir()
        image.rename(subject / "aligned_norm.nii.gz")
        labels.rename(subject / "aligned_seg35.nii.gz")
    dataset = read_dataset(tmp_path)
    assert dataset.mode == "images" and len(dataset.train) == 3 and len(dataset.val) == 1
    assert dataset.train[0].labels.name == "aligned_seg35.nii.gz"
    source, _ = cached_source(dataset, tmp_path / "cache")
    batch = source.batch(0, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch.fixed.shape == batch.moving.shape == (2, 1, 32, 32, 32)
    assert batch.fixed_labels.dtype == torch.int64 and batch.num_classes == 3
    assert 0 <= float(batch.fixed.min()) and float(batch.fixed.max()) <= 1
    # labels travel with their image: the brightest class sits where the image is bright
    bright = batch.fixed[batch.fixed_labels == 2].mean()
    assert bright > batch.fixed[batch.fixed_labels == 1].mean()


def ixi_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random((32, 32, 32)).astype(np.float32)
    return image, np.rint(image * 3).astype(np.uint16) * 4  # labels 0, 4, 8, 12


def test_ixi_pickle_layout_reads_arrays_unchanged_through_the_frame(tmp_path):
    (tmp_path / "Train").mkdir()
    (tmp_path / "Val").mkdir()
    arrays = {}
    for name, seed, protocol in (
        ("atlas.pkl", 0, 2),
        ("Train/subject_1.pkl", 1, 4),
        ("Train/subject_2.pkl", 2, 5),
        ("Val/subject_3.pkl", 3, pickle.HIGHEST_PROTOCOL),
    ):
        arrays[name] = ixi_arrays(seed)
        with (tmp_path / name).open("wb") as handle:
            pickle.dump(arrays[name], handle, protocol=protocol)
    image, labels = load_pickle_pair(tmp_path / "Train/subject_2.pkl")
    np.testing.assert_array_equal(image, arrays["Train/subject_2.pkl"][0])
    np.testing.assert_array_equal(labels, arrays["Train/subject_2.pkl"][1])

    dataset = read_dataset(tmp_path)
    assert dataset.mode == "atlas" and dataset.atlas_is_moving
    assert [f.where for f in dataset.train] == ["Train/subject_1.pkl", "Train/subject_2.pkl"]
    frame = ModelFrame(orientation="LIA", spacing=(1.0, 1.0, 1.0), shape=(32, 32, 32))
    source, val_pairs = cached_source(dataset, tmp_path / "cache", frame, flip=False)
    assert len(val_pairs) == 1
    pair = source.validation(val_pairs)[0]
    # the IXI frame is the pickles' own grid: only the intensity normalisation applies
    fixed, atlas = arrays["Val/subject_3.pkl"], arrays["atlas.pkl"]
    expected = normalise(frame, torch.from_numpy(fixed[0]))
    torch.testing.assert_close(pair.fixed[0, 0], expected, atol=1e-5, rtol=0)
    expected_atlas = normalise(frame, torch.from_numpy(atlas[0]))
    torch.testing.assert_close(pair.moving[0, 0], expected_atlas, atol=1e-5, rtol=0)
    # labels become classes 0..3 in value order (0, 4, 8, 12)
    np.testing.assert_array_equal(pair.fixed_labels[0, 0].numpy(), fixed[1] // 4)


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_pickle_with_anything_but_arrays_is_refused_without_running_it(tmp_path):
    target = tmp_path / "created-by-pickle"
    path = tmp_path / "evil.pkl"
    with path.open("wb") as handle:
        pickle.dump((np.zeros((4, 4, 4)), _Payload(target)), handle)
    with pytest.raises(VitregError, match="refused to load"):
        load_pickle_pair(path)
    assert not target.exists()


def test_batches_follow_the_generator_and_each_pass_uses_every_pair_once(tmp_path):
    write_head_set(tmp_path, 4)
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving\n"
        + "".join(f"sub{f}.nii.gz,sub{m}.nii.gz\n" for f, m in ((0, 1), (1, 2), (2, 3), (3, 0)))
    )
    source, _ = cached_source(read_dataset(tmp_path / "pairs.csv", val_fraction=0), tmp_path / "c")
    cpu = torch.device("cpu")
    first, second = (
        source.batch(5, 2, torch.Generator().manual_seed(7), cpu),
        source.batch(5, 2, torch.Generator().manual_seed(7), cpu),
    )
    assert torch.equal(first.fixed, second.fixed) and torch.equal(first.moving, second.moving)
    seen = [source._item(position) for position in range(8)]
    assert sorted(seen[:4]) == sorted(seen[4:]) == sorted(source.items)
    # a flip is applied to both images alike: the unflipped pair flipped by hand matches
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    batch = source.batch(0, 1, generator, cpu)
    generator.set_state(state)
    flips = (torch.rand(3, generator=generator) < 0.5).tolist()
    plain = source.pair(*source._item(0))
    axes = [axis + 2 for axis, flipped in enumerate(flips) if flipped]
    assert torch.equal(batch.fixed, plain.fixed.flip(axes) if axes else plain.fixed)
    assert torch.equal(batch.moving, plain.moving.flip(axes) if axes else plain.moving)
