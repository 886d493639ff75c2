"""``medunet bench``: the side-by-side efficiency (and accuracy) benchmark, as CSV, markdown and plots."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
from pathlib import Path
from typing import Any

from medunet.cli.common import add_tracking_arguments, device_name, non_negative_int, positive_int

PROTOCOL_NAMES = ("gpu", "cpu")  # medunet.bench.accuracy.PROTOCOLS, named here so --help imports nothing heavy
RECIPE_NAMES = ("nnunet", "light")  # medunet.bench.accuracy.RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark networks side by side: efficiency at fixed inputs, accuracy on a Hippocampus fold",
        description="Profiles each network at the same inputs (parameters, MACs, measured peak memory of "
        "inference and of a training step, skip memory, latency, sliding-window throughput), with ratios "
        "to a baseline measured in the same run, and optionally trains each with one recipe on a fold.",
    )
    parser.add_argument("--quick", action="store_true", help="4 networks at 1x1x64^3, small volume: minutes on 2 cores")
    parser.add_argument("--networks", nargs="+", help="registry names (default: the benchmark set; 'all' for every preset)")
    parser.add_argument("--shapes", nargs="+", help="input shapes like 1x1x128x128x128 (default: 96^3, 128^3, 3x256^2)")
    parser.add_argument("--baseline", default="monai_unet_spleen", help="ratios are to this network (default monai_unet_spleen)")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--volume", default=None, help="sliding-window volume DxHxW (default 512x512x128; 'none' to skip)")
    parser.add_argument("--no-train", action="store_true", help="skip training-step memory and latency")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per latency figure (default 3)")
    parser.add_argument("--repeats-memory", type=positive_int, default=1, metavar="N",
                        help="measure each peak-memory figure N times (fresh processes) and report the median "
                        "(default 1; 3 on the CPU, where peaks move by about +-0.15x between runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/latest"), help="output folder (default benchmarks/latest)")
    parser.add_argument("--results", type=Path, metavar="FILE",
                        help="also write the results file here (e.g. benchmarks/RESULTS.md), its plot beside it")
    accuracy = parser.add_argument_group(
        "accuracy", "train each network with one recipe on a fold (medunet.bench.accuracy.RECIPE) into "
        "OUT/runs/<network>; finished runs are reused, so a rerun after a crash trains only what is left")
    accuracy.add_argument("--accuracy", action="store_true", help="add the accuracy half (trains every network)")
    accuracy.add_argument("--task-dir", type=Path,
                          help="MSD task folder (default ../shared/data/Task04_Hippocampus)")
    accuracy.add_argument("--workflow", type=Path,
                          help="training workflow (default the task's: medunet/workflows/task04_hippocampus.json)")
    accuracy.add_argument("--fold", type=non_negative_int, default=0, help="validation fold (default 0)")
    accuracy.add_argument("--folds", type=non_negative_int, nargs="+", metavar="K",
                          help="cross-validation: train on each fold (into OUT/runs/fold<K>/<network>) and report "
                          "mean +- SD over folds and which differences exceed the fold-to-fold spread")
    accuracy.add_argument("--protocol", choices=PROTOCOL_NAMES, default="gpu",
                          help="training budget: gpu (the full recipe, medunet.bench.accuracy.RECIPE; default) or "
                          "cpu (whole Hippocampus volumes, about 30 minutes per network on 2 cores: CPU_RECIPE)")
    accuracy.add_argument("--recipe", choices=RECIPE_NAMES, default="nnunet",
                          help="nnunet (nnU-Net's augmentation and foreground oversampling, deep supervision; "
                          "default) or light (flips, intensity scale/shift, no deep supervision: the recipe before "
                          "issue 10). The same for every network; --set changes single keys")
    accuracy.add_argument("--bar", default="monai_segresnet",
                          help="the network to beat by 0.005 mean Dice (default monai_segresnet); compared like "
                          "the baseline")
    accuracy.add_argument("--compare", type=Path, metavar="OUT2",
                          help="another bench folder (e.g. the other protocol's): report how alike the two order "
                          "the networks they share (Kendall's tau, Spearman's rho)")
    accuracy.add_argument("--epochs", type=positive_int, help="epochs (default 20; --quick 2)")
    accuracy.add_argument("--epoch-length", type=positive_int, help="iterations per epoch (default 200; --quick 4)")
    accuracy.add_argument("--accuracy-networks", nargs="+",
                          help="networks to train (default: medunet.bench.accuracy.ACCURACY_NETWORKS; --quick: "
                          "those profiled; 'profiled' for those profiled); --baseline is added if missing")
    accuracy.add_argument("--jobs", type=positive_int, default=1,
                          help="trainings at once, each in its own process with its share of the CPU cores, the last ones "
                               "taking the cores the finished ones leave (default 1; e.g. 6 on one GPU)")
    accuracy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="change a recipe key for every network, VALUE as JSON (e.g. --set patch_size=[32,32,32])")
    deploy = parser.add_argument_group(
        "deploy", "whole-volume CPU inference instead (medunet.bench.deploy): a 512x512x200 CT volume and the real "
        "spleen case, MONAI UNet under torch against lunet_small_16f_unshuffle under torch, ONNX fp32 and int8, "
        "wall time and peak memory per case in fresh processes; with --deploy-run also the Hippocampus validation "
        "cases of that run (time, Dice of fp32 and int8)")
    deploy.add_argument("--deploy", action="store_true", help="run the deployment benchmark into OUT/deploy.md")
    deploy.add_argument("--deploy-run", type=Path, help="a trained Task04 run folder for the Hippocampus part")
    deploy.add_argument("--deploy-threads", type=positive_int, nargs="+", default=[1, 2],
                        help="thread counts to measure (default 1 2)")
    add_tracking_arguments(parser)
    parser.set_defaults(func=run)


def _volume(text: str | None, quick: bool) -> tuple[int, int, int] | None:
    from medunet.bench.efficiency import FULL_VOLUME, QUICK_VOLUME

    if text is None:
        return QUICK_VOLUME if quick else FULL_VOLUME
    if text.lower() == "none":
        return None
    return tuple(int(v) for v in text.lower().split("x"))  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    if args.deploy:
        from medunet.bench.deploy import run_deploy_bench

        print(f"wrote {run_deploy_bench(args.out, args.deploy_run, args.deploy_threads)}")
        return 0
    from medunet.bench.efficiency import (
        BENCH_NETWORKS,
        FULL_SHAPES,
        QUICK_NETWORKS,
        QUICK_SHAPES,
        run_efficiency,
    )
    from medunet.bench.results import efficiency_tables, provenance_line, write_csv
    from medunet.cli.common import tracker_from_args
    from medunet.networks import get_preset, list_networks

    networks = list(dict.fromkeys(args.networks or (QUICK_NETWORKS if args.quick else BENCH_NETWORKS)))
    if networks == ["all"]:
        networks = list_networks()
    if args.baseline not in networks:
        networks.insert(0, args.baseline)
    for name in networks:
        get_preset(name)  # fail fast on a misspelt name
    shapes = args.shapes or list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    accuracy = _accuracy_setup(args, networks) if args.accuracy else None
    args.out.mkdir(parents=True, exist_ok=True)
    command = _command_line(args)
    with tracker_from_args(args, args.out, tags={"kind": "bench"}, device=args.device) as tracker:
        tracker.log_params({"networks": networks, "shapes": shapes, "baseline": args.baseline, "quick": args.quick})
        if accuracy is not None:
            tracker.log_params({"accuracy": {key: value for key, value in accuracy.items() if key != "recipe"},
                                "recipe": accuracy["recipe"]})
        results = run_efficiency(
            networks, shapes, device=args.device, memory=True, train=not args.no_train, repeats=args.repeats,
            volume=_volume(args.volume, args.quick), repeats_memory=args.repeats_memory,
        )
        written = [
            write_csv([r.as_dict() for r in results], args.out / "efficiency.csv"),
            args.out / "efficiency.md",
            args.out / "efficiency.json",
        ]
        tables = efficiency_tables(results, args.baseline)
        report = f"# medunet bench\n\n{provenance_line()}\n\nRatios are to `{args.baseline}`, measured in the same run.\n\n{tables}\n"
        (args.out / "efficiency.md").write_text(report, encoding="utf-8")
        (args.out / "efficiency.json").write_text(json.dumps([r.as_dict() for r in results], indent=2, default=str), encoding="utf-8")
        for result in results:
            shape = "x".join(map(str, result.profile.input_shape))
            tracker.log_results(result.profile, prefix=f"{result.profile.name}.{shape}")

        rows = plot = folds = None
        if accuracy is not None:
            rows, plot, accuracy_files, folds = _run_accuracy_half(args, accuracy, results, tracker)
            written += accuracy_files
            report += "\n" + (args.out / "accuracy.md").read_text(encoding="utf-8")
        if args.results is not None:
            written += _write_results(args, command, results, rows, accuracy, plot, folds)
        for path in written:
            tracker.log_artifact(path, "bench")
    print(report)
    print("written: " + ", ".join(str(path) for path in written))
    print(tracker.describe())
    return 0


def _accuracy_setup(args: argparse.Namespace, networks: list[str]) -> dict[str, Any]:
    """The accuracy half's settings, checked before the efficiency half runs (a typo fails now, not later)."""
    from medunet.bench.accuracy import ACCURACY_NETWORKS, recipe_with
    from medunet.engines.config import parse_settings, workflow_for_task
    from medunet.errors import MedunetError
    from medunet.networks import get_preset
    from medunet.paths import shared_data_dir

    task_dir = (args.task_dir or shared_data_dir() / "Task04_Hippocampus").resolve()
    if not (task_dir / "dataset.json").is_file():
        raise MedunetError(f"--accuracy needs an MSD task folder; {task_dir} has no dataset.json. Fix: pass "
                           "--task-dir, or put Task04_Hippocampus in ../shared/data (or $MEDUNET_SHARED_DATA).")
    workflow = args.workflow or workflow_for_task(task_dir)
    if not Path(workflow).is_file():
        raise MedunetError(f"workflow {workflow} does not exist. Fix: pass --workflow medunet/workflows/<task>.json.")
    if args.accuracy_networks == ["profiled"] or (args.accuracy_networks is None and (args.quick or args.networks)):
        trained = list(networks)
    else:
        trained = list(dict.fromkeys(args.accuracy_networks or ACCURACY_NETWORKS))
    if args.baseline not in trained:
        trained.insert(0, args.baseline)
        print(f"bench accuracy: {args.baseline} is trained too, or read back where OUT has its runs (the differences "
              "are to --baseline; name one of the trained networks there to train nothing more)", flush=True)
    for name in trained:
        get_preset(name)
    recipe = recipe_with(parse_settings(args.set), quick=args.quick, epochs=args.epochs,
                         epoch_length=args.epoch_length, protocol=args.protocol, recipe=args.recipe)
    if args.compare is not None and not (args.compare / "accuracy.csv").is_file():
        raise MedunetError(f"--compare {args.compare}: no accuracy.csv there. Fix: pass the --out folder of a "
                           "finished 'medunet bench --accuracy' run.")
    folds = list(dict.fromkeys(args.folds)) if args.folds else None
    return {"networks": trained, "task_dir": str(task_dir), "workflow": str(workflow), "fold": args.fold,
            "folds": folds, "protocol": args.protocol, "recipe": recipe}


