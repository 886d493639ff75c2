#!/usr/bin/env bash
# The GPU half of the benchmark, as run on a lent GPU machine that has PyTorch but no MONAI and no network.
#
#   bash benchmarks/gpu_session.sh smoke      # installs, GPU efficiency table, 1-epoch timing of every network
#   bash benchmarks/gpu_session.sh accuracy   # the accuracy half: the full recipe (medunet.bench.accuracy.RECIPE,
#                                             # --protocol gpu) on folds 0 1 2, 8 trainings at a time
#   bash benchmarks/gpu_session.sh recipe-effect   # the MONAI UNet and SegResNet with the recipe before issue 10
#                                             # (augment light, no deep supervision) on the same folds
#   bash benchmarks/gpu_session.sh efficiency NET...   # the GPU efficiency table of some networks
#
# Each accuracy mode resumes: rerun it (with the runs.tgz parts of the last call in .devcarry/) until it prints the
# tables; FOLDS="0 1 2 3 4" for five folds. A 15-minute device budget holds about one call: NETWORKS="monai_segresnet
# lunet_small_16f_unshuffle_wide_subpixel lunet_16f_4level_unshuffle_subpixel_in lunet_16f_4level_unshuffle_subpixel_in_res
# lunet_16f_4level_unshuffle_subpixel_deep_in_res" JOBS=18 trains six networks the CPU protocol has on folds 0 1 2
# (issue 10's comparison: the corner candidates, and their rank agreement with the full recipe) at once (any registry
# names; the MONAI UNet is always trained too, as the bench's baseline).
# .devcarry/ is filled by `bash benchmarks/gpu_prepare.sh`; the device call names it in its carry.
# Afterwards, on the CPU machine (efficiency half, median of 3 memory runs):
#   medunet bench --accuracy --folds 0 1 2 --out benchmarks/recipe_gpu --results benchmarks/RESULTS.md --repeats-memory 3
#
# Wheels for what the machine lacks (monai, pytorch-ignite, nibabel) and the Hippocampus task are expected in
# .devcarry/ (git-ignored). The script runs from wherever the checkout is; the data is put at ../shared/data beside
# it, as on the development machine. Run folders record paths relative to the repository, so the finished ones
# are reused there as they are: `medunet bench --accuracy ...` on the CPU then measures the efficiency half and
# reads the trainings back.
# Tracking is off here (no MLflow on that machine); the bench run that reads the results back logs them.
set -euo pipefail
mode=${1:?usage: gpu_session.sh smoke|accuracy|efficiency NETWORK...}
out=${OUT:-/tmp/out}
mkdir -p "$out"

python3 -c "import monai" 2>/dev/null || {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl
    export PYTHONPATH=/tmp/site
}
cd "$(dirname "$0")/.."  # the checkout, wherever it is
# The data goes where it sits beside the checkout on the development machine (../shared/data), so the run
# records (paths relative to the repository) read the same on both machines and the run folders are reused.
[ -f ../shared/data/Task04_Hippocampus/dataset.json ] || {
    mkdir -p ../shared/data && cp -r .devcarry/data/Task04_Hippocampus ../shared/data/
}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
# The tree arrives without .git: name the commit for the results files (git rev-parse HEAD >.devcarry/COMMIT).
MEDUNET_COMMIT=$(cat .devcarry/COMMIT 2>/dev/null || echo unknown)
export MEDUNET_COMMIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name(0))"

# The accuracy set (medunet.bench.accuracy.ACCURACY_NETWORKS) and the MONAI baselines.
ACCURACY_NETWORKS=$(python3 -c "from medunet.bench.accuracy import ACCURACY_NETWORKS; print(*ACCURACY_NETWORKS)")
BASELINES="monai_unet_spleen monai_checkpoint_unet_spleen monai_basicunet monai_segresnet monai_dynunet_nnunet"
FOLDS=${FOLDS:-0 1 2}
# The runs of the recipe before issue 10 stay in benchmarks/latest; the stronger recipe's go here.
RECIPE_OUT=benchmarks/recipe_gpu
LIGHT_OUT=benchmarks/recipe_light

case $mode in
efficiency)  # the GPU efficiency table for the networks named after the mode
    python3 -m medunet bench --device cuda --no-tracking --networks "${@:2}" --shapes 1x1x128x128x128 \
        --out benchmarks/gpu 2>&1 | tee "$out/efficiency.log"
    cp benchmarks/gpu/efficiency.md benchmarks/gpu/efficiency.csv "$out/"
    ;;
smoke)
    # shellcheck disable=SC2086
    python3 -m medunet bench --device cuda --no-tracking --networks $BASELINES $ACCURACY_NETWORKS \
        --shapes 1x1x128x128x128 --out benchmarks/gpu 2>&1 | tee "$out/efficiency.log"
    cp benchmarks/gpu/efficiency.md benchmarks/gpu/efficiency.csv "$out/"
    # shellcheck disable=SC2086
    python3 -m medunet bench --device cuda --no-tracking --networks monai_unet_spleen --shapes 1x1x32x32x32 \
        --volume none --no-train --repeats 1 --out benchmarks/gpu_smoke --accuracy --accuracy-networks $ACCURACY_NETWORKS \
        --epochs 1 --epoch-length 50 --jobs 8 2>&1 | tee "$out/smoke.log"
    tar czf "$out/smoke_runs.tgz" --exclude='*.pt' benchmarks/gpu_smoke
    ;;
accuracy|recipe-effect)
    if [ "$mode" = accuracy ]; then
        bench_out=$RECIPE_OUT; networks=${NETWORKS:-$ACCURACY_NETWORKS}; recipe=()
    else
        bench_out=$LIGHT_OUT; networks="monai_unet_spleen monai_segresnet"
        recipe=(--recipe light)
    fi
    # Runs unfinished in an earlier call come back as .devcarry/runs.tgz.part* and resume from their checkpoints.
    if ls .devcarry/runs.tgz.part* >/dev/null 2>&1; then cat .devcarry/runs.tgz.part* | tar xzf -; fi
    # The call has a time limit: stop in time to send back what finished and the checkpoints of the rest.
    # Two loader workers per training: nnU-Net's augmentation runs on the CPU (16 cores for 8 trainings).
    # shellcheck disable=SC2086
    timeout "${BENCH_SECONDS:-500}" python3 -m medunet bench --device cuda --no-tracking --networks monai_unet_spleen \
        --shapes 1x1x32x32x32 --volume none --no-train --repeats 1 --out "$bench_out" --accuracy --protocol gpu \
        --folds $FOLDS --accuracy-networks $networks --jobs "${JOBS:-8}" --set num_workers=2 "${recipe[@]}" "${@:2}" 2>&1 \
        | tee "$out/accuracy.log" || true
    for run in "$bench_out"/runs/fold*/*/; do  # finished runs need no checkpoint to be read back
        if grep -q '"finished": true' "$run/metrics.json" 2>/dev/null; then rm -rf "$run/checkpoints" "$run/models"; fi
    done
    tar czf - --exclude='*.db' "$bench_out"/runs | split -b 15M - "$out/runs.tgz.part"
    ;;
esac
