# Sourced by the GPU scripts: put the CUDA libraries (pip wheels, toolkit) on LD_LIBRARY_PATH,
# give cudarc a libnccl.so, and point NVRTC at the CUDA headers. The GPU machine's wheels are not
# on the default search path (see ../shared/gpu.md).
LIBDIRS=$(find / \( -path /proc -o -path /sys \) -prune -o \
  \( -name 'libcudnn.so*' -o -name 'libcublas*.so*' -o -name 'libnvrtc.so*' \) -print 2>/dev/null |
  xargs -r -n1 dirname | sort -u | tr '\n' ':')
[ -d /usr/local/cuda/lib64 ] && LIBDIRS="${LIBDIRS}/usr/local/cuda/lib64:"
NCCL_DIR=$(mktemp -d)
NCCL=$(find / \( -path /proc -o -path /sys \) -prune -o -name 'libnccl.so.2' -print 2>/dev/null | head -n1)
[ -n "$NCCL" ] && ln -sf "$NCCL" "$NCCL_DIR/libnccl.so"
export LD_LIBRARY_PATH="${LIBDIRS}${NCCL_DIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_fp16.h ]; then export CUDA_HOME=/usr/local/cuda; fi