def _run_accuracy_half(
    args: argparse.Namespace, accuracy: dict[str, Any], results: list[Any], tracker: Any
) -> tuple[list[dict[str, Any]], Path | None, list[Path], dict[str, Any] | None]:
    """Train and score each network; write accuracy.csv, accuracy.md and pareto.png (with --folds also
    accuracy_folds.csv, the mean +- SD per network); log the Dice values."""
    from medunet.bench.accuracy import run_accuracy
    from medunet.bench.results import (
        accuracy_table,
        lost_class_note,
        pareto_plot,
        plot_shape,
        provenance_line,
        write_csv,
    )

    rows = run_accuracy(
        accuracy["networks"], accuracy["task_dir"], accuracy["workflow"], accuracy["fold"], args.out,
        recipe=accuracy["recipe"], tracking=not args.no_tracking, tracking_uri=args.tracking_uri,
        experiment=args.experiment, jobs=args.jobs, folds=accuracy["folds"],
    )
    files = [write_csv(rows, args.out / "accuracy.csv")]
    folds = _cross_validation(args, accuracy, rows) if accuracy["folds"] else None
    if folds is None:
        table = "\n\n".join(part for part in (f"Differences are to `{args.baseline}`.",
                                               accuracy_table(rows, args.baseline), lost_class_note(rows)) if part)
        points = rows
    else:
        files.append(write_csv([{k: v for k, v in entry.items() if k not in ("per_fold", "lost")} for entry in folds["summary"]],
                               args.out / "accuracy_folds.csv"))
        table = folds["markdown"]
        points = folds["summary"]
    (args.out / "accuracy.md").write_text(
        f"# medunet bench: accuracy\n\n{provenance_line()}\n\n{_setup_line(accuracy)}\n\n{table}\n", encoding="utf-8"
    )
    files.append(args.out / "accuracy.md")
    plot = pareto_plot(results, points, plot_shape(results), args.out / "pareto.png") if results else None
    if plot is not None:
        files.append(plot)
    for row in (rows if folds is None else folds["summary"]):
        tracker.log_metrics({f"{row['network']}.{key}": value for key, value in row.items()
                             if key in ("mean_dice", "mean_dice_sd", "best_mean_dice", "train_seconds")
                             or key.startswith("dice_")})
    return rows, plot, files, folds


