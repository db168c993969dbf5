#!/bin/bash
# Issue 16's measurements on a lent H200, in parts that each fit one `run` call (10 minutes at most), most
# urgent first. Each command's output goes to $OUT/<name>.log (and the tail to stdout); a failing command does
# not stop the part. From the repository root on the device machine:
#
#     bash benchmarks/h200_issue16.sh 1     # then 2, then 3, as device time allows
#
# The checkout's jinfer/ shadows the package mapping, so everything runs from an install in a scratch folder.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -d /tmp/site/jinfer ]; then
  rm -rf build ./*.egg-info /tmp/site
  pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . > /dev/null 2>&1
  rm -rf /tmp/site/benchmarks /tmp/site/tests
  cp -r benchmarks tests /tmp/site/
fi
cd /tmp/site || exit 1
export PYTHONPATH=/tmp/site

step() {  # name, timeout in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "(exit $?)"
  tail -n 25 "$OUT/$name.log"
}

B1="--shape llama-3.1-8b --dtype bfloat16 --num-requests 1 --input-len 128 --output-len 512 --max-slots 1 --buckets 16 128 --decode-steps 16"
case "${1:-1}" in
1)  # the ceilings; batch 1 with the new glue kernels and without them; the kernels' tests natively
  step roofline 90 python benchmarks/gpu_roofline.py
  step b1_bf16 150 python benchmarks/throughput.py $B1
  step b1_bf16_xla_glue 150 python benchmarks/throughput.py $B1 --xla-glue
  step kernel_tests 240 env JAX_PLATFORMS=cuda python -m pytest -q tests/kernels/test_rms_norm.py \
    tests/kernels/test_rope_kv.py tests/kernels/test_rope_decode_attention.py tests/kernels/test_paged_attention_kernel.py
  ;;
2)  # the split of a token; exactness with the new kernels; the peer
  step profile_b1 240 python benchmarks/step_profile.py --shape llama-3.1-8b --dtype bfloat16 --workload decode_b1 \
    --max-slots 1 --decode-steps 32 --top 30
  step exactness 180 python benchmarks/engine_exactness.py
  step exactness_int4 180 python benchmarks/engine_exactness.py --quantization int4
  step torch_peer_b1 240 python benchmarks/torch_peer.py --batches 1 --num-requests 0
  ;;
3)  # session 34's quantized layouts and the paged decode variants
  step quant_variants 300 python benchmarks/quant_matmul.py --variants --formats int4,int8 --m 1,16 \
    --shapes 4096x14336,14336x4096,4096x4096 --rounds 3
  step b1_int4_out_in 150 python benchmarks/throughput.py $B1 --quantization int4 --out-in int4
  step b1_int4 150 python benchmarks/throughput.py $B1 --quantization int4 --out-in none
  step decode_tune 240 python benchmarks/decode_tune.py --page-size 16 --batch 64 8 --stages 1
  ;;
*)
  echo "part must be 1, 2 or 3" >&2
  exit 2
  ;;
esac
