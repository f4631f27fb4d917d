#!/usr/bin/env bash
# The GPU check (issue 5), run ON the GPU machine from the repository root, after the DALI parts are
# in /tmp/dv and .dev/gpu-extra has been carried (tools/gpu_prepare.sh says how). One script, so the
# whole check costs one device call. Four files come back in $OUT (a device call returns at most 8):
# gpu_check.log (everything printed), report.md (the tables for docs/PERFORMANCE.md, from
# tools.gpu_report), results.tgz (the benchmarks' JSON files and the training run's logs) and
# diagnostics.tgz (nvidia-smi dmon: power, SM clock, GPU and JPEG-decoder utilisation each second,
# over steps 3 to 4q).
#   SECONDS_PER_RATE (default 6), COPIES (default 200), BATCH (default 256): benchmark length,
#   bench-shard size and batch (small values make a quick dry run on a CPU machine).
#   BUDGET_S (default 540): seconds for the whole script; a step that would outlast it is cut short
#   or skipped, so the report comes back before the device call's own limit.
# Device time is short and a hang would lose everything after it, so each step has its own time
# limit and a failed step does not stop the next. The steps that measure the targets run first;
# only dali-gpu at hw_decoder_load 1.0 (the training default, best in the 2026-11-26 run) is measured.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
results=/tmp/gc/results  # JSON files, packed into $OUT/results.tgz at the end
rm -rf /tmp/gc && mkdir -p "$OUT" /tmp/site "$results" /tmp/gc/diagnostics
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
seconds=${SECONDS_PER_RATE:-6}
copies=${COPIES:-200}  # 30,000 train samples: an epoch of dali-gpu lasts seconds, not a fraction of one
batch=${BATCH:-256}
workers=$(nproc)
if [[ -d /tmp/dv ]] && [[ ! -d /tmp/site/nvidia/dali ]]; then cat /tmp/dv/part* | xz -d -T8 | tar x -C /tmp/site; fi
export PYTHONPATH=/tmp/site:$PWD
export IMAGENET_SAMPLE_DIR=$PWD/.dev/gpu-extra/imagenet-sample
step() { echo; echo "=== $* ($(date +%T))"; }
budget=${BUDGET_S:-540}
limit() {  # limit SECONDS COMMAND...: at most SECONDS, and never past the script's budget
  local want=$1 left=$((budget - SECONDS - 15))
  shift
  if ((left < 10)); then echo "!!! skipped, the script's budget is spent: $*"; return; fi
  timeout -k 5 $((want < left ? want : left)) "$@" || echo "!!! exit $? (timeout 124/137): $*"
}

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python - <<'PY'
import importlib, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU VISIBLE"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
for name in ("nvidia.dali", "torchvision", "webdataset", "yaml", "tqdm", "pytest", "tensorboard"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "ok"))
    except ImportError as err:
        print(name, "MISSING", err)
PY
tensorboard_ok=$(python -c "import tensorboard" 2>/dev/null && echo true || echo false)

step "1. convert real photographs, verify with --decode"
python - <<'PY'
from tools.make_demo_data import link_sample_tree
link_sample_tree("/tmp/gc/src", copies=1)
PY
limit 120 python -m tools.make_shards --train /tmp/gc/src/train --val /tmp/gc/src/train --out /tmp/gc/shards \
  --workers "$workers" --shard-size-mb 4 --no-progress
limit 120 python -m tools.verify_shards /tmp/gc/shards --decode

step "bench shards: each photograph linked $copies times; train alone at short side <= 256 as raw pixels"
python - <<PY
from tools.make_demo_data import link_sample_tree
link_sample_tree("/tmp/gc/bench-src", copies=$copies)
PY
limit 180 python -m tools.make_shards --train /tmp/gc/bench-src/train --val /tmp/gc/bench-src/train \
  --out /tmp/gc/bench-shards --workers "$workers" --no-progress | head -3
limit 180 python -m tools.make_shards --train /tmp/gc/bench-src/train --out /tmp/gc/raw-shards \
  --train-max-short-side 256 --train-raw-pixels --workers "$workers" --no-progress | head -3

step "3. pipeline throughput, batch $batch (power, clocks, GPU and JPEG-decoder utilisation each second in dmon.log, steps 3-4q)"
# Power and clocks: does the SM clock drop (power cap) while the JPEG decoder and the model run together?
nvidia-smi dmon -s puc -d 1 >/tmp/gc/diagnostics/dmon.log 2>&1 &
dmon=$!
limit 150 python -m tools.bench_pipeline --shards /tmp/gc/bench-shards --backends dali-gpu,torch \
  --batch-size "$batch" --seconds "$seconds" --workers "$workers" --json "$results/bench_pipeline.json"

