"""Synthetic training pairs from label maps (vitreg.synth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitreg.errors import VitregError
from vitreg.metrics import dice_per_label
from vitreg.synth import (
    LabelSource,
    SynthPairs,
    gaussian_blur,
    labels_to_image,
    lower_resolution,
    random_shapes,
)

SHAPE = (32, 32, 32)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _source(shape: tuple[int, int, int] = SHAPE) -> LabelSource:
    labels = random_shapes(shape, 6, _generator(7), scale_vox=10)
    image = labels.float() / 5
    return LabelSource("blobs", labels, torch.tensor([0, 1, 2, 3, 1, 2]), image)


def test_random_shapes_uses_every_label_and_repeats_for_a_seed():
    first = random_shapes(SHAPE, 5, _generator(1), batch=2, scale_vox=8)
    again = random_shapes(SHAPE, 5, _generator(1), batch=2, scale_vox=8)
    other = random_shapes(SHAPE, 5, _generator(2), batch=2, scale_vox=8)
    assert first.shape == (2, 1, *SHAPE) and first.dtype == torch.int64
    assert set(first.unique().tolist()) == set(range(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_random_shapes_refuses_a_single_label():
    with pytest.raises(VitregError, match="at least 2 labels"):
        random_shapes(SHAPE, 1, _generator())


def test_labels_to_image_gives_each_label_one_intensity_without_blur_or_spread():
    labels = random_shapes(SHAPE, 4, _generator(3), scale_vox=8)
    image = labels_to_image(labels, 4, _generator(), max_blur_vox=0.0, max_label_std=0.0)
    assert image.shape == labels.shape
    assert float(image.min()) == pytest.approx(0.0) and float(image.max()) == pytest.approx(1.0)
    for label in range(4):
        values = image[labels == label]
        assert float(values.max() - values.min()) < 1e-6


def test_gaussian_blur_matches_scipy():
    from scipy import ndimage

    image = torch.rand(1, 1, *SHAPE, generator=_generator(4))
    blurred = gaussian_blur(image, torch.tensor([1.5]))
    expected = ndimage.gaussian_filter(
        image[0, 0].double().numpy(), 1.5, mode="nearest", truncate=3
    )
    # scipy truncates at int(3 * sigma + 0.5) = 5 voxels like the kernel here (ceil(4.5) = 5)
    assert np.abs(blurred[0, 0].numpy() - expected).max() < 1e-5


def test_lower_resolution_keeps_shape_and_smooths_along_one_axis():
    image = torch.rand(2, 1, *SHAPE, generator=_generator(5))
    degraded = lower_resolution(image, _generator(6), max_factor=4.0)
    assert degraded.shape == image.shape
    assert float(degraded.std()) < float(image.std())


def test_synth_pairs_give_framed_pairs_of_related_anatomy():
    source = SynthPairs(
        [_source()], SHAPE, num_classes=4, real_fraction=0.5, max_displacement_mm=3.0
    )
    batch = source.batch(0, 3, _generator(8), torch.device("cpu"))
    for image in (batch.fixed, batch.moving):
        assert image.shape == (3, 1, *SHAPE) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    for labels in (batch.fixed_labels, batch.moving_labels):
        assert labels.shape == (3, 1, *SHAPE) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < 4
    assert batch.num_classes == 4
    for item in range(3):
        overlap = dice_per_label(batch.fixed_labels[item, 0], batch.moving_labels[item, 0]).mean
        # two deformations of one anatomy: overlapping, but not identical
        assert 0.3 < overlap < 0.999


def test_synth_pairs_repeat_for_a_seed_and_differ_across_draws():
    source = SynthPairs([_source()], SHAPE, num_classes=4)
    first = source.batch(0, 2, _generator(9), torch.device("cpu"))
    again = source.batch(0, 2, _generator(9), torch.device("cpu"))
    assert torch.equal(first.fixed, again.fixed) and torch.equal(
        first.moving_labels, again.moving_labels
    )
    generator = _generator(9)
    source.batch(0, 2, generator, torch.device("cpu"))
    later = source.batch(1, 2, generator, torch.device("cpu"))
    assert not torch.equal(first.fixed, later.fixed)


def test_synth_pairs_train_the_network_through_the_training_loop(tmp_path):
    from vitreg.frame import ModelFrame
    from vitreg.nets.vitvnet import VitVNetConfig
    from vitreg.train import TrainRecipe, train
    from vitreg.weights import build_model, read_checkpoint

    shape = (32, 32, 64)  # the transformer's 1x1x2 tokens leave batch norm 2 values per channel
    source = SynthPairs([_source(shape)], shape, num_classes=4, pairs_per_epoch=2)
    val_pairs = [source.batch(0, 1, _generator(100), torch.device("cpu"))]
    config = VitVNetConfig(img_size=shape, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32)
    recipe = TrainRecipe(epochs=2, batch_size=1, similarity="ncc", dice_weight=1.0, bf16=False)
    frame = ModelFrame(spacing=(2.0, 2.0, 2.0), shape=shape)
    train(
        source,
        tmp_path / "run",
        recipe,
        frame=frame,
        config=config,
        val_pairs=val_pairs,
        device="cpu",
    )
    for name in ("best.safetensors", "last.safetensors", "metrics.csv"):
        assert (tmp_path / "run" / name).is_file()
    model = build_model(read_checkpoint(tmp_path / "run" / "last.safetensors"))
    assert model.config.img_size == shape
