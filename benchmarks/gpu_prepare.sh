#!/usr/bin/env bash
# Fills .devcarry/ (git-ignored) with what benchmarks/gpu_session.sh needs on a lent GPU machine, which has PyTorch
# (Python 3.12) but neither MONAI, ignite nor nibabel, and no network: their wheels, the Hippocampus task and the
# commit's name. Run it here, on the development machine, then hand .devcarry to the device call:
#
#   bash benchmarks/gpu_prepare.sh
#   # device tool: run  command="bash benchmarks/gpu_session.sh accuracy"  carry=[".devcarry"]
#
# It takes the versions installed in this environment, so both machines run the same MONAI. About 21 MiB in all
# (the device call carries at most 64 MiB: the runs.tgz parts an accuracy call sends back go into .devcarry too).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${MEDUNET_SHARED_DATA:-../shared/data}/Task04_Hippocampus
[ -f "$data/dataset.json" ] || { echo "gpu_prepare: no $data/dataset.json; put the MSD task there" >&2; exit 2; }
mkdir -p .devcarry/whl .devcarry/data
read -r monai ignite nibabel < <(python3 -c \
    "import monai, ignite, nibabel; print(monai.__version__, ignite.__version__, nibabel.__version__)")
rm -f .devcarry/whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --platform any \
    -d .devcarry/whl "monai==$monai" "pytorch-ignite==$ignite" "nibabel==$nibabel"
rm -rf .devcarry/data/Task04_Hippocampus
cp -r "$data" .devcarry/data/
git rev-parse HEAD >.devcarry/COMMIT
du -sh .devcarry
