"""Write ``authors-vitvnet-small.npz``: the authors' ViT-V-Net output for fixed weights and input.

``tests/test_vitvnet.py`` loads the same weights into ``vitreg.nets.vitvnet.VitVNet`` and
checks that its flow and warped image equal the ones stored here, computed by the authors'
own ``models.py`` (junyuchen245/ViT-V-Net_for_3D_Image_Registration_Pytorch, MIT licence).
No line of their code is in this project: this script imports it from a checkout you name.

Run it once, where their repository can be cloned::

    git clone https://github.com/junyuchen245/ViT-V-Net_for_3D_Image_Registration_Pytorch vvn
    git -C vvn checkout f7d41fc          # their final models.py (2021-12-03)
    pip install ml_collections           # their configs.py imports it
    python tests/data/make_authors_output.py --authors-repo vvn

Nothing random is drawn by torch: every weight and the input come from ``fill_rule`` (numpy
PCG64 seeded by a CRC32 of the key name, so the key order does not matter), and the test
draws them again with the same function. The reduced configuration (hidden size 24, two
transformer blocks of four heads, MLP 48, the published CNN and decoder widths, image
32x32x64 so two tokens attend to each other) runs in a second. BatchNorm layers use their
(drawn) running statistics: the network runs in eval mode, dropout off.

The file in this repository was made from their commit 68dc1f1 (the first revision of
``models.py``, the one we could read here, run from a scratch copy outside the project with
``--commit``); its network is the final one's: ReLU in ``Conv3dReLU`` and ``DoubleConv``, the
decoder's first width written as 512 where later revisions read ``conv_first_channel`` (512),
and ``down_num`` computed as 5 - 3 where later ones read it (2). Revision 20a5162 (LeakyReLU,
reverted later) gives flows up to 0.04 voxel away, which the test rejects. Regenerate it at
f7d41fc with the commands above where the repository can be cloned.

The stored arrays: the flow and the warped moving image at every second voxel along each
axis (``[..., ::2, ::2, ::2]``, to keep the file small), float32; the key names and shapes of
their state dict; checksums of the input and the weights (to tell a changed random stream
from a changed network); and the commit the file was made from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

IMG_SIZE = (32, 32, 64)
SMALL = {
    "hidden_size": 24,
    "num_layers": 2,
    "num_heads": 4,
    "mlp_dim": 48,
}  # every other field keeps the published value (conv_first_channel 512, channels, ...)
INPUT_SEED = 20211203
HEAD_GAIN = 4.0
OUTPUT = Path(__file__).with_name("authors-vitvnet-small.npz")
SKIPPED_KEYS = ("spatial_trans.grid",)  # their sampling-grid buffer: derived, not a weight


def fill_rule(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic float32 values for the state-dict entry ``key`` of ``shape``.

    Uniform draws from PCG64 seeded by CRC32(key): convolution and linear weights
    U(-1, 1) * sqrt(3 / fan_in) (unit variance through a layer; the registration head's times
    ``HEAD_GAIN``, so the flow spreads over about a voxel), position embeddings
    U(-0.5, 0.5), norm scales 1 + U(-0.2, 0.2), BatchNorm running variances 0.5 + U(0, 1),
    biases and running means U(-0.1, 0.1). ``num_batches_tracked`` is left alone.
    """
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode())))
    uniform = rng.random(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 2 - 1
    if key.endswith("position_embeddings"):
        values = 0.5 * uniform
    elif key.endswith("running_var"):
        values = 1.0 + 0.5 * uniform
    elif len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        gain = HEAD_GAIN if key.startswith("reg_head.") else 1.0
        values = gain * uniform * np.sqrt(3.0 / fan_in)
    elif key.endswith(".weight"):
        values = 1.0 + 0.2 * uniform
    else:
        values = 0.1 * uniform
    return values.astype(np.float32)


def fill_model(model) -> float:
    """Overwrite every weight and statistic of a torch ``model`` by ``fill_rule``.

    Returns the sum of |value| over all filled entries (a checksum of the weights).
    """
    import torch

    total = 0.0
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key in SKIPPED_KEYS or key.endswith("num_batches_tracked"):
                continue
            values = fill_rule(key, tuple(tensor.shape))
            tensor.copy_(torch.from_numpy(values))
            total += float(np.abs(values, dtype=np.float64).sum())
    return total


def reference_input() -> np.ndarray:
    """(1, 2, *IMG_SIZE) float32 in [0, 1): channel 0 moving, channel 1 fixed."""
    rng = np.random.Generator(np.random.PCG64(INPUT_SEED))
    return rng.random((1, 2, *IMG_SIZE), dtype=np.float64).astype(np.float32)


def subsample(array: np.ndarray) -> np.ndarray:
    """Every second voxel along the three spatial axes of (B, C, D, H, W)."""
    return np.ascontiguousarray(array[..., ::2, ::2, ::2])


def authors_output(repo: Path) -> dict[str, np.ndarray]:
    """Build their ViTVNet at the reduced size, fill it, run it; the arrays to store."""
    import torch

    sys.path.insert(0, str(repo / "ViT-V-Net"))
    import configs  # noqa: PLC0415 - their module, from the checkout
    import models  # noqa: PLC0415

    config = configs.get_3DReg_config()
    config.hidden_size = SMALL["hidden_size"]
    config.transformer.num_layers = SMALL["num_layers"]
    config.transformer.num_heads = SMALL["num_heads"]
    config.transformer.mlp_dim = SMALL["mlp_dim"]
    model = models.ViTVNet(config, img_size=IMG_SIZE).eval()
    weights_checksum = fill_model(model)
    inputs = reference_input()
    with torch.no_grad():
        warped, flow = model(torch.from_numpy(inputs))
    keys = [k for k in model.state_dict() if k not in SKIPPED_KEYS]
    shapes = [list(model.state_dict()[k].shape) for k in keys]
    return {
        "flow_sub2": subsample(flow.numpy()),
        "warped_sub2": subsample(warped.numpy()),
        "input_sum": np.float64(inputs.astype(np.float64).sum()),
        "weights_abs_sum": np.float64(weights_checksum),
        "state_dict_keys": np.array(keys),
        "state_dict_shapes": np.array(json.dumps(shapes)),
    }


def describe(repo: Path) -> str:
    """Commit of the checkout (or 'unknown') and the torch version, as one JSON string."""
    import torch

    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return json.dumps({"authors_commit": commit, "torch": torch.__version__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="their checkout")
    parser.add_argument(
        "--commit", default=None, help="record this commit (when the folder is not a git checkout)"
    )
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    arrays = authors_output(args.authors_repo)
    source = json.loads(describe(args.authors_repo))
    if args.commit:
        source["authors_commit"] = args.commit
    arrays["source"] = np.array(json.dumps(source))
    np.savez_compressed(args.out, **arrays)
    flow = arrays["flow_sub2"]
    print(
        json.dumps(
            {
                "out": str(args.out),
                "bytes": args.out.stat().st_size,
                "flow_std_voxels": float(flow.std()),
                "flow_max_abs_voxels": float(np.abs(flow).max()),
                **source,
            }
        )
    )


if __name__ == "__main__":
    main()
