#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before tools/gpu_check.sh: packs what the offline GPU machine
# lacks into git-ignored folders, each small enough for one device call (64 MiB).
#   .dev/dali1 .dev/dali2 .dev/dali3   DALI 2.4.0 for Python 3.12 (../shared/device/pack-dali.sh)
#   .dev/gpu-extra/imagenet-sample     real sample photographs for the checks
# The GPU machine's own Python already has pytest, PyYAML, tqdm and TensorBoard (device KINDS.md);
# webdataset is needed by no code that the check runs.
# Then, in three back-to-back device calls (see docs/PERFORMANCE.md):
#   carry .dev/dali1: mkdir -p /tmp/dv && cp .dev/dali1/* /tmp/dv/
#   carry .dev/dali2: cp .dev/dali2/* /tmp/dv/
#   carry .dev/dali3 and .dev/gpu-extra: cp .dev/dali3/* /tmp/dv/ && BUDGET_S=585 bash tools/gpu_check.sh
#   (timeout_s 600: the first call starts the machine, 30-70 s of the session's 15 minutes of
#   device time; on 2026-11-27 the script took 400 s, 507 s, 496 s, 542 s, 371 s and 490 s, and step 5b
#   (fifteenth session) adds about 45 s, steps 3c and 4s (sixteenth) up to 45 s and 90 s more; the budget cuts
#   the last steps, 4s and 4r (ResNet-50 from JPEGs, measured five times), if it must: BUDGET_S=585 gives them
#   the most room that timeout_s 600 allows)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
photos=${PHOTOS:-150}  # with .dev/dali3 (38 MiB) this keeps the third call under 64 MiB
[[ -d .dev/dali1 ]] || bash ../shared/device/pack-dali.sh
rm -rf .dev/gpu-extra && mkdir -p .dev/gpu-extra/imagenet-sample
ls ../shared/data/imagenet-sample/*.JPEG | head -n "$photos" | while read -r f; do cp "$f" .dev/gpu-extra/imagenet-sample/; done
du -sh .dev/dali1 .dev/dali2 .dev/dali3 .dev/gpu-extra
