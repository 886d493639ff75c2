"""Bad data must not give silently wrong results (issue 9): files cut short, NaN/Inf voxels, 2D images in a 3D
task, symbolic links and datalist entries that leave the task folder, and a training loss that turns NaN."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ignite.engine import Engine, Events

from medunet.data import load_task, preset_for_task
from medunet.data.check import Problem, check_task
from medunet.data.datalist import load_fold, load_test, write_datalist
from medunet.data.phantom import make_phantom_task
from medunet.data.readers import load_image_transform, read_array
from medunet.data.transforms import infer_transforms, non_finite_fill_value, val_transforms
from medunet.engines.checkpoint import LAST_MODEL_FILE, METRICS_JSON, MODEL_FILE, RESUME_FILE
from medunet.engines.demo import prepare_phantom
from medunet.engines.training import SegmentationTraining
from medunet.errors import MedunetError
from medunet.evaluation import cases as case_io
from medunet.evaluation.evaluate import evaluate_folders
from medunet.integrity import IncompleteFileError, verify_complete
from medunet.networks import create_network

VOLUME = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)


def _cut(path: Path, keep: float | int = 2 / 3) -> Path:
    """Cut ``path`` in place to a fraction of its bytes (float) or by a number of bytes (negative int)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    return path


def _by_case(problems: list[Problem]) -> dict[str, str]:
    return {problem.case: str(problem) for problem in problems}


# -- files cut short ---------------------------------------------------------------------------------------
def _write(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """Write VOLUME as ``name`` (format by suffix, ``+z``: compressed); return the header and the data file."""
    compress = name.endswith("+z")
    name = name.removesuffix("+z")
    path = tmp_path / name
    if name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(VOLUME, np.eye(4)), path)
        return path, path
    sitk.WriteImage(sitk.GetImageFromArray(VOLUME), str(path), compress)
    if name.endswith(".mhd"):
        return path, path.with_suffix(".zraw" if compress else ".raw")
    return path, path


@pytest.mark.parametrize("name", ["x.nii.gz", "x.nii", "x.mha", "x.mha+z", "x.mhd", "x.mhd+z", "x.nrrd", "x.nrrd+z"])
def test_verify_complete_passes_whole_files_and_refuses_them_cut_to_two_thirds(tmp_path: Path, name: str) -> None:
    header, data = _write(tmp_path, name)
    verify_complete(header)
    _cut(data)
    with pytest.raises(IncompleteFileError) as caught:
        verify_complete(header)
    assert str(data) in str(caught.value) and "re-download or re-export it" in str(caught.value)


def test_a_gzip_without_its_trailer_reads_with_nibabel_but_not_through_load_image(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, "case_001.nii.gz")
    _cut(path, -8)  # the voxels are all there; the gzip stream's end (CRC and size) is not
    assert np.allclose(np.asanyarray(nib.load(path).dataobj), VOLUME)  # what MONAI's NibabelReader would use
    with pytest.raises(IncompleteFileError, match="case_001.nii.gz is incomplete"):
        load_image_transform(["image"], image_only=True)({"image": str(path)})


def test_load_image_refuses_a_cut_metaimage_before_simpleitk_reads_it(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, "case_002.mha")
    _cut(path)
    with pytest.raises(IncompleteFileError, match="case_002.mha is incomplete"):
        load_image_transform(["image"], image_only=True)({"image": str(path)})


def test_gzip_in_several_members_passes_and_a_complete_stream_with_too_few_voxels_does_not(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, "x.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    several = tmp_path / "several.nii.gz"
    several.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    verify_complete(several)
    assert np.allclose(read_array(several), VOLUME)
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[:-40]))
    for check in (verify_complete, read_array):
        with pytest.raises(IncompleteFileError, match="decompresses to"):
            check(short)


def test_simpleitk_reads_a_cut_nifti_but_evaluate_refuses_it(tmp_path: Path) -> None:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    refs.mkdir(), preds.mkdir()
    label = np.zeros((16, 16, 8), dtype=np.uint8)
    label[4:12, 4:12, 2:6] = 1
    for folder in (refs, preds):
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / "case_001.nii.gz")
    _cut(refs / "case_001.nii.gz")
    assert sitk.ReadImage(str(refs / "case_001.nii.gz")).GetSize() == (16, 16, 8)  # the hazard: no error
    with pytest.raises(MedunetError, match="case_001.nii.gz is incomplete"):
        case_io.read_image(refs / "case_001.nii.gz")
    with pytest.raises(MedunetError, match="re-download or re-export it"):
        evaluate_folders(preds, refs, out_dir=tmp_path / "out", labels={1: "organ"}, report=False, workers=1,
                         progress=False)