step "3r. the raw DALI rate on the same shards: DALI's own reader and random-crop decoder (BASELINES.md's pipeline)"
limit 45 python -m tools.bench_dali_reference --shards /tmp/gc/bench-shards --batch-size "$batch" --seconds "$seconds" \
  --workers 8 --json "$results/bench_dali_reference.json"

step "3s. dali-gpu and torch-uint8 alone on the train images stored as raw pixels at short side <= 256"
# 2026-11-27: dali-gpu 38,216 (eleventh session), 50,959 (fourteenth) and 45,393 (fifteenth) images/s. torch-uint8
# 17,751 (fourteenth session, 6.2 of 16 worker cores busy: each batch crossed to the main process in a new
# shared-memory segment, copied into pinned memory by one thread), 28,571 with its pinned ring of batch
# buffers (fifteenth session, 32,031 within epochs, 13.7 worker cores).
# (On the JPEG images at <= 256, eleventh session: dali-gpu 19,894, dali-cpu 4,640 with the host's 16 cores.)
limit 70 python -m tools.bench_pipeline --shards /tmp/gc/raw-shards --backends dali-gpu,torch-uint8 --splits train \
  --batch-size "$batch" --seconds "$seconds" --workers "$workers" --json "$results/bench_pipeline_raw.json"

step "3c. torch-uint8's workers from a cold page cache (the raw-pixel tars evicted first) against a warm one"
# ImageNet's train split as raw pixels is about 335 GB: a node's page cache may not hold it. Does this disk keep
# up? 40 batches (about 2.7 GB) per pass. CPU machine (virtio disk, 2 workers, batch 128): cold 0.36-0.65 of warm.
limit 45 python -m tools.bench_cold_read --shards /tmp/gc/raw-shards --workers "$workers" --batch-size "$batch" \
  --steps 40 --passes 2 --json "$results/bench_cold_read.json"

step "4. ResNet-18 compiled fed by dali-gpu and by BASELINES.md's plain DALI pipeline, vs synthetic, in one process"
# 2026-11-27: dali-gpu 0.663 and 0.546, the plain pipeline 0.672 and 0.704 (tenth, eleventh sessions): the
# gap is DALI's decoding beside the model, whose per-image kernels queued 0.3-0.6 ms each behind the
# model's in the tenth session's profiles (not repeated here: bench_train --profile DIR).
limit 120 python -m tools.bench_train --shards /tmp/gc/bench-shards --model resnet18 --compile \
  --backends dali-gpu,dali-reference --batch-size "$batch" --seconds "$seconds" \
  --workers "$workers" --json "$results/bench_train_rn18c.json"

step "4p. the same fed from the train images stored as raw pixels (make_shards --train-raw-pixels)"
# 2026-11-27, compiled ResNet-18 (each figure one 6-s measurement): dali-gpu 0.721 (eleventh session), 0.928
# (fourteenth: first in line, the model compiled in its warm-up; synthetic runs first now), 0.830 and 0.857
# (fourteenth, a second machine); in probes 0.83-0.96. dali-predecoded (512 images held decoded in memory,
# the same graph) 0.869-0.958. torch-uint8 0.772 and 0.613 with its old hand-over (see 3s); with its ring 0.900
# and 0.899 (0.969 within epochs, 0.146 s per epoch switch), and since its workers go on into the next epoch
# 0.965 and 0.966 (fifteenth session, two machines). Each backend runs twice: one measurement per backend did
# not tell them apart across machines. The fifteenth session's machine gave dali-gpu 0.768 and 0.773.
limit 150 python -m tools.bench_train --shards /tmp/gc/raw-shards --model resnet18 --compile \
  --backends dali-gpu,torch-uint8,dali-predecoded,dali-gpu,torch-uint8 --batch-size "$batch" --seconds "$seconds" \
  --workers "$workers" --json "$results/bench_train_rn18c_raw.json"

step "4q. ResNet-50 fed by dali-gpu and torch-uint8 from the raw-pixel train images (fourteenth session: 0.994, 0.996; fifteenth: 0.993, 0.994)"
limit 110 python -m tools.bench_train --shards /tmp/gc/raw-shards --model resnet50 \
  --backends dali-gpu,torch-uint8 --batch-size "$batch" --seconds "$seconds" --workers "$workers" \
  --json "$results/bench_train_rn50_raw.json"
kill "$dmon" 2>/dev/null
tar czf "$OUT/diagnostics.tgz" -C /tmp/gc diagnostics

step "2. GPU-marked tests"
limit 240 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider  # 15 tests, 8 of them not yet run on a GPU

