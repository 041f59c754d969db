"""Fixtures shared by the command-line test files."""

from __future__ import annotations

import pytest
import torch

from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig
from vitreg.weights import save_checkpoint

TINY_CONFIG = VitVNetConfig(
    img_size=(32, 32, 32), hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32,
    conv_first_channel=32,
)  # fmt: skip
TINY_FRAME = ModelFrame(orientation="RAS", spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained ViT-V-Net on a 32^3 frame of 2 mm voxels: the CLI runs fast with it
    (without --optimize: its coarsest level, 8^3, is smaller than the 9^3 NCC window)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    return save_checkpoint(folder / "tiny.safetensors", VitVNet(TINY_CONFIG), TINY_FRAME)