# -- check-data on hostile tasks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_task(tmp_path_factory.mktemp("integrity") / "Task90_PhantomCT", num_cases=4, num_test=0,
                             size=(16, 16, 8))


@pytest.fixture
def task(clean_task: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_task, tmp_path / clean_task.name, symlinks=True))


def _rewrite(path: Path, change) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(image.dataobj)), image.affine), path)


def test_check_data_reports_nan_and_inf_voxels_with_the_case_and_counts(task: Path) -> None:
    def poison(voxels: np.ndarray) -> np.ndarray:
        voxels = voxels.astype(np.float32)
        voxels[0, 0, :3] = np.nan
        voxels[1, 1, 1] = np.inf
        return voxels

    _rewrite(task / "imagesTr" / "phantom_002.nii.gz", poison)
    [problem] = check_task(task, progress=False)
    assert problem.case == "phantom_002" and "3 NaN and 1 infinite voxel(s)" in problem.problem
    assert "nan_to_num" in problem.fix
    assert check_task(task, read_images=False, progress=False) == []  # NaN needs the voxels: full mode only


def test_check_data_reports_2d_and_single_slice_images(task: Path) -> None:
    for case, cut in (("phantom_000", lambda v: v[:, :, 3]), ("phantom_001", lambda v: v[:, :, 3:4])):
        for folder in ("imagesTr", "labelsTr"):  # the label matches, so only the image's dimension is wrong
            _rewrite(task / folder / f"{case}.nii.gz", cut)
    found = _by_case(check_task(task, progress=False))
    assert set(found) == {"phantom_000", "phantom_001"}, found
    assert "image is 2D (spatial shape (16, 16))" in found["phantom_000"]
    assert "single slice" in found["phantom_001"] and "(16, 16, 1)" in found["phantom_001"]
    assert all("Fix: export the whole 3D volume" in text for text in found.values())


