"""Folder evaluation: matching cases by name, reporting problems, outputs, and ``medunet evaluate``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import main
from medunet.cli.evaluate_cmd import parse_tolerances
from medunet.errors import MedunetError
from medunet.evaluation import compute_evaluation, evaluate_folders, write_evaluation
from medunet.evaluation.cases import foreground_labels

SPACING = (1.0, 1.5, 2.0)


def save(path: Path, array: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*spacing, 1.0])), path)
    return path


def two_label_case(offset: int = 0, shape=(24, 20, 16)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[4 + offset:12 + offset, 4:12, 4:10] = 1
    labels[14:20, 6:14, 6:12] = 2
    return labels


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three references; predictions: exact, shifted (nnU-Net ``_0000`` name), missing; plus an extra one."""
    ref_dir, pred_dir = tmp_path / "labelsTr", tmp_path / "pred"
    for name in ("case_a", "case_b", "case_c"):
        save(ref_dir / f"{name}.nii.gz", two_label_case())
    save(pred_dir / "case_a.nii.gz", two_label_case())
    save(pred_dir / "case_b_0000.nii.gz", two_label_case(offset=2))
    save(pred_dir / "stray.nii.gz", two_label_case())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2}}), encoding="utf-8")
    return pred_dir, ref_dir


def test_computing_writes_nothing_and_writing_gives_the_same_files(folders, tmp_path):
    pred_dir, ref_dir = folders
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    computed = compute_evaluation(pred_dir, ref_dir, workers=1, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before and not computed.files
    written = write_evaluation(computed, tmp_path / "out", report=False)
    assert set(written.files) == {"cases_csv", "summary_json"} and (tmp_path / "out" / "summary.json").is_file()
    direct = evaluate_folders(pred_dir, ref_dir, tmp_path / "direct", report=False, workers=1, progress=False)
    assert direct.metrics() == pytest.approx(computed.metrics(), nan_ok=True)


def test_cases_match_by_name_and_missing_prediction_counts_as_failure(folders, tmp_path):
    pred_dir, ref_dir = folders
    result = evaluate_folders(pred_dir, ref_dir, tmp_path / "out", report=False, workers=1, progress=False)
    assert result.labels == {1: "left", 2: "right"}  # from ../dataset.json in nnU-Net's inverted form
    by_case = {(row["case"], row["label"]): row for row in result.rows}
    assert by_case["case_a", 1]["dice"] == 1.0
    assert 0 < by_case["case_b", 1]["dice"] < 1 and by_case["case_b", 2]["dice"] == 1.0
    assert by_case["case_c", 1]["status"] == "missing_prediction" and by_case["case_c", 1]["failure"]
    assert by_case["case_c", 1]["dice"] == 0.0
    assert result.aggregates["1"]["dice"]["n_failures"] == 1
    assert result.aggregates["1"]["dice"]["n_valid"] == 3  # the failure stays in the mean
    assert any("case_c" in p and "missing" in p for p in result.problems)
    assert any("stray" in p for p in result.problems)


def test_skip_missing_leaves_the_case_out(folders, tmp_path):
    pred_dir, ref_dir = folders
    result = evaluate_folders(pred_dir, ref_dir, tmp_path / "out", report=False, workers=1,
                              progress=False, skip_missing=True)
    assert {row["case"] for row in result.rows} == {"case_a", "case_b"}
    assert result.aggregates["foreground"]["dice"]["n_failures"] == 0


def test_cases_restricts_the_evaluation_to_a_fold(folders, tmp_path):
    pred_dir, ref_dir = folders
    result = evaluate_folders(pred_dir, ref_dir, tmp_path / "out", report=False, workers=1, progress=False,
                              cases=["case_b", "case_x"])
    assert {row["case"] for row in result.rows} == {"case_b"}
    assert result.problems == ["case without reference: case_x"]  # case_c is not in the fold: not missing


def test_strict_mode_names_every_problem_case(folders, tmp_path):
    pred_dir, ref_dir = folders
    with pytest.raises(MedunetError, match="case_c") as error:
        evaluate_folders(pred_dir, ref_dir, tmp_path / "out", report=False, workers=1, progress=False, strict=True)
    assert "stray" in str(error.value)


def test_shape_mismatch_is_reported_and_scored_as_failure(tmp_path):
    save(tmp_path / "ref" / "x.nii.gz", two_label_case())
    save(tmp_path / "pred" / "x.nii.gz", two_label_case(shape=(24, 20, 18)))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", labels={1: "a", 2: "b"},
                              report=False, workers=1, progress=False)
    assert {row["status"] for row in result.rows} == {"shape_mismatch"}
    assert any(problem.startswith("x: prediction shape") for problem in result.problems)