step "5. short real training run under torchrun (python -m torch.distributed.run), dali-gpu, BlurPool, eval flips, EMA, repeated augmentation, timed checkpoints, gradient norms, a profile of steps 4-6"
limit 150 python -m torch.distributed.run --standalone --nproc-per-node 1 -m train --config configs/demo.yaml data.shards=/tmp/gc/shards \
  data.backend=dali-gpu data.workers="$workers" data.batch_size=64 resolution.min=128 resolution.max=128 \
  resolution.val=128 train.epochs=2 eval.every=1 log.every=2 log.tensorboard="$tensorboard_ok" run.dir=/tmp/gc/run \
  model.blurpool=true eval.flip=true optim.ema_decay=0.99 data.aug_repeats=2 checkpoint.every_minutes=0.01 \
  log.grad_norm=true log.profile_steps=3 log.profile_start=4
head -n 20 /tmp/gc/run/profile/rank0-steps-4-6.txt  # not run on a GPU before (added the twenty-eighth session)
limit 90 python -m train.evaluate --checkpoint /tmp/gc/run/last.pt --shards /tmp/gc/shards --workers "$workers"
limit 90 python -m train.evaluate --checkpoint /tmp/gc/run/last.pt --shards /tmp/gc/shards --workers "$workers" --ema
ls -la /tmp/gc/run

step "5b. the same from raw-pixel train shards: torch-uint8 for train, dali-gpu for the JPEG val split"
limit 60 python -m tools.make_shards --train /tmp/gc/src/train --val /tmp/gc/src/train --out /tmp/gc/shards-raw \
  --train-max-short-side 256 --train-raw-pixels --workers "$workers" --no-progress | head -3
limit 150 python -m torch.distributed.run --standalone --nproc-per-node 1 -m train --config configs/demo.yaml \
  data.shards=/tmp/gc/shards-raw data.backend=torch-uint8 data.val_backend=dali-gpu data.workers="$workers" \
  data.batch_size=64 resolution.min=128 resolution.max=128 resolution.val=128 train.epochs=2 eval.every=1 log.every=2 \
  log.tensorboard="$tensorboard_ok" run.dir=/tmp/gc/run-raw

step "4s. configs/resnet18.yaml's model (compiled, BlurPool) at 160 px, the size it trains most epochs at, from raw pixels"
# Not measured before. A torch-uint8 worker makes only about 1.1x as many images at 160 px as at 224 (CPU machine,
# sixteenth session) while the model steps faster: does a 16-core host still feed one GPU? BlurPool (on in the
# recipe since the eighteenth session) slows the step by an unmeasured amount. (synthetic at 160 px too)
limit 100 python -m tools.bench_train --shards /tmp/gc/raw-shards --model resnet18 --blurpool --compile \
  --backends torch-uint8,dali-gpu --batch-size "$batch" --image-size 160 --seconds "$seconds" --workers "$workers" \
  --json "$results/bench_train_rn18c_raw160.json"

step "4b. BlurPool's step cost: the same model without it, synthetic data only (compare 4s's synthetic row)"
limit 60 python -m tools.bench_train --shards /tmp/gc/raw-shards --model resnet18 --compile --backends synthetic \
  --batch-size "$batch" --image-size 160 --seconds "$seconds" --workers "$workers" \
  --json "$results/bench_train_rn18c_raw160_noblur.json"

step "4t. TrivialAugment's, RandAugment's and AutoAugment's cost (data.auto_augment): the 4s model and feeds without and with each"
# Not measured on a GPU before (added 2026-12-06; RandAugment, 2 operations at bin 9, the twenty-second session;
# AutoAugment's ImageNet policy, the twenty-fourth). CPU machine, pipeline alone at 224 px: TrivialAugment leaves
# dali-cpu 0.63-0.66 and torch-uint8 0.74-0.78 of their rate without it. On the GPU the operations run in DALI's GPU
# kernels, on torch-uint8's host workers.
limit 180 python -m tools.bench_train --shards /tmp/gc/raw-shards --model resnet18 --blurpool --compile \
  --backends torch-uint8,dali-gpu --auto-augment none,trivial_augment_wide,rand_augment,auto_augment_imagenet \
  --batch-size "$batch" --image-size 160 --seconds "$seconds" --workers "$workers" \
  --json "$results/bench_train_rn18c_raw160_ta.json"

step "4r. ResNet-50 fed by dali-gpu from the full-size JPEGs vs synthetic (0.896-0.908 in five runs; last, so the budget may skip it)"
limit 90 python -m tools.bench_train --shards /tmp/gc/bench-shards --model resnet50 \
  --backends dali-gpu --batch-size "$batch" --seconds "$seconds" --workers "$workers" --json "$results/bench_train_rn50.json"

step "report: the tables for docs/PERFORMANCE.md"
python -m tools.gpu_report "$results" --write "$OUT/report.md"
tar czf "$OUT/results.tgz" --exclude='*.pt' -C /tmp/gc results run run-raw  # the runs' logs, not their weights
step "done"