def test_check_data_reports_truncated_plain_nifti_and_labels(task: Path) -> None:
    image = task / "imagesTr" / "phantom_003.nii.gz"
    nib.save(nib.load(image), task / "imagesTr" / "phantom_003.nii")
    dataset = json.loads((task / "dataset.json").read_text(encoding="utf-8"))
    dataset["training"][3]["image"] = "./imagesTr/phantom_003.nii"
    (task / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    assert check_task(task, progress=False) == []
    _cut(task / "imagesTr" / "phantom_003.nii")
    _cut(task / "labelsTr" / "phantom_001.nii.gz")
    for read_images in (True, False):
        found = _by_case(check_task(task, read_images=read_images, progress=False))
        assert set(found) == {"phantom_001", "phantom_003"}, found
        assert "file is incomplete: the file has" in found["phantom_003"]
        assert "labelsTr/phantom_001" in found["phantom_001"] and "re-download or re-export it" in found["phantom_001"]


def test_check_data_refuses_symlinks_leaving_the_task_but_not_links_inside(task: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.nii.gz"
    shutil.copy(task / "imagesTr" / "phantom_001.nii.gz", outside)
    (task / "imagesTr" / "phantom_001.nii.gz").unlink()
    (task / "imagesTr" / "phantom_001.nii.gz").symlink_to(outside)
    inside = task / "labelsTr" / "phantom_002.nii.gz"
    shutil.move(inside, task / "labelsTr" / "real_002.nii.gz")
    inside.symlink_to("real_002.nii.gz")  # relative link to a file of the task: fine
    [problem] = check_task(task, progress=False)
    assert problem.case == "phantom_001" and f"symbolic link to {outside}" in problem.problem
    assert "copy the file into the task folder" in problem.fix


def test_a_task_folder_that_is_itself_a_link_still_passes(clean_task: Path, tmp_path: Path) -> None:
    link = tmp_path / "Task90_PhantomCT"
    link.symlink_to(clean_task)
    assert check_task(link, progress=False) == []


# -- datalists from elsewhere -------------------------------------------------------------------------------
@pytest.fixture
def datalist(task: Path, tmp_path: Path) -> Path:
    return write_datalist(task, tmp_path / "folds.json", num_folds=2)


def _edit(datalist: Path, section: str, key: str, value) -> None:
    raw = json.loads(datalist.read_text(encoding="utf-8"))
    raw[section][0][key] = value
    datalist.write_text(json.dumps(raw), encoding="utf-8")


def test_load_fold_accepts_a_clean_datalist_and_absolute_paths_inside(task: Path, datalist: Path) -> None:
    _edit(datalist, "training", "image", str(task / "imagesTr" / "phantom_000.nii.gz"))
    train, val = load_fold(datalist, 0, task)
    assert len(train) + len(val) == 4 and all(Path(item["image"]).is_file() for item in train + val)


@pytest.mark.parametrize("entry", ["../../outside.nii.gz", "/etc/passwd", "symlink"])
def test_load_fold_refuses_paths_leaving_the_data_root(task: Path, datalist: Path, tmp_path: Path, entry: str) -> None:
    if entry == "symlink":
        (task / "imagesTr" / "link.nii.gz").symlink_to(tmp_path / "outside.nii.gz")
        entry = "imagesTr/link.nii.gz"
    _edit(datalist, "training", "label", entry)
    with pytest.raises(MedunetError, match="outside the data root") as caught:
        load_fold(datalist, 0, task)
    assert str(datalist) in str(caught.value) and "Fix: " in str(caught.value)
    problems = check_task(task, datalist=datalist, progress=False)  # the checker says the same, per case
    assert len(problems) == 1 and "outside the task folder" in problems[0].problem


@pytest.mark.parametrize(("key", "value"), [("image", 5), ("label", ["a.nii.gz"]), ("case", 7), ("image", None)])
def test_load_fold_and_the_checker_refuse_non_string_entries(task: Path, datalist: Path, key: str, value) -> None:
    _edit(datalist, "training", key, value)
    with pytest.raises(MedunetError, match=f"{key}={value!r}".replace("[", r"\[")):
        load_fold(datalist, 0, task)
    [problem] = check_task(task, datalist=datalist, progress=False)
    assert problem.case == "datalist" and "path strings" in problem.problem


def test_load_test_refuses_a_test_image_outside_the_data_root(task: Path, tmp_path: Path) -> None:
    raw = json.loads(write_datalist(task, tmp_path / "folds.json", num_folds=2).read_text(encoding="utf-8"))
    raw["test"] = [{"image": "imagesTr/phantom_000.nii.gz", "case": "t"}]
    (tmp_path / "folds.json").write_text(json.dumps(raw), encoding="utf-8")
    assert load_test(tmp_path / "folds.json", task)[0]["image"] == str(task / "imagesTr" / "phantom_000.nii.gz")
    raw["test"] = ["../escape.nii.gz"]
    (tmp_path / "folds.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(MedunetError, match="test item 0 .* outside the data root"):
        load_test(tmp_path / "folds.json", task)


# -- NaN at inference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mri", "ct"])
def test_inference_chain_replaces_nan_by_the_background_value_with_a_warning(tmp_path: Path, kind: str) -> None:
    task_dir = make_phantom_task(tmp_path / f"Task90_Phantom{kind.upper()}", kind=kind, num_cases=1, num_test=0,
                                 size=(20, 20, 12))
    preset = preset_for_task(load_task(task_dir))
    source = task_dir / "imagesTr" / "phantom_000.nii.gz"
    image = nib.load(source)
    voxels = np.asarray(image.dataobj).astype(np.float32)
    holes = np.zeros(voxels.shape, dtype=bool)
    holes[2:6, 3:9, 4:7] = True
    holes[15, 15, 9] = True
    poisoned, filled = voxels.copy(), voxels.copy()
    poisoned[holes] = np.nan
    poisoned[15, 15, 9] = -np.inf
    filled[holes] = non_finite_fill_value(preset)
    nib.save(nib.Nifti1Image(poisoned, image.affine), tmp_path / "poisoned.nii.gz")
    nib.save(nib.Nifti1Image(filled, image.affine), tmp_path / "filled.nii.gz")

    with pytest.warns(UserWarning, match=rf"poisoned.nii.gz: {holes.sum()} of {holes.size} voxels .* NaN or infinite"):
        cleaned = infer_transforms(preset)({"image": str(tmp_path / "poisoned.nii.gz")})["image"]
    expected = val_transforms(preset, ("image",))({"image": str(tmp_path / "filled.nii.gz")})["image"]
    assert torch.isfinite(cleaned).all()
    assert cleaned.shape == expected.shape and torch.allclose(cleaned, expected, atol=1e-5)
    # Validation keeps the NaN (check-data and the loss guard refuse such data instead).
    assert torch.isnan(val_transforms(preset, ("image",))({"image": str(tmp_path / "poisoned.nii.gz")})["image"]).any()


# -- a training whose loss turns NaN ------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _poison_images(task_dir: Path) -> None:
    """A diagonal plane of NaN voxels in every training image."""
    for image in sorted((task_dir / "imagesTr").glob("*.nii.gz")):
        _rewrite(image, lambda v: np.where(np.indices(v.shape).sum(0) == 20, np.nan, v).astype(np.float32))


def _tiny_training(task_dir: Path, run_dir: Path, extra_handlers=()) -> SegmentationTraining:
    datalist = prepare_phantom(task_dir, num_cases=5, kind="mri", size=(20, 20, 16))
    network = create_network("lunet_small_4f", spatial_dims=3, in_channels=1, out_channels=3)
    return SegmentationTraining(run_dir, task_dir, datalist, 0, network, network_name="lunet_small_4f", max_epochs=3,
                                epoch_length=2, batch_size=1, num_samples=2, patch_size=(16, 16, 16), sw_batch_size=2,
                                cache="none", progress=False, profile_memory=False, check_data=False,
                                extra_handlers=extra_handlers)


def test_nan_images_with_the_check_skipped_stop_training_at_the_first_loss_and_save_nothing(tmp_path: Path) -> None:
    task_dir, run_dir = tmp_path / "Task90_PhantomMRI", tmp_path / "run"
    training = _tiny_training(task_dir, run_dir)
    _poison_images(task_dir)
    with pytest.raises(MedunetError, match=r"training loss is nan \(not finite\) at epoch 1, iteration 1"):
        training.run()
    assert not (run_dir / MODEL_FILE).exists() and not (run_dir / RESUME_FILE).exists()
    assert not (run_dir / METRICS_JSON).exists()


class _PoisonAfterFirstEpoch:
    """After epoch 1 is recorded: note the hashes of the run's files, then put NaN voxels into the images
    (read again each epoch with ``cache="none"``), as a task edited by a broken conversion would be."""

    def __init__(self, task_dir: Path, run_dir: Path) -> None:
        self.task_dir, self.run_dir, self.saved = task_dir, run_dir, {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        names = (MODEL_FILE, LAST_MODEL_FILE, RESUME_FILE, METRICS_JSON)
        self.saved = {name: _sha(self.run_dir / name) for name in names}
        _poison_images(self.task_dir)


def test_a_loss_turning_nan_mid_run_stops_training_and_keeps_the_last_good_epoch(tmp_path: Path) -> None:
    task_dir, run_dir = tmp_path / "Task90_PhantomMRI", tmp_path / "run"
    poison = _PoisonAfterFirstEpoch(task_dir, run_dir)
    training = _tiny_training(task_dir, run_dir, extra_handlers=[poison])
    with pytest.raises(MedunetError) as caught:
        training.run()
    message = str(caught.value)
    assert "training loss is nan (not finite) at epoch 2, iteration 1" in message and "check-data" in message
    assert len(poison.saved) == 4 and {name: _sha(run_dir / name) for name in poison.saved} == poison.saved
    metrics = json.loads((run_dir / METRICS_JSON).read_text(encoding="utf-8"))
    assert [row["epoch"] for row in metrics["epochs"]] == [1] and metrics["epochs"][0]["train_loss"] is not None
    # The guard fires before the optimizer step: the weights in memory are still those of epoch 1.
    last = torch.load(run_dir / LAST_MODEL_FILE, weights_only=True)["model"]
    assert all(torch.equal(value, last[name]) for name, value in training.network.named_parameters())
    # Resuming continues from epoch 1, and refuses again while the data stay broken.
    with pytest.raises(MedunetError, match="at epoch 2, iteration 1"):
        _tiny_training(task_dir, run_dir).run()
