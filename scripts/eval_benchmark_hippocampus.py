"""Time ``evaluate_folders`` on real Hippocampus cases against copies of their labels shifted by one voxel.

Usage: python scripts/eval_benchmark_hippocampus.py [--cases 200] [--workers 2] [--report]
The shifted predictions are written to a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medunet.evaluation import evaluate_folders
from medunet.paths import shared_data_dir


def write_shifted_predictions(label_files: list[Path], out_dir: Path, shift: int = 1, axis: int = 0) -> None:
    """Save each label map rolled by ``shift`` voxels along ``axis`` under the same file name."""
    for path in label_files:
        label = nib.load(path)
        shifted = np.roll(np.asarray(label.dataobj).astype(np.uint8), shift, axis=axis)
        nib.save(nib.Nifti1Image(shifted, label.affine), out_dir / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="also time the HTML/PDF report")
    args = parser.parse_args()
    task = shared_data_dir() / "Task04_Hippocampus"
    label_files = sorted((task / "labelsTr").glob("*.nii.gz"))[: args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir, ref_dir = Path(tmp, "pred"), Path(tmp, "ref")
        pred_dir.mkdir()
        ref_dir.mkdir()
        for path in label_files:  # a reference folder with exactly these cases (links, no copies)
            (ref_dir / path.name).symlink_to(path)
        write_shifted_predictions(label_files, pred_dir)
        start = time.perf_counter()
        result = evaluate_folders(pred_dir, ref_dir, Path(tmp, "eval"), dataset_json=task / "dataset.json",
                                  report=args.report, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
    print(f"{len(label_files)} cases, workers={args.workers}, report={args.report}: {seconds:.2f} s "
          f"({1000 * seconds / len(label_files):.1f} ms/case); foreground Dice {result.mean('dice'):.4f}, "
          f"HD95 {result.mean('hd95_mm'):.2f} mm")


if __name__ == "__main__":
    main()
