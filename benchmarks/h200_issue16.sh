#!/bin/bash
# Issue 16's measurements on a lent H200, in parts that each fit one `run` call (10 minutes at most), most
# urgent first. Each command's output goes to $OUT/<name>.log (and the tail to stdout); a failing command does
# not stop the part. From the repository root on the device machine:
#
#     bash benchmarks/h200_issue16.sh 1     # then 2 to 8, as device time allows
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
T128="--shape llama-3.1-8b --dtype bfloat16 --buckets 512 2048 --chunk 512 --decode-steps 16 --num-requests 128 --max-slots 128 --input-len 512 --output-len 256"
AUTOTUNED="--xla_gpu_autotune_level=4"  # XLA's default, before session 36 set 0 (jinfer/runtime/xla_flags.py)
case "${1:-1}" in
1)  # the ceilings; batch 1 twice (the run-to-run spread), then before/after of sessions 36-37's changes; kernels
  step roofline 60 python benchmarks/gpu_roofline.py
  step b1_bf16 80 python benchmarks/throughput.py $B1
  step b1_bf16_again 80 python benchmarks/throughput.py $B1
  step b1_bf16_unfolded_norms 80 python benchmarks/throughput.py $B1 --unfolded-norms
  step b1_bf16_unfolded_again 80 python benchmarks/throughput.py $B1 --unfolded-norms
  step b1_bf16_autotuned 80 env XLA_FLAGS=$AUTOTUNED python benchmarks/throughput.py $B1
  step kernel_tests 120 env JAX_PLATFORMS=cuda python -m pytest -q -x tests/kernels/test_rms_norm.py \
    tests/kernels/test_rope_kv.py tests/kernels/test_rope_decode_attention.py tests/kernels/test_swiglu.py
  ;;
2)  # throughput at 128 requests with and without GEMM autotuning (the flag was set on batch-1 evidence); exactness
  step t128 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 python benchmarks/throughput.py $T128
  step t128_autotuned 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 XLA_FLAGS=$AUTOTUNED python benchmarks/throughput.py $T128
  step exactness 90 python benchmarks/engine_exactness.py
  step exactness_int4 100 python benchmarks/engine_exactness.py --quantization int4
  ;;
3)  # whether batch 1 at chat lengths pays for context splits and their combine; the split of a token
  step decode_tune_b1 150 python benchmarks/decode_tune.py --page-size 16 --batch 1 --context 256 1024 --stages 1 \
    --unmasked 0
  # Batch 1 end to end on one context split (contexts 128-640 here): no combine after the kernel (session 37).
  step b1_bf16_one_split 90 python benchmarks/throughput.py $B1 --decode-splits 1
  step profile_b1 120 python benchmarks/step_profile.py --shape llama-3.1-8b --dtype bfloat16 --workload decode_b1 \
    --max-slots 1 --decode-steps 32 --top 30
  # Session 36's traces caught a few percent of the kernels: those inside CUDA graphs may not be traced. Without
  # command buffers every kernel is its own launch (the gaps are not the engine's), but each one is seen.
  step profile_b1_no_graphs 120 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" python benchmarks/step_profile.py \
    --shape llama-3.1-8b --dtype bfloat16 --workload decode_b1 --max-slots 1 --decode-steps 32 --top 30
  ;;
4)  # session 34's quantized layouts; int4 at batch 1 in both layouts (session 38: 334 kernels a token, was 398)
  step quant_variants 240 python benchmarks/quant_matmul.py --variants --formats int4,int8 --m 1,16 \
    --shapes 4096x14336,14336x4096,4096x4096 --rounds 3
  step b1_int4_out_in 100 python benchmarks/throughput.py $B1 --quantization int4 --out-in int4
  step b1_int4 100 python benchmarks/throughput.py $B1 --quantization int4
  # Before session 38's two launches fewer a layer (gains as input scales, partials summed by the activation).
  step b1_int4_unfolded 100 python benchmarks/throughput.py $B1 --quantization int4 --unfolded-norms
  ;;
5)  # launch overheads at batch 1: XLA's programmatic dependent launch (PDL) on and off; the unfused decode kernel
  step b1_bf16_pdl 90 env XLA_FLAGS="--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true" \
    python benchmarks/throughput.py $B1
  step b1_bf16_no_pdl 90 env XLA_FLAGS="--xla_gpu_enable_pdl=false" python benchmarks/throughput.py $B1
  step b1_bf16_unfused_decode 90 python benchmarks/throughput.py $B1 --unfused-decode
  step b1_bf16_scan_layers 90 python benchmarks/throughput.py $B1 --scan-layers
  ;;
6)  # the PyTorch peer at batch 1 (its torch.compile warm-up alone took over 120 s in session 36), beside jinfer
  step torch_peer_b1 330 python benchmarks/torch_peer.py --batches 1 --num-requests 0
  step b1_bf16_beside_peer 90 python benchmarks/throughput.py $B1
  ;;
7)  # points 2, 5 and 6 again on today's step (unrolled layers, fused decode, folded norms; last timed in
    # sessions 29-30): paged decode beside cuDNN in the same run, speculation's verify cost and replayed ceiling,
    # exactness with speculation and with quantized KV pages
  step kernels_decode 140 python benchmarks/kernels.py --decode-only --iters 20
  step spec_ceiling 240 python benchmarks/spec_ceiling.py --shape llama-3.1-8b --dtype bfloat16 --ks 1,2,4,8 \
    --output-len 128 --rounds 4
  step exactness_ngram 100 python benchmarks/engine_exactness.py --speculative ngram
  step exactness_int8_kv 80 python benchmarks/engine_exactness.py --kv-cache-dtype int8
  ;;
8)  # the paged decode variants at larger batches (session 34's unmasked steps among them), its native tests
  step decode_tune 180 python benchmarks/decode_tune.py --page-size 16 --batch 64 8 --stages 1
  step paged_kernel_tests 150 env JAX_PLATFORMS=cuda python -m pytest -q -x tests/kernels/test_paged_attention_kernel.py
  ;;
*)
  echo "part must be 1 to 8" >&2
  exit 2
  ;;
esac
