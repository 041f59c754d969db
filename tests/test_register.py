"""The registration API: frames, orientations and a known world shift recovered in mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.volumes import (
    blob_image,
    grid_affine,
    rotated_pair,
    rotation,
    simpleitk_applies_flow,
    simpleitk_resamples,
    world_head,
    write,
)
from vitreg.errors import VitregError
from vitreg.frame import ModelFrame, frame_affine
from vitreg.image import load_image
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig
from vitreg.register import choose_device, register

SMALL_FRAME = ModelFrame(orientation="RAS", spacing=(1.0, 1.0, 1.0), shape=(64, 64, 64))
SHAPE = (36, 40, 34)
SHIFT_MM = np.array([3.0, -2.0, 1.5])

LINEARS = {
    "RAS": np.diag([1.6, 1.6, 1.6]),
    "LPS": np.diag([-1.6, -1.6, 1.6]),
    "oblique": rotation(20, 2) @ rotation(10, 1) * 1.6,
}


@pytest.mark.parametrize("orientation", list(LINEARS))
def test_known_world_shift_is_recovered_in_mm(tmp_path, orientation):
    linear = LINEARS[orientation]
    image = blob_image(SHAPE, seed=7)
    fixed_affine = grid_affine(linear, SHAPE)
    # The moving grid sits SHIFT_MM further along the world axes, so fixed content at x is
    # moving content at x + SHIFT_MM: the pull displacement is +SHIFT_MM everywhere.
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] += SHIFT_MM
    fixed = load_image(write(tmp_path / "fixed.nii.gz", image, fixed_affine))
    moving = load_image(write(tmp_path / "moving.nii.gz", image, moving_affine))
    torch.manual_seed(0)
    result = register(fixed, moving, frame=SMALL_FRAME, optimize=150, affine=False)
    head = torch.from_numpy(fixed.data > 0)
    recovered = [float(result.field.disp_mm[0, axis][head].median()) for axis in range(3)]
    np.testing.assert_allclose(recovered, SHIFT_MM, atol=0.6)
    assert result.ncc_after > result.ncc_before
    assert result.warped.shape == fixed.shape


@pytest.mark.parametrize(
    ("fixed_orientation", "moving_orientation"),
    [("RAS", "LPS"), ("LPS", "oblique"), ("oblique", "RAS")],
)
def test_shift_is_recovered_between_grids_of_different_orientations(
    tmp_path, fixed_orientation, moving_orientation
):
    fixed_shape, moving_shape = (40, 44, 38), (34, 40, 36)
    fixed_affine = grid_affine(LINEARS[fixed_orientation], fixed_shape, (1.0, -2.0, 0.5))
    moving_affine = grid_affine(LINEARS[moving_orientation] * 1.1, moving_shape, (-1.0, 1.0, 0.0))
    fixed = load_image(
        write(tmp_path / "fixed.nii.gz", world_head(fixed_affine, fixed_shape), fixed_affine)
    )
    moved = world_head(moving_affine, moving_shape, shift_mm=SHIFT_MM)
    moving = load_image(write(tmp_path / "moving.nii.gz", moved, moving_affine))
    torch.manual_seed(0)
    result = register(fixed, moving, frame=SMALL_FRAME, optimize=150, affine=False)
    head = torch.from_numpy(fixed.data > 0.5 * fixed.data.max())
    recovered = [float(result.field.disp_mm[0, axis][head].median()) for axis in range(3)]
    np.testing.assert_allclose(recovered, SHIFT_MM, atol=0.2)
    without_flow = register(fixed, moving, frame=SMALL_FRAME, optimize=0, affine=False)
    error_before = np.abs(without_flow.warped - fixed.data)[head.numpy()].mean()
    error_after = np.abs(result.warped - fixed.data)[head.numpy()].mean()
    assert error_after < 0.5 * error_before


def test_zero_steps_without_a_model_is_the_identity(tmp_path):
    image = blob_image(SHAPE, seed=2)
    affine = grid_affine(LINEARS["oblique"], SHAPE)
    fixed = load_image(write(tmp_path / "fixed.nii.gz", image, affine))
    result = register(fixed, fixed, frame=SMALL_FRAME, optimize=0, affine=False)
    assert torch.count_nonzero(result.field.disp_mm) == 0
    np.testing.assert_allclose(result.warped, fixed.data, rtol=1e-4, atol=1e-2)


def test_network_prediction_runs_in_its_frame(tmp_path):
    image = blob_image(SHAPE, seed=5)
    fixed = load_image(write(tmp_path / "fixed.nii.gz", image, grid_affine(LINEARS["RAS"], SHAPE)))
    config = VitVNetConfig(
        img_size=SMALL_FRAME.shape, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32
    )
    torch.manual_seed(0)
    result = register(fixed, fixed, model=VitVNet(config), frame=SMALL_FRAME, optimize=2)
    assert result.flow_vox.shape == (1, 3, *SMALL_FRAME.shape)
    assert torch.isfinite(result.field.disp_mm).all()


def test_model_and_frame_sizes_must_agree(tmp_path):
    image = blob_image(SHAPE, seed=5)
    fixed = load_image(write(tmp_path / "fixed.nii.gz", image, np.eye(4)))
    model = VitVNet(VitVNetConfig(img_size=(64, 32, 32), hidden_size=24, num_layers=1))
    with pytest.raises(VitregError, match="frame grid"):
        register(fixed, fixed, model=model, frame=SMALL_FRAME)


def test_frame_affine_has_the_frame_orientation_and_spacing():
    import nibabel as nib

    frame = ModelFrame(orientation="LIA", spacing=(1.0, 1.0, 1.0), shape=(160, 192, 224))
    affine = frame_affine(frame, np.array([1.0, 2.0, 3.0]))
    assert nib.aff2axcodes(affine) == ("L", "I", "A")
    centre = nib.affines.apply_affine(affine, (np.array(frame.shape) - 1) / 2)
    np.testing.assert_allclose(centre, [1.0, 2.0, 3.0])


def test_cuda_without_a_gpu_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(VitregError, match="CUDA is not available"):
        choose_device("cuda")
    assert choose_device("auto").type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_result(tmp_path):
    image = blob_image(SHAPE, seed=5)
    fixed = load_image(write(tmp_path / "fixed.nii.gz", image, grid_affine(LINEARS["RAS"], SHAPE)))
    moving = load_image(write(tmp_path / "moving.nii.gz", image[::-1].copy(), fixed.affine))
    config = VitVNetConfig(img_size=SMALL_FRAME.shape, hidden_size=24, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = VitVNet(config)
    with torch.no_grad():
        model.reg_head[0].weight.normal_(std=1e-2)  # a visible flow, not the near-zero init
    results = [
        register(fixed, moving, model=model, frame=SMALL_FRAME, device=device, affine=False)
        for device in ("cpu", "cuda")
    ]
    torch.testing.assert_close(
        results[1].field.disp_mm, results[0].field.disp_mm, atol=1e-3, rtol=0
    )
    np.testing.assert_allclose(results[1].warped, results[0].warped, atol=1e-2)


def test_bad_frame_orientation_is_refused():
    with pytest.raises(VitregError, match="'LRA'"):
        ModelFrame(orientation="LRA")


def test_affine_is_composed_into_the_field_and_warped_is_one_resampling(tmp_path):
    from vitreg.field import save_flow

    fixed, moving, truth = rotated_pair(tmp_path)
    torch.manual_seed(0)
    result = register(fixed, moving, frame=SMALL_FRAME, optimize=20)
    points = np.array([[x, y, z] for x in (-20, 20) for y in (-20, 20) for z in (-20, 20)])
    moved = points @ result.affine_ras[:3, :3].T + result.affine_ras[:3, 3]
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    assert np.abs(moved - expected).max() < 1.0
    save_flow(tmp_path / "flow.nii.gz", result.field)
    theirs = simpleitk_applies_flow(
        tmp_path / "flow.nii.gz", tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz"
    )
    head = fixed.data > 0.2 * fixed.data.max()
    np.testing.assert_allclose(result.warped[head], theirs[head], rtol=1e-3, atol=0.5)
    # The rotation is undone. Before: MOVING read onto the fixed grid through world
    # coordinates (SimpleITK, identity); the truth map through SimpleITK is the ideal.
    before = simpleitk_resamples(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
    ideal = simpleitk_resamples(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", truth)
    errors = {
        name: float(np.abs(image - fixed.data)[head].mean())
        for name, image in (("before", before), ("ideal", ideal), ("vitreg", result.warped))
    }
    assert errors["before"] > 0.3 * fixed.data[head].mean(), errors  # a real misalignment
    assert errors["ideal"] < 1e-3 * errors["before"], errors  # the truth's direction is right
    assert errors["vitreg"] < 0.1 * errors["before"], errors


def large_smooth_velocity(shape=(32, 32, 32), amplitude=8.0) -> torch.Tensor:
    torch.manual_seed(3)
    coarse = torch.randn(1, 3, 4, 4, 4)
    velocity = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")
    return amplitude * velocity / velocity.abs().max()


def test_diffeomorphic_field_does_not_fold_where_the_same_displacement_does():
    from vitreg.metrics import jacobian_determinant
    from vitreg.transform import integrate_velocity

    velocity = large_smooth_velocity()
    as_displacement = jacobian_determinant(velocity[0].numpy())
    integrated = jacobian_determinant(integrate_velocity(velocity, 7)[0].numpy())
    inner = (slice(4, -4),) * 3  # zero padding at the border is not the field's doing
    assert (as_displacement[inner] <= 0).mean() > 0.01  # the test can fail
    assert (integrated[inner] <= 0).sum() == 0


def fixed_point_of(result, fixed, moving, inverse):
    """|psi(phi(x)) - x| in mm at the fixed head voxels: forward, then the inverse field."""
    from vitreg.field import source_coordinates
    from vitreg.transform import sample

    forward = result.field.disp_mm
    moving_coords = source_coordinates(result.field, moving)  # moving voxels of phi(x)
    back = sample(inverse.field.disp_mm, moving_coords, padding="border")
    head = torch.from_numpy(fixed.data > 0.2 * fixed.data.max())
    return torch.linalg.vector_norm(forward + back, dim=1)[0][head]


@pytest.mark.parametrize(("diffeo", "affine"), [(False, False), (True, True)])
def test_inverse_field_composed_with_the_forward_one_is_near_identity(tmp_path, diffeo, affine):
    from vitreg.register import invert

    fixed, moving, _ = rotated_pair(tmp_path)
    torch.manual_seed(0)
    result = register(fixed, moving, frame=SMALL_FRAME, optimize=20, diffeo=diffeo, affine=affine)
    if not affine:
        assert float(result.flow_vox.abs().max()) > 1.0  # a non-trivial dense part
    inverse = invert(result, moving)
    assert inverse.field.grid.shape == moving.shape
    assert inverse.exact == diffeo
    error = fixed_point_of(result, fixed, moving, inverse)
    assert float(error.mean()) < 0.15 and float(error.max()) < 1.0, (error.mean(), error.max())
    assert inverse.residual_mean_mm < 0.15
    if diffeo:
        from vitreg.transform import integrate_velocity

        torch.testing.assert_close(
            result.flow_vox, integrate_velocity(result.velocity_vox, result.integration_steps)
        )


@pytest.mark.parametrize(("similarity", "regularizer"), [("mse", "bending"), ("mi", "diffusion")])
def test_other_similarities_and_penalties_improve_the_alignment(tmp_path, similarity, regularizer):
    image = blob_image(SHAPE, seed=7)
    fixed_affine = grid_affine(LINEARS["RAS"], SHAPE)
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] += SHIFT_MM
    fixed = load_image(write(tmp_path / "fixed.nii.gz", image, fixed_affine))
    moving = load_image(write(tmp_path / "moving.nii.gz", image, moving_affine))
    torch.manual_seed(0)
    options = dict(
        frame=SMALL_FRAME, affine=False, optimizer="adam", similarity=similarity,
        regularizer=regularizer,
    )  # fmt: skip
    before = register(fixed, moving, optimize=0, **options)
    after = register(fixed, moving, optimize=40, smoothness=0.05, **options)
    head = fixed.data > 0
    errors = [np.abs(run.warped - fixed.data)[head].mean() for run in (before, after)]
    assert errors[1] < 0.7 * errors[0], errors
    assert float(after.field.disp_mm[0, 0][torch.from_numpy(head)].median()) > 1.0


def test_dice_guidance_raises_dice(tmp_path):
    from vitreg.assess import dice_before_after
    from vitreg.image import load_labels

    fixed, moving, _ = rotated_pair(tmp_path)
    paths = {}
    for name, volume in (("fixed", fixed), ("moving", moving)):
        labels = (volume.data > 0.5 * volume.data.max()).astype(np.uint8)
        paths[name] = write(tmp_path / f"{name}_labels.nii.gz", labels, volume.affine)
    labels = (load_labels(paths["fixed"]), load_labels(paths["moving"]))
    runs = [
        register(
            fixed,
            moving,
            frame=SMALL_FRAME,
            optimizer="adam",
            optimize=20,
            affine=False,
            labels=labels,
            dice_weight=weight,
        )  # fmt: skip
        for weight in (0.0, 2.0)
    ]
    dice = [dice_before_after(*labels, run.field)[1].mean for run in runs]
    assert dice[1] > dice[0] + 0.01, dice
