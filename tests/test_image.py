"""NIfTI/MGZ loading checks and header-preserving atomic saving."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from vitreg.errors import VitregError
from vitreg.files import atomic_path
from vitreg.image import load_image, load_labels, save

AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1.2, 0, -120], [0, 0, 0.9, -70], [0, 0, 0, 1]])


def nifti(path, data, affine=AFFINE, qform_code=1, sform_code=2):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, qform_code)
    image.set_sform(affine, sform_code)
    nib.save(image, str(path))
    return path


def test_scaling_slopes_integer_dtypes_and_single_volume_4d_are_read(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    image = nib.Nifti1Image(data, AFFINE)
    image.header.set_slope_inter(2.0, 10.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    volume = load_image(tmp_path / "scaled.nii.gz")
    assert volume.shape == (4, 5, 6) and volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data, data[..., 0] * 2.0 + 10.0)
    np.testing.assert_allclose(volume.spacing, (1.0, 1.2, 0.9))


def test_mgz_is_read(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    nib.save(nib.MGHImage(data, AFFINE), str(tmp_path / "brain.mgz"))
    volume = load_image(tmp_path / "brain.mgz")
    np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(volume.data, data)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("flat.nii.gz", np.ones((8, 8), np.float32), "2D image"),
        ("multi.nii.gz", np.ones((8, 8, 8, 3), np.float32), "4D image"),
        ("const.nii.gz", np.full((8, 8, 8), 7, np.float32), "constant"),
        ("empty.nii.gz", np.zeros((8, 8, 8), np.float32), "constant"),
        ("nan.nii.gz", np.where(np.eye(8)[..., None] > 0, np.nan, 1.0).astype(np.float32), "NaN"),
    ],
)
def test_bad_images_name_the_file_and_the_problem(tmp_path, name, data, message):
    data = np.broadcast_to(data, (8, 8, 8)).copy() if name == "nan.nii.gz" else data
    path = nifti(tmp_path / name, data)
    with pytest.raises(VitregError, match=rf"{name}.*{message}"):
        load_image(path)


def test_missing_and_non_image_files_are_user_errors(tmp_path):
    with pytest.raises(VitregError, match="nothere.nii.gz: no such file"):
        load_image(tmp_path / "nothere.nii.gz")
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(VitregError, match="notes.nii.gz: not a readable"):
        load_image(text)


def test_non_integer_labels_are_refused(tmp_path):
    path = nifti(tmp_path / "probs.nii.gz", np.random.default_rng(0).random((6, 6, 6)))
    with pytest.raises(VitregError, match="probs.nii.gz.*non-integer"):
        load_labels(path)


def test_save_copies_the_reference_header_and_leaves_no_temporary(tmp_path):
    reference = load_image(nifti(tmp_path / "fixed.nii.gz", np.random.rand(5, 6, 7), sform_code=4))
    out = save(tmp_path / "out.nii.gz", np.ones((5, 6, 7), np.float32), reference)
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-6)
    assert int(written.header["sform_code"]) == 4 and int(written.header["qform_code"]) == 1
    assert written.header.get_xyzt_units() == reference.header.get_xyzt_units()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nii.gz", "out.nii.gz"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_an_interrupt_right_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    # Ctrl-C (KeyboardInterrupt) lands at the first step after mkstemp made the file.
    real_close = os.close

    def close_then_interrupted(handle: int) -> None:
        real_close(handle)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "close", close_then_interrupted)
        with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out.nii.gz"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused_before_writing(tmp_path):
    reference = load_image(nifti(tmp_path / "fixed.nii.gz", np.random.rand(5, 6, 7)))
    with pytest.raises(VitregError, match="does not exist"):
        save(tmp_path / "missing" / "out.nii.gz", np.ones((5, 6, 7), np.float32), reference)
    with pytest.raises(VitregError, match="must end in"):
        save(tmp_path / "out.txt", np.ones((5, 6, 7), np.float32), reference)


def write_mgz_by_the_spec(path, data, spacing, mdc, c_ras, tr_ms=2300.0):
    """An MGZ written from FreeSurfer's format description, not with nibabel: big-endian
    header (version, dims, type, dof, goodRASFlag, spacing, Mdc columns, c_ras), padded to
    284 bytes, Fortran-order data, then the scan parameters (TR, flip angle, TE, TI, FoV).
    """
    import gzip
    import struct

    types = {np.dtype(np.uint8): 0, np.dtype(np.int32): 1, np.dtype(np.float32): 3}
    header = struct.pack(">7ih", 1, *data.shape, 1, types[data.dtype], 0, 1)
    header += struct.pack(">15f", *spacing, *np.asarray(mdc).T.ravel(), *c_ras)
    header += b"\0" * (284 - len(header))
    body = data.astype(data.dtype.newbyteorder(">")).tobytes(order="F")
    footer = struct.pack(">5f", tr_ms, 0.16, 2.9, 900.0, 256.0)
    path.write_bytes(gzip.compress(header + body + footer))
    return path


def test_mgz_geometry_follows_freesurfer_c_ras_at_the_centre_voxel(tmp_path):
    # FreeSurfer: vox2ras = [Mdc * diag(spacing), P0] with c_ras at voxel dims / 2 (not
    # (dims - 1) / 2); conformed volumes are LIA, i.e. Mdc columns -x, -z, +y.
    shape, spacing, c_ras = (6, 8, 10), (1.0, 1.5, 2.0), (3.0, -7.0, 11.0)
    mdc = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    rng = np.random.default_rng(1)
    brain = write_mgz_by_the_spec(
        tmp_path / "brain.mgz", rng.integers(0, 255, shape).astype(np.uint8), spacing, mdc, c_ras
    )
    aseg = write_mgz_by_the_spec(
        tmp_path / "aseg.mgz", rng.choice([0, 2, 41, 1035], shape).astype(np.int32), spacing,
        mdc, c_ras,
    )  # fmt: skip
    linear = mdc * np.asarray(spacing)
    expected = np.eye(4)
    expected[:3, :3] = linear
    expected[:3, 3] = np.asarray(c_ras) - linear @ (np.asarray(shape) / 2)
    volume, labels = load_image(brain), load_labels(aseg)
    np.testing.assert_allclose(volume.affine, expected, atol=1e-5)
    np.testing.assert_allclose(labels.affine, expected, atol=1e-5)
    assert nib.aff2axcodes(volume.affine) == ("L", "I", "A")
    assert set(np.unique(labels.data)) <= {0, 2, 41, 1035}


def test_mgz_outputs_keep_geometry_scan_parameters_and_label_values(tmp_path):
    mdc = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    data = np.random.default_rng(2).integers(1, 255, (6, 8, 10)).astype(np.uint8)
    brain = load_image(
        write_mgz_by_the_spec(tmp_path / "brain.mgz", data, (1, 1, 1), mdc, (1, 2, 3))
    )
    labels = np.full(brain.shape, 1035, np.int64)  # a cortical parcel: does not fit uint8
    written = nib.load(str(save(tmp_path / "aseg_out.mgz", labels, brain)))
    assert written.get_data_dtype() == np.dtype(">i4")
    assert np.asarray(written.dataobj).max() == 1035
    np.testing.assert_allclose(written.affine, brain.affine, atol=1e-5)
    assert float(written.header["tr"]) == pytest.approx(2300.0)
    as_float = nib.load(str(save(tmp_path / "f.mgz", labels.astype(np.float64), brain)))
    assert as_float.get_data_dtype() == np.dtype(">f4")
    with pytest.raises(VitregError, match="MGZ holds at most 4D"):
        save(tmp_path / "flow.mgz", np.zeros((*brain.shape, 1, 3), np.float32), brain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aseg_out.mgz", "brain.mgz", "f.mgz"]
