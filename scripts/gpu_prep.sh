#!/usr/bin/env bash
# Prepare, on this machine, what scripts/gpu_run.sh needs on the device and cannot fetch there:
# ../shared/tools/device-prep.sh (Python 3.12 wheels of faiss-cpu, lightgbm, albumentations,
# pytorch-metric-learning and their needs into .device/wheels; the competition archive into
# .device/data), plus the public truth file (scoring only) into .device/data. The albumentations
# wheels are dropped unless KEEP_ALBUMENTATIONS is set (see below). Then checks that
# what travels (tracked + untracked-not-ignored files + .device) stays under the 64 MiB limit.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
prep=${DEVICE_PREP:-../shared/tools/device-prep.sh}
bash "$prep"
cp -u ../shared/data/cifar10-2shot/public_truth.csv .device/data/
# albumentations is the CPU augmentation path (src/augment.py cpu_pipeline); the GPU recipes augment on
# the GPU (ssl.gpu_augment: gpu), so its family stays behind: 7.8 MiB of the 64 a call may carry.
if [[ -z ${KEEP_ALBUMENTATIONS:-} ]]; then
  for w in albumentations albucore stringzilla simsimd pydantic pydantic_core annotated_types typing_inspection; do
    rm -f .device/wheels/"$w"-*.whl
  done
fi
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carry_bytes=$(du -sb .device | cut -f1)
total=$(( tree_bytes + carry_bytes ))
echo "gpu_prep: working tree $(( tree_bytes / 1048576 )) MiB + .device $(( carry_bytes / 1048576 )) MiB = $(( total / 1048576 )) MiB (limit 64)"
(( total < 64 * 1048576 )) || { echo "gpu_prep: over the 64 MiB a call may carry"; exit 1; }
echo 'gpu_prep: now run(command="bash scripts/gpu_run.sh", carry=[".device"], timeout_s=600)'