def _cross_validation(args: argparse.Namespace, accuracy: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- SD per network, the comparisons with the baseline and the bar, and with --compare the rank
    agreement with the other folder's networks."""
    import csv

    from medunet.bench.accuracy import compare_networks, fold_summary, rank_agreement
    from medunet.bench.results import (
        comparison_sentences,
        cross_validation_table,
        lost_class_note,
        rank_agreement_section,
    )

    summary = fold_summary(rows)
    comparisons = compare_networks(summary, list(dict.fromkeys([args.baseline, args.bar])))
    folds: dict[str, Any] = {"summary": summary, "comparisons": comparisons, "bar": args.bar}
    parts = [f"Mean ± SD over folds; the bracket is the mean paired difference to `{args.baseline}`.",
             cross_validation_table(summary, args.baseline), lost_class_note(rows), comparison_sentences(comparisons, args.bar)]
    parts = [part for part in parts if part]
    if args.compare is not None:
        other: dict[str, list[float]] = {}
        source = args.compare / "accuracy.csv"
        with source.open(encoding="utf-8") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                other.setdefault(row.get("network") or "", []).append(_dice_cell(row.get("mean_dice"), source, line))
        means = {name: sum(values) / len(values) for name, values in other.items()}
        agreement = rank_agreement({entry["network"]: entry["mean_dice"] for entry in summary}, means)
        folds.update(agreement=agreement, protocols=(f"this run ({accuracy['protocol']} protocol)", str(args.compare)))
        parts.append(rank_agreement_section(agreement, *folds["protocols"]))
    folds["markdown"] = "\n\n".join(parts)
    return folds


def _dice_cell(text: str | None, source: Path, line: int) -> float:
    """A mean Dice read from another bench's ``accuracy.csv``: a number in [0, 1], else ``MedunetError``."""
    from medunet.errors import MedunetError

    try:
        value = float(text or "")
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise MedunetError(f"{source}, line {line}: mean_dice is {str(text)[:40]!r}, not a Dice in [0, 1]. Fix: "
                           "rerun that bench (or pass the --out folder it wrote).")
    return value


def _setup_line(accuracy: dict[str, Any]) -> str:
    from medunet.paths import portable_path

    recipe = accuracy["recipe"]
    folds = accuracy.get("folds")
    where = (f"folds {', '.join(map(str, folds))}" if folds else f"fold {accuracy['fold']}")
    task, workflow = portable_path(accuracy["task_dir"]), portable_path(accuracy["workflow"])
    return (f"Trained on {where} of `{task}` with `{workflow}` "
            f"({accuracy.get('protocol', 'gpu')} protocol), {recipe['max_epochs']} epochs x {recipe['epoch_length']} "
            f"iterations, augmentation `{recipe.get('augment', 'light')}`, up to {recipe.get('deep_supervision', 0)} "
            "deep-supervision heads (as many as the network's decoder has levels above the finest; the `DS heads` "
            "column), scored on each fold's validation cases (Dice of the last epoch).")


def _write_results(
    args: argparse.Namespace, command: str, results: list[Any], rows: list[dict[str, Any]] | None,
    accuracy: dict[str, Any] | None, plot: Path | None, folds: dict[str, Any] | None = None,
) -> list[Path]:
    """``--results FILE``: the results markdown, with the Pareto plot copied beside it as ``<FILE stem>_pareto.png``
    (so results files in one folder, e.g. RESULTS.md and RESULTS_cpu.md, keep their own plots)."""
    from medunet.bench.results import results_report

    path: Path = args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path]
    embedded = None
    if plot is not None:
        beside = path.parent / f"{path.stem}_{plot.name}"
        if beside.resolve() != plot.resolve():
            shutil.copyfile(plot, beside)
            written.append(beside)
        embedded = beside.name
    path.write_text(results_report(
        command, args.baseline, results, rows, recipe=accuracy["recipe"] if accuracy else None,
        setup=_setup_line(accuracy) if accuracy else "", plot=embedded, folds=folds,
    ), encoding="utf-8")
    return written


