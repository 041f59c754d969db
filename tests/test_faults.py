"""Bad inputs and faults as a new user meets them, every path holding spaces and non-ASCII.

Each case of the table exits with code 2 (1: a batch with a failed row) after exactly one
line ``vitreg: error: FILE: PROBLEM`` (never a traceback) and leaves nothing at the output
path. Interruptions run the command line as a real process: Ctrl-C (SIGINT) exits 130 and
SIGTERM 143, leaving no partial output; a batch killed with SIGKILL mid-pair is resumed by a
rerun that redoes only the unfinished pairs; a second batch on the same folder stops at once.

Elsewhere: a training run killed with SIGKILL mid-epoch and resumed bit-exact
(tests/test_train.py::test_kill_9_mid_epoch_then_resume_continues_the_same_schedule); two
concurrent downloads of one checkpoint (tests/test_weights.py::
test_two_concurrent_fetches_download_once).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.volumes import grid_affine, rotation, world_head, write
from vitreg.batch import LOCK_FILE
from vitreg.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
SHAPE = (26, 30, 24)
FIXED_AFFINE = grid_affine(rotation(10, 2) * 2.0, SHAPE)
MOVING_AFFINE = grid_affine(np.diag([-2.2, -2.2, 2.2]), SHAPE, (1, -1, 0))
BATCH_SETTINGS = ("--iterations", "60,20", "--levels", "2,1", "--no-affine")
"""A batch pair in about half a second on an idle core: time enough to interrupt it."""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Commands run here use one thread, as the processes started here do (OMP_NUM_THREADS):
    on these tiny volumes more threads only compete on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Study:
    """Good inputs in a folder whose name has a space and non-ASCII letters."""

    folder: Path
    fixed: Path
    moving: Path
    labels: Path  # moving labels, uint8 (0, 1, 2)
    itk_flow: Path  # zeros, (X, Y, Z, 1, 3) on the fixed grid
    voxel_flow: Path  # zeros, (X, Y, Z, 3) on the fixed grid
    weights: Path  # an untrained ViT-V-Net on a 32^3 frame


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_checkpoint) -> Study:
    folder = tmp_path_factory.mktemp("faults") / "données IRM ü"
    folder.mkdir()
    moving_data = world_head(MOVING_AFFINE, SHAPE, shift_mm=(2.0, -1.0, 1.0))
    labels = (moving_data > 400).astype(np.uint8) + (moving_data > 700)
    weights = folder / "poids réseau.safetensors"
    shutil.copy(tiny_checkpoint, weights)
    return Study(
        folder=folder,
        fixed=write(folder / "fixe T1 é.nii.gz", world_head(FIXED_AFFINE, SHAPE), FIXED_AFFINE),
        moving=write(folder / "mobile T1 ü.nii.gz", moving_data, MOVING_AFFINE),
        labels=write(folder / "étiquettes mobiles.nii.gz", labels, MOVING_AFFINE),
        itk_flow=write(
            folder / "champ itk.nii.gz", np.zeros((*SHAPE, 1, 3), np.float32), FIXED_AFFINE
        ),
        voxel_flow=write(
            folder / "champ voxels.nii.gz", np.zeros((*SHAPE, 3), np.float32), FIXED_AFFINE
        ),
        weights=weights,
    )


# --- makers of bad inputs: (study, folder) -> the file the error line must name ---------


def nothing(name: str) -> Callable[[Study, Path], Path]:
    return lambda study, folder: folder / name


def folder_named(name: str) -> Callable[[Study, Path], Path]:
    def make(study: Study, folder: Path) -> Path:
        (folder / name).mkdir()
        return folder / name

    return make


def file_bytes(name: str, content: bytes) -> Callable[[Study, Path], Path]:
    def make(study: Study, folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return make


def image(name: str, data: Callable[[], np.ndarray]) -> Callable[[Study, Path], Path]:
    return lambda study, folder: write(folder / name, data(), MOVING_AFFINE)


def head() -> np.ndarray:
    return world_head(MOVING_AFFINE, SHAPE)


def head_with(value: float) -> np.ndarray:
    data = head()
    data[10, 12, 8] = value
    return data


def rgb() -> np.ndarray:
    data = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    data["G"] = 100
    return data


def truncated(name: str) -> Callable[[Study, Path], Path]:
    """The moving head saved as ``name`` (.nii or .nii.gz), cut at half its bytes (a copy
    that stopped)."""

    def make(study: Study, folder: Path) -> Path:
        path = write(folder / name, head(), MOVING_AFFINE)
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])
        return path

    return make


def corrupt_mgz(study: Study, folder: Path) -> Path:
    """An MGZ of the head whose compressed stream is garbled in the middle (a bad sector)."""
    path = folder / "tête abîmée.mgz"
    nib.save(nib.MGHImage(head(), MOVING_AFFINE), str(path))
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(255 - b for b in content[middle : middle + 64])
    path.write_bytes(bytes(content))
    return path


def nifti_header(name: str, shape=SHAPE, data: bool = True, **fields) -> Callable:
    """A NIfTI-1 file written byte by byte (nibabel would repair or refuse these headers):
    the moving head's header with ``fields`` changed, and its data unless ``data`` is False."""

    def make(study: Study, folder: Path) -> Path:
        values = head().astype(np.float32)
        image = nib.Nifti1Image(values, MOVING_AFFINE)
        image.update_header()
        header = image.header.copy()
        header.set_data_shape(shape)
        for field, value in fields.items():
            header[field] = value
        header["vox_offset"] = 352
        blob = header.binaryblock + b"\0" * 4 + (values.tobytes(order="F") if data else b"")
        path = folder / name
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(blob))
        else:
            path.write_bytes(blob)
        return path

    return make


