"""The report on real data (Spleen CT), its rendering in headless Chromium, and speed on Hippocampus."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medunet.evaluation import evaluate_folders
from medunet.evaluation.report import TABLE_METRICS, pick_cases, summary_table

pytestmark = pytest.mark.realdata


def write_prediction(label_file: Path, out_file: Path, change) -> None:
    """Save ``change(label array)`` with the label's affine under ``out_file``."""
    label = nib.load(label_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    prediction = change(np.asarray(label.dataobj).astype(np.uint8)).astype(np.uint8)
    nib.save(nib.Nifti1Image(prediction, label.affine), out_file)


def shifted(labels: np.ndarray, axis: int = 0) -> np.ndarray:
    """Labels moved by one voxel along ``axis``, zero-filled (no wrap-around)."""
    out = np.zeros_like(labels)
    source = [slice(None)] * labels.ndim
    target = [slice(None)] * labels.ndim
    source[axis], target[axis] = slice(None, -1), slice(1, None)
    out[tuple(target)] = labels[tuple(source)]
    return out


@pytest.fixture(scope="module")
def spleen_report(tmp_path_factory) -> tuple:
    from medunet.paths import shared_data_dir

    spleen_dir = shared_data_dir() / "Task09_Spleen"
    if not (spleen_dir / "dataset.json").is_file():
        pytest.skip(f"real data {spleen_dir} is absent")
    tmp = tmp_path_factory.mktemp("spleen")
    label_file = spleen_dir / "labelsTr" / "spleen_2.nii.gz"
    # An imperfect prediction: eroded by two voxels and moved by four along the first axis.
    write_prediction(label_file, tmp / "pred" / "spleen_2.nii.gz",
                     lambda a: np.roll(ndimage.binary_erosion(a > 0, iterations=2), 4, axis=0))
    result = evaluate_folders(tmp / "pred", spleen_dir / "labelsTr", tmp / "eval", images_dir=spleen_dir / "imagesTr",
                              provenance={"network": "test", "checkpoint_sha256": "0" * 64}, workers=1, progress=False)
    return result, tmp


def test_spleen_metrics_are_real_and_in_range(spleen_report):
    result, _ = spleen_report
    row = result.rows[0]
    assert result.labels == {1: "spleen"}
    assert 0.3 < row["dice"] < 0.95 and row["precision"] > row["sensitivity"]  # eroded: precise, not sensitive
    assert row["ref_volume_ml"] == pytest.approx(96672 * 0.7949**2 * 5.0 / 1000, rel=1e-3)
    assert row["hd95_mm"] >= 4 * 0.79 - 1e-6  # the shift alone moves the boundary this far


def test_spleen_html_is_self_contained_with_table_plots_and_overlay(spleen_report):
    result, _ = spleen_report
    text = result.files["report_html"].read_text(encoding="utf-8")
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', text)) == 3
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing loaded from the network
    assert "Research use only" in text and "checkpoint_sha256" in text
    for _, name, _ in TABLE_METRICS:
        assert f"<td>{name}" in text
    assert pick_cases(result) == [("best = median = worst", "spleen_2", pytest.approx(result.rows[0]["dice"]))]


def test_spleen_pdf_has_front_page_table_and_three_figure_pages(spleen_report):
    result, _ = spleen_report
    pdf = result.files["report_pdf"].read_bytes()
    assert pdf.startswith(b"%PDF")
    pages = len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf))
    assert pages == 1 + 1 + 3  # front page, summary table, distributions, Bland-Altman, overlays
    assert len(re.findall(rb"/Subtype\s*/Image", pdf)) >= 1  # the CT slice under the overlay
    assert len(summary_table(result)) == len(TABLE_METRICS)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


_LOAD_PROBE = """<script>window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-broken', images.filter(i => !(i.complete && i.naturalWidth > 0)).length);
});</script></body>"""


def test_spleen_html_renders_in_headless_chromium(spleen_report):
    browser = chromium_binary()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    result, tmp = spleen_report
    probed = tmp / "probed.html"  # a copy with a probe that records whether every image decoded
    probed.write_text(result.files["report_html"].read_text(encoding="utf-8").replace("</body>", _LOAD_PROBE), encoding="utf-8")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'chromium'}",
               "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60).stdout
    assert 'data-images="3"' in dom and 'data-broken="0"' in dom, dom[-2000:]
    assert "Segmentation evaluation report" in dom
    screenshot = tmp / "report.png"
    subprocess.run(command[:-2] + [f"--screenshot={screenshot}", "--window-size=1200,1600", probed.as_uri()],
                   capture_output=True, timeout=60)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000


def test_hippocampus_cases_take_milliseconds_each(hippocampus_dir, tmp_path):
    label_files = sorted((hippocampus_dir / "labelsTr").glob("*.nii.gz"))[:40]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for path in label_files:
        (ref_dir / path.name).symlink_to(path)
        write_prediction(path, tmp_path / "pred" / path.name, shifted)
    start = time.perf_counter()
    result = evaluate_folders(tmp_path / "pred", ref_dir, tmp_path / "eval", dataset_json=hippocampus_dir / "dataset.json",
                              report=False, workers=2, progress=False)
    seconds_per_case = (time.perf_counter() - start) / len(label_files)
    assert seconds_per_case < 0.25  # about 0.015 s on 2 cores; minutes for 200 cases would be 0.3 s and more
    hd95 = np.array([row["hd95_mm"] for row in result.rows])
    assert np.median(hd95) <= 1.0  # a one-voxel shift at 1 mm moves no surface voxel further than 1 mm
    assert result.labels == {1: "Anterior", 2: "Posterior"}
    assert 0.5 < result.mean("dice") < 1.0