def test_spacing_mismatch_is_flagged_but_evaluated(tmp_path):
    save(tmp_path / "ref" / "x.nii.gz", two_label_case())
    save(tmp_path / "pred" / "x.nii.gz", two_label_case(), spacing=(1.0, 1.0, 1.0))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", labels={1: "a"},
                              report=False, workers=1, progress=False)
    assert result.rows[0]["dice"] == 1.0 and "spacing" in result.rows[0]["note"]


def test_wrong_folder_raises_a_helpful_error(tmp_path):
    save(tmp_path / "ref" / "case_a.nii.gz", two_label_case())
    save(tmp_path / "pred" / "other.nii.gz", two_label_case())
    with pytest.raises(MedunetError, match="no prediction .* matches"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", report=False, progress=False)
    with pytest.raises(MedunetError, match="does not exist"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "ref", report=False, progress=False)


def test_labels_inferred_from_references_when_no_dataset_json(tmp_path):
    save(tmp_path / "ref" / "a.nii.gz", two_label_case())
    only_one = two_label_case()
    only_one[only_one == 2] = 0
    save(tmp_path / "ref" / "b.nii.gz", only_one)
    save(tmp_path / "pred" / "a.nii.gz", two_label_case())
    save(tmp_path / "pred" / "b.nii.gz", only_one)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", report=False,
                              workers=1, progress=False)
    assert result.labels == {1: "1", 2: "2"}
    row = next(r for r in result.rows if r["case"] == "b" and r["label"] == 2)
    assert row["status"] == "both_empty" and math.isnan(row["dice"]) and not row["failure"]
    assert result.aggregates["2"]["dice"]["n_valid"] == 1


def test_dataset_json_labels_in_both_directions():
    assert foreground_labels({"0": "background", "1": "Anterior", "2": "Posterior"}) == {1: "Anterior", 2: "Posterior"}
    assert foreground_labels({"background": 0, "spleen": 1}) == {1: "spleen"}
    with pytest.raises(MedunetError, match="region"):
        foreground_labels({"background": 0, "whole tumour": [1, 2, 3]})


def test_parallel_workers_give_the_same_rows_as_serial(folders, tmp_path):
    pred_dir, ref_dir = folders
    serial = evaluate_folders(pred_dir, ref_dir, tmp_path / "s", report=False, workers=1, progress=False)
    parallel = evaluate_folders(pred_dir, ref_dir, tmp_path / "p", report=False, workers=2, progress=False)
    assert json.dumps(serial.rows, default=str) == json.dumps(parallel.rows, default=str)


