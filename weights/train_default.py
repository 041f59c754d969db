"""Train the default checkpoint: ViT-V-Net on synthetic pairs, SynthMorph style.

Real brains available without internet are few (Colin27 with AAL parcels and MNI152 2009a with
tissue classes), so the network is trained on images synthesised on the fly from label maps
(``vitreg.synth``): random shapes, and the two brains' label maps, each deformed twice at
random and rendered with random contrast, blur, bias, noise and resolution; a share of pairs
uses the real scans under random deformation and intensity changes. The loss is soft Dice of
the warped label classes plus diffusion (image similarity means little across random
contrasts), with the velocity integrated by scaling and squaring so the field stays
invertible.

The run is resumable and budgeted, so it can continue across device sessions:

    python weights/train_default.py --out runs/default --max-minutes 25            # session 1
    python weights/train_default.py --out runs/default --max-minutes 25 --resume   # later ones

``--dry-run`` trains a reduced network on a reduced frame for a few steps on the CPU, to check
the whole path (sources, synthesis, loop, checkpoints) before spending device time.

Validation each epoch: a fixed set of synthetic pairs (seeded) and the real cross-subject pair
Colin27 -> MNI152 with CSF/GM/WM classes (the shipped example's anatomy). Note that the
benchmark sets of ``benchmarks/make_sets.py`` deform these same two brains, so their scores
measure registration of known anatomy under new deformations and contrasts, not unseen brains.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import make_example  # noqa: E402  (fetches and reads the .deb and the wheel)
import make_sets  # noqa: E402  (the brains with their label maps)

from vitreg.data import TrainBatch  # noqa: E402
from vitreg.frame import ModelFrame, foreground_center_mm, frame_affine, frame_image, frame_labels  # noqa: E402
from vitreg.image import Volume  # noqa: E402
from vitreg.nets.vitvnet import VitVNetConfig  # noqa: E402
from vitreg.synth import LabelSource, SynthPairs  # noqa: E402
from vitreg.train import TrainRecipe, train  # noqa: E402

TISSUE_CLASSES = 4  # background, CSF, GM, WM
PARCEL_CLASSES = 12  # AAL parcels are merged into this many extra Dice classes
NUM_CLASSES = TISSUE_CLASSES + PARCEL_CLASSES
VAL_SYNTH_PAIRS = 6
VAL_SEED = 20261125


def _volume(array: np.ndarray, affine: np.ndarray, name: str) -> Volume:
    return Volume(data=array, affine=affine, header=None, path=Path(name))


def framed_brain(
    frame: ModelFrame, image: np.ndarray, labels: np.ndarray, affine: np.ndarray, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 1, D, H, W) in [0, 1], labels (1, 1, D, H, W) int64) of one brain in ``frame``,
    centred on its foreground."""
    volume = _volume(image, affine, name)
    grid = frame_affine(frame, foreground_center_mm(volume))
    return frame_image(frame, volume, grid), frame_labels(
        frame, _volume(labels, affine, name), grid
    )


def colin_with_parcels(colin_aal: make_sets.Brain, colin_tissue: make_sets.Brain) -> np.ndarray:
    """Colin27 labels: tissue 1..3 (CSF/GM/WM), AAL parcels as 3 + parcel rank where drawn."""
    labels = colin_tissue.labels.astype(np.int64)
    parcels = np.unique(colin_aal.labels[colin_aal.labels > 0])
    rank = np.zeros(int(colin_aal.labels.max()) + 1, dtype=np.int64)
    rank[parcels] = np.arange(1, parcels.size + 1)
    drawn = colin_aal.labels > 0
    labels[drawn] = 3 + rank[colin_aal.labels[drawn]]
    return labels


def class_table(label_count: int) -> torch.Tensor:
    """Label value -> Dice class: tissue keeps 0..3, parcels cycle through the extra classes."""
    values = torch.arange(label_count)
    return torch.where(values < TISSUE_CLASSES, values, 4 + (values - 4) % PARCEL_CLASSES)


def build_sources(
    frame: ModelFrame, deb: Path, wheel: Path
) -> tuple[list[LabelSource], TrainBatch]:
    """The two brains as label sources in ``frame``, and the real Colin27 -> MNI152 val pair."""
    colin_aal, mni, colin_tissue = make_sets.read_brains(deb, wheel)
    colin_labels = colin_with_parcels(colin_aal, colin_tissue)
    colin_image, colin_framed = framed_brain(
        frame, colin_aal.image, colin_labels, colin_aal.affine, "colin27"
    )
    mni_image, mni_framed = framed_brain(
        frame, mni.image, mni.labels.astype(np.int64), mni.affine, "mni152"
    )
    sources = [
        LabelSource(
            "colin27-aal", colin_framed, class_table(int(colin_framed.max()) + 1), colin_image
        ),
        LabelSource("mni152-tissue", mni_framed, class_table(TISSUE_CLASSES), mni_image),
    ]
    tissue = colin_framed.clamp(max=4)
    tissue[tissue == 4] = 2  # every parcel is grey matter
    real_pair = TrainBatch(
        fixed=mni_image,
        moving=colin_image,
        fixed_labels=mni_framed,
        moving_labels=tissue,
        num_classes=NUM_CLASSES,
    )
    return sources, real_pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--pairs-per-epoch", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mricron-deb", type=Path, default=None)
    parser.add_argument("--nilearn-wheel", type=Path, default=None)
    parser.add_argument(
        "--dry-run", action="store_true", help="reduced network and frame, CPU, a few steps"
    )
    args = parser.parse_args(argv)

    if args.dry_run:
        frame = ModelFrame(spacing=(2.5, 2.5, 2.5), shape=(64, 64, 96))
        config = VitVNetConfig(
            img_size=frame.shape,
            hidden_size=48,
            num_layers=2,
            num_heads=4,
            mlp_dim=96,
            int_steps=7,
        )
        epochs, pairs_per_epoch, batch_size = 3, 8, 2
    else:
        frame = ModelFrame()
        config = VitVNetConfig(img_size=frame.shape, int_steps=7)
        epochs, pairs_per_epoch, batch_size = args.epochs, args.pairs_per_epoch, args.batch_size
    recipe = TrainRecipe(
        epochs=epochs,
        batch_size=batch_size,
        similarity="none",
        reg_weight=1.0,
        dice_weight=1.0,
        int_steps=7,
        flip=False,  # left/right labels would swap meaning under a flip
        seed=0,
    )
    with tempfile.TemporaryDirectory() as workdir:
        deb = args.mricron_deb or make_example.fetch_mricron_deb(Path(workdir))
        wheel = args.nilearn_wheel or make_example.fetch_nilearn_wheel(Path(workdir))
        sources, real_pair = build_sources(frame, deb, wheel)
    pairs = SynthPairs(
        sources, frame.shape, NUM_CLASSES, pairs_per_epoch=pairs_per_epoch, spacing=frame.spacing
    )
    val_generator = torch.Generator().manual_seed(VAL_SEED)
    val_pairs = [
        pairs.batch(i, 1, val_generator, torch.device("cpu")) for i in range(VAL_SYNTH_PAIRS)
    ]
    result = train(
        pairs,
        args.out,
        recipe,
        frame=frame,
        config=config,
        val_pairs=[real_pair, *val_pairs],
        resume=args.resume,
        max_minutes=args.max_minutes,
        device="cpu" if args.dry_run else args.device,
    )
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
