#!/bin/bash
# One device call: the training stack at the project's pins (carried .whl), a 1-minute smoke test
# (the tiny stand-in trained on the GPU: fail fast before the full-size model is built), then the GPU
# check of data/measurements/README.md. Beside it, on the CPU, the predictor's torch-internals tests
# under this machine's torch (2.11, Colab's), which CI cannot install.
set -u
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; df -h /tmp;
  python3 -c "import sys,torch,transformers,deepspeed,FlagEmbedding,accelerate,numpy; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'accelerate', accelerate.__version__, 'numpy', numpy.__version__)"; } \
  > $OUT/env.log 2>&1 || { cat $OUT/env.log; exit 1; }
cat $OUT/env.log
( CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu timeout 420 nice python3 -m pytest -q -p no:cacheprovider \
    tests/test_compat.py tests/test_fake_cache_key.py tests/test_paste.py > $OUT/cpu_tests_torch211.log 2>&1 ) &
SECONDS=0
timeout 150 python3 -m m3lab.gpu_check --model tiny --out /tmp/smoke --no-predict --parallel 2 --budget-s 120 \
  > $OUT/smoke.log 2>&1
echo "smoke: exit $? after ${SECONDS}s"; tail -5 $OUT/smoke.log
grep -q " ok: " $OUT/smoke.log || { tail -80 /tmp/m3lab-gpu-check/runs/*/train.log 2>/dev/null | tail -120; wait; exit 1; }
timeout 470 python3 -m m3lab.gpu_check --out $OUT --budget-s 420 > $OUT/gpu_check.log 2>&1
echo "gpu_check: exit $? after ${SECONDS}s"; cat $OUT/gpu_check.log | cut -c1-400 | tail -60
wait; tail -15 $OUT/cpu_tests_torch211.log