def test_summary_json_is_nnunet_compatible_and_csv_has_a_row_per_case_and_label(folders, tmp_path):
    pred_dir, ref_dir = folders
    result = evaluate_folders(pred_dir, ref_dir, tmp_path / "out", report=False, workers=1, progress=False)
    summary = json.loads(result.files["summary_json"].read_text(encoding="utf-8"))
    assert {"metric_per_case", "mean", "foreground_mean"} <= set(summary)
    assert set(summary["mean"]) == {"1", "2"}
    assert {"Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref", "hd95_mm", "nsd"} <= set(summary["mean"]["1"])
    per_label = [summary["mean"][key]["Dice"] for key in ("1", "2")]
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean(per_label))
    first = summary["metric_per_case"][0]
    assert {"metrics", "prediction_file", "reference_file"} <= set(first)
    with open(result.files["cases_csv"], encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 3 * 2
    assert {"case", "label", "dice", "hd95_mm", "assd_mm", "nsd", "ref_volume_ml", "status"} <= set(rows[0])


def test_cli_evaluate_writes_outputs_and_exit_code(folders, tmp_path, capsys):
    pred_dir, ref_dir = folders
    out = tmp_path / "cli_out"
    code = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out),
                 "--no-report", "--workers", "1", "--tolerance-mm", "1.5", "--tolerance-mm", "right=3"])
    assert code == 0
    assert (out / "summary.json").is_file() and (out / "cases.csv").is_file()
    printed = capsys.readouterr().out
    assert "left" in printed and "missing prediction: case_c" in printed
    tolerances = json.loads((out / "summary.json").read_text(encoding="utf-8"))["medunet"]["provenance"]["evaluation"]
    assert tolerances["nsd_tolerance_mm"] == {"left": 1.5, "right": 3.0}


def test_cli_error_names_the_folder_and_exits_2(tmp_path, capsys):
    save(tmp_path / "ref" / "a.nii.gz", two_label_case())
    code = main(["evaluate", "--pred", str(tmp_path / "missing"), "--ref", str(tmp_path / "ref"), "--no-report"])
    assert code == 2
    assert f"prediction folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_tolerance_arguments():
    assert parse_tolerances([]) == 2.0
    assert parse_tolerances(["1.5"]) == 1.5
    assert parse_tolerances(["1", "spleen=3"]) == {"default": 1.0, "spleen": 3.0}
    with pytest.raises(MedunetError, match="LABEL=MM"):
        parse_tolerances(["spleen:3"])


def test_readme_python_example(tmp_path):
    """The README example: evaluate a folder and read the aggregates."""
    save(tmp_path / "labelsTr" / "case_001.nii.gz", two_label_case())
    save(tmp_path / "predictions" / "case_001.nii.gz", two_label_case(offset=1))
    pred_dir, ref_dir, out_dir = tmp_path / "predictions", tmp_path / "labelsTr", tmp_path / "evaluation"
    # --- README example starts
    from medunet.evaluation import evaluate_folders

    result = evaluate_folders(
        pred_dir, ref_dir, out_dir,
        labels={1: "left", 2: "right"},
        tolerance_mm={"left": 1.0, "right": 2.0},
        provenance={"network": "lunet_small_8f", "fold": 0},
        report=False,
    )
    print(result.mean("dice", label=1), result.aggregates["foreground"]["hd95_mm"]["median"])
    print(result.files["summary_json"])
    # --- README example ends
    assert result.mean("dice", label=2) == 1.0 and result.mean("dice", label=1) < 1.0


def test_a_label_no_prediction_holds_is_reported_as_never_predicted_but_scored_even_in_strict_mode(tmp_path):
    ref_dir, pred_dir = tmp_path / "labelsTr", tmp_path / "pred"
    for name in ("case_a", "case_b"):
        save(ref_dir / f"{name}.nii.gz", two_label_case())
        save(pred_dir / f"{name}.nii.gz", np.where(two_label_case() == 2, 0, two_label_case()))  # never "right"
    labels = {1: "left", 2: "right"}
    result = compute_evaluation(pred_dir, ref_dir, labels=labels, workers=1, progress=False, strict=True)
    (problem,) = result.problems
    assert problem.startswith("label 2 (right) is in the reference of 2 of 2 case(s) and in none of their predictions")
    assert result.aggregates["2"]["dice"]["mean"] == 0.0 and result.aggregates["1"]["dice"]["mean"] == 1.0

    save(pred_dir / "case_b.nii.gz", two_label_case())  # predicted in one case: not a lost class
    assert compute_evaluation(pred_dir, ref_dir, labels=labels, workers=1, progress=False).problems == []