def labels_with_fractions(study: Study, folder: Path) -> Path:
    labels = np.asarray(nib.load(str(study.labels)).dataobj).astype(np.float32) + 0.4
    return write(folder / "étiquettes réelles.nii.gz", labels, MOVING_AFFINE)


def given(role: str) -> Callable[[Study, Path], Path]:
    return lambda study, folder: getattr(study, role)


def batch_with_truncated_moving(study: Study, folder: Path) -> Path:
    """pairs.csv of one row whose moving image is cut short; returns that image."""
    moving = truncated("mobile coupé.nii.gz")(study, folder)
    (folder / "paires à faire.csv").write_text(f"fixed,moving\n{study.fixed},{moving}\n")
    return moving


# --- faults injected into the file system (in this process, for the commands run here) ---


def read_only(out_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a file in ``out_folder`` fails as on a read-only file system."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out_folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def disk_full_on_second_image(out_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first image is written; the second stops half-way with ENOSPC (disk full)."""
    real_save = nib.save
    saved: list[str] = []

    def save(image, filename):
        saved.append(str(filename))
        real_save(image, filename)
        if len(saved) >= 2:
            written = Path(filename).read_bytes()
            Path(filename).write_bytes(written[: len(written) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(nib, "save", save)


@dataclass(frozen=True)
class Case:
    """``make`` writes the bad input (or names the bad output) and returns the path the
    error line must name; ``command`` uses {bad}, {fixed}, {moving}, {labels}, {itk_flow},
    {voxel_flow}, {weights}, {out} (an image path in an empty output folder), {flow_out}
    (a second one) and {out_dir} (that folder)."""

    make: Callable[[Study, Path], Path]
    command: tuple[str, ...]
    problem: str
    exit_code: int = 2
    fault: Callable[[Path, pytest.MonkeyPatch], None] | None = None


REGISTER = ("register", "{fixed}", "{bad}", "-o", "{out}", "--weights", "{weights}")
WARP_WITH = ("warp", "{moving}", "{bad}", "-o", "{out}")
REGISTER_TO = ("register", "{fixed}", "{moving}", "-o", "{bad}", "--weights", "{weights}")
REGISTER_WITH_FLOW = ("register", "{fixed}", "{moving}", "-o", "{out}", "--flow", "{flow_out}",
                      "--weights", "{weights}", "--optimize", "0", "-q")  # fmt: skip
BATCH = ("register-batch", "{folder}/paires à faire.csv", "--out-dir", "{out_dir}",
         "--weights", "{weights}", "-q")  # fmt: skip
CASES = {
    # inputs that are not images, or are broken
    "missing file": Case(nothing("absent é.nii.gz"), REGISTER, "no such file"),
    "directory as a file": Case(folder_named("dossier é.nii.gz"), REGISTER, "is a directory"),
    "empty file": Case(file_bytes("vide é.nii.gz", b""), REGISTER, "empty file"),
    "text named .nii.gz": Case(
        file_bytes("notes é.nii.gz", b"ceci n'est pas une image\n"),
        REGISTER,
        "not a readable NIfTI/MGZ image",
    ),
    "truncated .nii.gz": Case(truncated("coupé.nii.gz"), REGISTER, "truncated or corrupt"),
    "truncated .nii": Case(truncated("coupé.nii"), REGISTER, "truncated or corrupt"),
    "corrupt .mgz": Case(corrupt_mgz, REGISTER, "truncated or corrupt"),
    "zero pixdim": Case(
        nifti_header("pixdim nul.nii.gz", pixdim=(1.0, 2.2, 0.0, 2.2, 1, 1, 1, 1)),
        REGISTER,
        "voxel size (pixdim) (2.2, 0, 2.2) must be positive",
    ),
    "negative pixdim": Case(
        nifti_header("pixdim négatif.nii.gz", pixdim=(1.0, 2.2, -2.2, 2.2, 1, 1, 1, 1)),
        REGISTER,
        "voxel size (pixdim) (2.2, -2.2, 2.2) must be positive",
    ),
    "singular affine": Case(
        nifti_header("affine singulière.nii.gz", sform_code=1, srow_y=(0.0, 0.0, 0.0, 5.0)),
        REGISTER,
        "affine is singular",
    ),
    "NaN in the affine": Case(
        nifti_header("affine NaN.nii.gz", sform_code=1, srow_x=(np.nan, 0.0, 0.0, 0.0)),
        REGISTER,
        "affine holds NaN or Inf",
    ),
    # images that are not what a command needs
    "2D image": Case(image("coupe 2D.nii.gz", lambda: head()[:, :, 12]), REGISTER, "a 2D image"),
    "4D image of two volumes": Case(
        image("deux volumes.nii.gz", lambda: np.stack([head(), head()], axis=-1)),
        REGISTER,
        f"a 4D image of shape {(*SHAPE, 2)}",
    ),
    "5D image that is not a flow": Case(
        image("cinq D.nii.gz", lambda: np.zeros((*SHAPE, 2, 3), np.float32)),
        WARP_WITH,
        "is not a displacement field",
    ),
    "all-zero image": Case(
        image("zéros.nii.gz", lambda: np.zeros(SHAPE, np.float32)), REGISTER, "constant"
    ),
    "NaN voxels": Case(image("NaN é.nii.gz", lambda: head_with(np.nan)), REGISTER, "NaN or Inf"),
    "Inf voxels": Case(image("Inf é.nii.gz", lambda: head_with(np.inf)), REGISTER, "NaN or Inf"),
    "complex data": Case(
        image("complexe.nii.gz", lambda: head().astype(np.complex64)), REGISTER, "data type complex"
    ),
    "RGB data": Case(image("couleur.nii.gz", rgb), REGISTER, "data type RGB"),
    "huge shape": Case(
        nifti_header("énorme.nii", shape=(30000, 30000, 30000), data=False, datatype=2, bitpix=8),
        REGISTER,
        "shape (30000, 30000, 30000) is too large",
    ),
    # flows, labels and outputs
    "flow of 2 components": Case(
        image("champ 2D.nii.gz", lambda: np.zeros((*SHAPE, 2), np.float32)),
        WARP_WITH,
        "is not a displacement field",
    ),
    "voxel flow where ITK is expected": Case(
        given("voxel_flow"),
        (*WARP_WITH, "--flow-format", "itk"),
        "is not a displacement field in itk format",
    ),
    "ITK flow where voxel is expected": Case(
        given("itk_flow"),
        (*WARP_WITH, "--flow-format", "voxel"),
        "is not a displacement field in voxel format",
    ),
    "labels with fractions": Case(
        labels_with_fractions,
        ("warp-labels", "{bad}", "{itk_flow}", "-o", "{out}"),
        "non-integer values",
    ),
    "output folder missing": Case(
        nothing("absent ö/sortie.nii.gz"), REGISTER_TO, "output directory"
    ),
    "output is a directory": Case(
        folder_named("sortie dossier.nii.gz"), REGISTER_TO, "is a directory"
    ),
    "read-only file system": Case(
        lambda study, folder: folder / "sorties é" / "recalé.nii.gz",
        ("register", "{fixed}", "{moving}", "-o", "{out}", "--weights", "{weights}"),
        "is not writable (Read-only file system)",
        fault=read_only,
    ),
    "disk full": Case(
        lambda study, folder: folder / "sorties é" / "champ.nii.gz",
        REGISTER_WITH_FLOW,
        "cannot write (No space left on device)",
        fault=disk_full_on_second_image,
    ),
    "batch with a truncated row": Case(
        batch_with_truncated_moving, BATCH, "truncated or corrupt", exit_code=1
    ),
}


@pytest.mark.parametrize("case_id", list(CASES))
def test_each_bad_input_is_one_error_line_and_leaves_no_output(
    study, tmp_path, monkeypatch, case_id
):
    case = CASES[case_id]
    folder = tmp_path / "cas d'essai ä"
    out_dir = folder / "sorties é"
    out_dir.mkdir(parents=True)
    bad = case.make(study, folder)
    names = {
        "bad": bad, "fixed": study.fixed, "moving": study.moving, "labels": study.labels,
        "itk_flow": study.itk_flow, "voxel_flow": study.voxel_flow, "weights": study.weights,
        "out": out_dir / "recalé.nii.gz", "flow_out": out_dir / "champ.nii.gz",
        "out_dir": out_dir, "folder": folder,
    }  # fmt: skip
    args = [word.format(**names) for word in case.command]
    if case.fault is not None:
        case.fault(out_dir, monkeypatch)
    result = runner.invoke(app, args)
    monkeypatch.undo()

    assert result.exit_code == case.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("vitreg: error: ") and "Traceback" not in line, line
    assert str(bad) in line and case.problem in line, line
    left = sorted(path.name for path in out_dir.iterdir())
    batch_files = ["summary.csv", "summary.json", LOCK_FILE]
    assert left == [] or (args[0] == "register-batch" and set(left) <= set(batch_files)), left
    if bad.is_dir():
        assert list(bad.iterdir()) == []  # an output path that is a folder stays as it was
    print(f"{case_id}: {line}")  # the table of error lines: pytest -s -k each_bad_input


def test_warp_labels_linear_takes_2000_labels_in_bounded_memory(study, tmp_path):
    """2,000 labels on a 32^3 grid: a one-hot array would take 2000 x 32^3 x 4 bytes = 250
    MiB; the warp grows the peak by a few MiB. Measured in a fresh process (peak resident
    memory) after a warm-up warp of 2 labels."""
    shape = (32, 32, 32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    labels = np.random.default_rng(0).permutation(np.arange(shape[0] * shape[1] * shape[2]))
    labels = (labels % 2000 + 1).reshape(shape).astype(np.int16)
    folder = tmp_path / "parcellation fine é"
    folder.mkdir()
    many = write(folder / "2000 étiquettes.nii.gz", labels, affine)
    two = write(folder / "2 étiquettes.nii.gz", (labels > 1000).astype(np.int16), affine)
    flow = write(folder / "champ nul.nii.gz", np.zeros((*shape, 1, 3), np.float32), affine)
    out = folder / "recalées.nii.gz"
    script = (
        "import resource, sys, time\n"
        "from vitreg.cli import app\n"
        "def run(labels):\n"
        "    app(['warp-labels', labels, sys.argv[2], '-o', sys.argv[3], '--method', 'linear',\n"
        "         '-q', '--device', 'cpu'], standalone_mode=False)\n"
        "run(sys.argv[1])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "run(sys.argv[4])\n"
        "seconds = time.perf_counter() - start\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(before, after, seconds)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(two), str(flow), str(out), str(many)],
        env=environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    before_kib, after_kib, seconds = done.stdout.split()
    grown_mib = (int(after_kib) - int(before_kib)) / 1024
    print(f"2000 labels: peak grew {grown_mib:.1f} MiB, {float(seconds):.2f} s")
    assert grown_mib < 32, (grown_mib, seconds)
    warped = nib.load(str(out))
    assert warped.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(warped.dataobj), labels)  # a zero flow: the same


def test_warp_labels_takes_quiet(study, tmp_path):
    out = tmp_path / "étiquettes recalées.nii.gz"
    result = runner.invoke(
        app, ["warp-labels", str(study.labels), str(study.itk_flow), "-o", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == "" and out.is_file()


# --- interruptions: real processes ---------------------------------------------------------


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_vitreg(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vitreg.cli", *(str(arg) for arg in args)],
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def hidden_files(folder: Path) -> list[str]:
    """Temporaries (and anything else hidden) but the batch lock."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE
    )


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_during_register_exits_130_or_143_and_writes_nothing(
    study, tmp_path, stop, exit_code
):
    out_dir = tmp_path / "sorties é"
    out_dir.mkdir()
    warped, flow = out_dir / "recalé.nii.gz", out_dir / "champ.nii.gz"
    process = start_vitreg(
        "register", study.fixed, study.moving, "-o", warped, "--flow", flow,
        "--weights", study.weights, "--iterations", "3000,1000", "--levels", "2,1",
    )  # fmt: skip
    first = process.stderr.readline()  # printed once the inputs are read and checked
    assert first.startswith("registering"), first + process.stderr.read()
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr
    assert stderr.strip().splitlines()[-1] == "vitreg: interrupted; nothing was written"
    assert "Traceback" not in stderr and stdout == ""
    assert list(out_dir.iterdir()) == []


def write_atlas_batch(study: Study, folder: Path) -> Path:
    """One atlas (the moving head) to three subjects, in folders ``sujet N`` whose images
    share the name ``T1.nii.gz``: pairs.csv without a name column."""
    rows = ["fixed,moving"]
    for k in range(3):
        subject = folder / f"sujet {k + 1}"
        subject.mkdir(parents=True)
        data = world_head(FIXED_AFFINE, SHAPE, shift_mm=(1.0 * k, -0.5 * k, 0.5))
        write(subject / "T1.nii.gz", data, FIXED_AFFINE)
        rows.append(f"sujet {k + 1}/T1.nii.gz,{study.moving}")
    csv_path = folder / "paires atlas.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


ATLAS_NAMES = {f"mobile_T1_ü_to_sujet_{k}_T1" for k in (1, 2, 3)}
"""The output names of :func:`write_atlas_batch`'s pairs."""


def batch_args(study: Study, csv_path: Path, out_dir: Path) -> list[str]:
    return ["register-batch", str(csv_path), "--out-dir", str(out_dir),
            "--weights", str(study.weights), *BATCH_SETTINGS]  # fmt: skip


def wait_for_finished_pairs(process: subprocess.Popen, summary: Path, timeout=120) -> None:
    """Return once summary.json records a finished pair (or fail if the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if summary.exists() and finished_pairs(summary):
            return
        time.sleep(0.02)
    raise AssertionError("no pair finished in time")


def finished_pairs(summary: Path) -> set[str]:
    """Names of the pairs summary.json records as done (it is replaced whole, atomically)."""
    records = json.loads(summary.read_text())["pairs"]
    return {record["name"] for record in records if record["status"] == "ok"}


def rerun_resumes_only_the_finished_pairs(study, csv_path, out_dir, finished: set[str]) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.nii.gz")}
    rerun = runner.invoke(app, [*batch_args(study, csv_path, out_dir), "--json"])
    assert rerun.exit_code == 0, rerun.output
    records = json.loads(rerun.stdout)["pairs"]
    assert [record["status"] for record in records] == ["ok"] * 3
    assert {record["name"]: record["resumed"] for record in records} == {
        record["name"]: record["name"] in finished for record in records
    }
    for name in finished:  # kept, not rewritten
        for suffix in ("_warped.nii.gz", "_flow.nii.gz"):
            assert (out_dir / f"{name}{suffix}").stat().st_mtime_ns == stamps[name + suffix]
    assert hidden_files(out_dir) == []


def test_one_atlas_to_many_subjects_names_pairs_after_both_files(study, tmp_path):
    from vitreg.pairs import read_pairs

    names = [pair.name for pair in read_pairs(write_atlas_batch(study, tmp_path / "étude"))]
    assert names == sorted(ATLAS_NAMES)


def test_ctrl_c_during_register_batch_exits_130_and_a_rerun_resumes(study, tmp_path):
    csv_path = write_atlas_batch(study, tmp_path / "étude")
    out_dir = tmp_path / "résultats é"
    process = start_vitreg(*batch_args(study, csv_path, out_dir), "-q")
    wait_for_finished_pairs(process, out_dir / "summary.json")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        f"vitreg: interrupted; the pairs finished are recorded in {out_dir / 'summary.csv'}; "
        "the same command resumes"
    ]
    finished = finished_pairs(out_dir / "summary.json")
    assert 1 <= len(finished) < 3  # interrupted mid-batch, not after it
    assert hidden_files(out_dir) == []  # no temporary outlives Ctrl-C
    rerun_resumes_only_the_finished_pairs(study, csv_path, out_dir, finished)


def test_a_second_batch_on_the_folder_stops_and_a_killed_batch_redoes_only_unfinished_pairs(
    study, tmp_path
):
    csv_path = write_atlas_batch(study, tmp_path / "étude")
    out_dir = tmp_path / "résultats é"
    first = start_vitreg(*batch_args(study, csv_path, out_dir), "-q")
    wait_for_finished_pairs(first, out_dir / "summary.json")

    second = runner.invoke(app, batch_args(study, csv_path, out_dir))
    assert second.exit_code == 2, second.output
    assert second.output.strip() == (
        f"vitreg: error: {out_dir}: another register-batch is writing to this folder (it "
        f"holds {out_dir / LOCK_FILE}); let it finish, or write to another folder"
    )
    assert first.poll() is None  # the second one stopped at once

    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    finished = finished_pairs(out_dir / "summary.json")  # still valid JSON
    assert 1 <= len(finished) < 3
    for path in out_dir.glob("*.nii.gz"):  # every visible output is whole
        assert np.isfinite(nib.load(str(path)).get_fdata()).all(), path
    # What SIGKILL leaves when it hits a write: a half-written temporary beside its target.
    unfinished = sorted(ATLAS_NAMES - finished)[0]
    (out_dir / f".{unfinished}_flow.nii.gz.k9x2a7qz.nii.gz").write_bytes(b"\x1f\x8b half")
    # The operating system dropped the killed run's lock: the rerun is not blocked.
    rerun_resumes_only_the_finished_pairs(study, csv_path, out_dir, finished)
