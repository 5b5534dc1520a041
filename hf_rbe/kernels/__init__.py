"""Device implementations of ``hf_rbe::linear`` (the op and its reference are ``hf_rbe.core.ops``).

    dispatch        registers the kernels with the op; picks one per format and device
    cpu_simd        numba: an 8-lane fp32 vector type
    cpu_numba       the format-v2 CPU kernels (GEMV straight from the codes; decode + BLAS above)
    cpu_search      the encoder's e8p nearest-codeword search, bit for bit the reference
    cpu_decode      one format-v2 stage decoded to fp32, bit for bit the reference
    cpu_dense       a stored bf16 head times a decoding step's one row
    threads         the numba kernels run on as many threads as torch
    triton_common   what the Triton kernels share (device check, per-device constants)
    triton_v1       format v1 on CUDA
    triton_v2       format v2 on CUDA (GEMV at M=1, tensor-core tiles above)
    triton_seed64   seed64 on CUDA
    sass_cost       the static cost model: compile for sm_90 without a GPU, read the SASS

Plain torch plus numba / Triton, each imported on first use; never transformers. ``NOTES.md`` records
every kernel version with its predicted and measured cost.
"""
