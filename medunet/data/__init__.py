"""MSD data layer: task folders, k-fold datalists, presets, transform chains, readers, phantoms, checks."""

from medunet.data.check import Problem, assert_task_ok, check_task, format_problems
from medunet.data.datalist import default_datalist_path, load_fold, load_test, make_datalist, write_datalist
from medunet.data.dataset import build_dataset
from medunet.data.msd import MSDCase, MSDTask, load_task
from medunet.data.phantom import make_case, make_phantom_task
from medunet.data.presets import PRESETS, TaskPreset, get_preset, preset_for_task
from medunet.data.readers import SimpleITKReader, load_image_transform
from medunet.data.transforms import infer_transforms, train_transforms, val_transforms

__all__ = [
    "MSDCase",
    "MSDTask",
    "PRESETS",
    "Problem",
    "SimpleITKReader",
    "TaskPreset",
    "assert_task_ok",
    "build_dataset",
    "check_task",
    "default_datalist_path",
    "format_problems",
    "get_preset",
    "infer_transforms",
    "load_fold",
    "load_image_transform",
    "load_task",
    "load_test",
    "make_case",
    "make_datalist",
    "make_phantom_task",
    "preset_for_task",
    "train_transforms",
    "val_transforms",
    "write_datalist",
]
