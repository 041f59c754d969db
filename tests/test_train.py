"""Training: the loop learns and writes its files, resumes exactly, runs under torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.volumes import write_head_set
from vitreg.cli import app
from vitreg.data import TrainBatch
from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNetConfig
from vitreg.train import TrainRecipe, read_state, train
from vitreg.weights import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FRAME = ModelFrame(spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32))
TINY = VitVNetConfig(
    img_size=(32, 32, 32),
    encoder_channels=(4, 8, 8),
    hidden_size=24,
    num_layers=2,
    num_heads=4,
    mlp_dim=48,
    conv_first_channel=16,
    decoder_channels=(16, 8, 8, 8, 4),
    skip_channels=(8, 8, 8, 8, 4),
)
TINY_CHANGES = {k: v for k, v in TINY.to_dict().items() if k != "img_size"}


def write_pairs_csv(folder: Path, count: int, val: int = 1) -> Path:
    """``count`` heads paired in a ring (the last ``val`` pairs for validation)."""
    write_head_set(folder, count)
    rows = ["fixed,moving,fixed_labels,moving_labels,split"]
    for k in range(count):
        m = (k + 1) % count
        split = "val" if k >= count - val else "train"
        rows.append(f"sub{k}.nii.gz,sub{m}.nii.gz,sub{k}_seg.nii.gz,sub{m}_seg.nii.gz,{split}")
    path = folder / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def metrics(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_epochs_reduce_the_loss_write_every_file_and_register_uses_the_result(tmp_path):
    torch.manual_seed(0)
    data = write_pairs_csv(tmp_path, 4)
    recipe = TrainRecipe(epochs=2, batch_size=3, lr=3e-3, flip=False)
    result = train(data, tmp_path / "run", recipe, frame=FRAME, config=TINY, device="cpu")

    rows = metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[1]["lr"]) == pytest.approx(3e-3 * 0.5**0.9)
    assert 0 < float(rows[0]["val_dice"]) <= 1 and float(rows[0]["val_folding_percent"]) >= 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((tmp_path / "run" / "cache").glob("*.image.npy"))
    state, _ = read_state(result.state)
    assert (state["epoch"], state["step"]) == (2, 0)

    best = read_checkpoint(result.best)
    assert best.frame == FRAME and best.config.img_size == (32, 32, 32)
    assert best.recipe["epoch"] == result.best_epoch and best.recipe["lr"] == 3e-3
    out = tmp_path / "warped.nii.gz"
    run = CliRunner().invoke(
        app,
        [
            "register",
            str(tmp_path / "sub0.nii.gz"),
            str(tmp_path / "sub1.nii.gz"),
            "-o",
            str(out),
            "--weights",
            str(result.best),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert run.exit_code == 0, run.output
    assert out.is_file() and json.loads(run.stdout.splitlines()[-1])["weights"] == str(result.best)


class BlobPairs:
    """A synthetic pair source (the interface a GPU generator implements): a random bright box
    in each image, moved by a few voxels, with its label map."""

    pairs_per_epoch = 4

    def batch(self, draw, batch_size, generator, device):
        shape = (batch_size, 1, *FRAME.shape)
        fixed, moving = torch.zeros(shape), torch.zeros(shape)
        for index in range(batch_size):
            corner = torch.randint(6, 14, (3,), generator=generator)
            shift = torch.randint(-3, 4, (3,), generator=generator)
            for image, start in ((fixed, corner), (moving, corner + shift)):
                d, h, w = start.tolist()
                image[index, 0, d : d + 12, h : h + 12, w : w + 12] = 1.0
        fixed = fixed + 0.05 * torch.rand(shape, generator=generator)
        labels = [(image > 0.5).long() for image in (fixed, moving)]
        return TrainBatch(fixed.to(device), moving.to(device), *labels, num_classes=2)


def test_a_pair_source_plugs_in_and_a_time_budget_stop_resumes_exactly(tmp_path):
    recipe = TrainRecipe(
        epochs=2, batch_size=2, similarity="ncc", dice_weight=1.0, int_steps=3, lr=1e-3
    )
    val = [BlobPairs().batch(0, 1, torch.Generator().manual_seed(99), "cpu")]
    kwargs = dict(frame=FRAME, config=TINY, val_pairs=val, device="cpu")
    whole = train(BlobPairs(), tmp_path / "whole", recipe, **kwargs)
    assert whole.epochs_done == 2 and not whole.stopped_early

    # a budget that runs out after the first step: state saved mid-epoch, then resumed
    cut = train(BlobPairs(), tmp_path / "cut", recipe, max_minutes=1e-6, **kwargs)
    assert cut.stopped_early and cut.epochs_done == 0
    state, _ = read_state(cut.state)
    assert (state["epoch"], state["step"]) == (0, 1)
    resumed = train(BlobPairs(), tmp_path / "cut", recipe, resume=True, **kwargs)
    assert resumed.epochs_done == 2

    assert read_checkpoint(resumed.last).config.int_steps == 3
    for name in ("last.safetensors", "state.safetensors"):
        expected, actual = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    drop = "seconds"
    assert [{k: v for k, v in r.items() if k != drop} for r in whole.history] == [
        {k: v for k, v in r.items() if k != drop} for r in resumed.history
    ]


def test_activation_checkpointing_trains_to_the_same_weights(tmp_path):
    # dropout on: the recomputed forward must draw the same dropout masks as the first one
    recipe = TrainRecipe(epochs=1, batch_size=2, lr=1e-3, dropout=0.1)
    val = [BlobPairs().batch(0, 1, torch.Generator().manual_seed(99), "cpu")]
    kwargs = dict(frame=FRAME, config=TINY, val_pairs=val, device="cpu")
    plain = train(BlobPairs(), tmp_path / "plain", recipe, **kwargs)
    lean_recipe = TrainRecipe(**{**recipe.to_dict(), "checkpoint_activations": True})
    lean = train(BlobPairs(), tmp_path / "lean", lean_recipe, **kwargs)
    expected, actual = load_file(plain.last), load_file(lean.last)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], rtol=1e-4, atol=1e-6), key
    initial = train(BlobPairs(), tmp_path / "none", TrainRecipe(epochs=1, lr=1e-12), **kwargs)
    assert any(
        not torch.allclose(expected[k], load_file(initial.last)[k], atol=1e-6) for k in expected
    ), "one epoch at lr 1e-3 should move the weights, or the comparison above proves nothing"


def train_command(data: Path, output: Path, epochs: int, *extra: str) -> list[str]:
    config = data.parent / "tiny.json"
    config.write_text(json.dumps(TINY_CHANGES))
    return [
        sys.executable,
        "-m",
        "vitreg.cli",
        "train",
        str(data),
        "-o",
        str(output),
        "--epochs",
        str(epochs),
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--size",
        "32",
        "32",
        "32",
        "--spacing",
        "2",
        "2",
        "2",
        "--config",
        str(config),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_kill_9_mid_epoch_then_resume_continues_the_same_schedule(tmp_path):
    data = write_pairs_csv(tmp_path, 6)
    whole = subprocess.Popen(train_command(data, tmp_path / "whole", 2), env=subprocess_env())
    killed = subprocess.Popen(train_command(data, tmp_path / "killed", 2), env=subprocess_env())
    state_path = tmp_path / "killed" / "state.safetensors"
    deadline = time.monotonic() + 120
    while not state_path.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    seconds = float(metrics_when_written(tmp_path / "killed" / "metrics.csv")[0]["seconds"])
    time.sleep(seconds / 4)  # into the second epoch
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    state, _ = read_state(state_path)
    assert (state["epoch"], state["step"]) == (1, 0)  # at most the interrupted epoch is lost

    resumed = subprocess.run(
        train_command(data, tmp_path / "killed", 2, "--resume"), env=subprocess_env()
    )
    assert resumed.returncode == 0 and whole.wait() == 0
    state, _ = read_state(state_path)
    assert (state["epoch"], state["step"]) == (2, 0)
    rows = [metrics(tmp_path / run / "metrics.csv") for run in ("whole", "killed")]
    for row in rows[0] + rows[1]:
        row.pop("seconds")
    assert rows[0] == rows[1] and len(rows[0]) == 2
    expected = load_file(tmp_path / "whole" / "last.safetensors")
    actual = load_file(tmp_path / "killed" / "last.safetensors")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def metrics_when_written(path: Path, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return metrics(path)
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def test_torchrun_with_gloo_runs_one_epoch_on_two_processes(tmp_path):
    data = write_pairs_csv(tmp_path, 5)
    command = train_command(data, tmp_path / "run", 1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", "2", "-m", *command[2:]]
    done = subprocess.run(launcher, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(tmp_path / "run" / "metrics.csv")
    # 4 training pairs, batch 2 on each of 2 processes: 1 step per epoch
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1")]
    state, tensors = read_state(tmp_path / "run" / "state.safetensors")
    assert state["world"] == 2 and {"rng.0.data", "rng.1.data"} <= set(tensors)
    assert read_checkpoint(tmp_path / "run" / "last.safetensors").recipe["epoch"] == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_on_two_nodes_meets_by_rendezvous_and_trains_as_one_group(tmp_path):
    """The multi-node command of docs/training.md: one torchrun agent per node (here two on
    this machine), c10d rendezvous at node 0's address, one process per node."""
    data = write_pairs_csv(tmp_path, 5)
    command = train_command(data, tmp_path / "run", 1)
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    launcher += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    launcher += ["--rdzv-id", "vitreg-test", "-m", *command[2:]]
    nodes = [
        subprocess.Popen(launcher, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for node in nodes:
        _, errors = node.communicate(timeout=300)
        assert node.returncode == 0, errors[-3000:]
    rows = metrics(tmp_path / "run" / "metrics.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1")]  # 4 pairs, 2 x batch 2
    state, tensors = read_state(tmp_path / "run" / "state.safetensors")
    assert state["world"] == 2 and {"rng.0.data", "rng.1.data"} <= set(tensors)