def _command_line(args: argparse.Namespace) -> str:
    """The ``medunet bench`` command that repeats this run (every option that differs from its default)."""
    words = ["medunet", "bench"]
    flags = [("--quick", args.quick), ("--no-train", args.no_train), ("--accuracy", args.accuracy),
             ("--no-tracking", args.no_tracking)]
    values = [("--networks", args.networks), ("--shapes", args.shapes),
              ("--baseline", None if args.baseline == "monai_unet_spleen" else args.baseline),
              ("--device", None if args.device == "cpu" else args.device), ("--volume", args.volume),
              ("--repeats", None if args.repeats == 3 else args.repeats),
              ("--repeats-memory", None if args.repeats_memory == 1 else args.repeats_memory), ("--out", args.out),
              ("--task-dir", args.task_dir), ("--workflow", args.workflow),
              ("--fold", args.fold or None), ("--folds", args.folds),
              ("--protocol", None if args.protocol == "gpu" else args.protocol),
              ("--recipe", None if args.recipe == "nnunet" else args.recipe),
              ("--bar", None if args.bar == "monai_segresnet" else args.bar), ("--compare", args.compare),
              ("--epochs", args.epochs), ("--epoch-length", args.epoch_length),
              ("--accuracy-networks", args.accuracy_networks),
              ("--jobs", None if args.jobs == 1 else args.jobs), ("--results", args.results),
              ("--tracking-uri", args.tracking_uri),
              ("--experiment", None if args.experiment == "medunet" else args.experiment)]
    words += [flag for flag, on in flags if on]
    for option, value in values:
        if value is not None:
            words += [option, *map(str, value if isinstance(value, list) else [value])]
    for pair in args.set:
        words += ["--set", pair]
    return shlex.join(words)
