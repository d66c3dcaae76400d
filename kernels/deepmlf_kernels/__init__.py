"""deepmlf-fast's Triton kernels with their launchers and `torch.library` custom ops.

They know nothing of DeepMLF: a varlen FlashAttention-2 family (`attention`) and a GEMM
with a fused dropout + gate + residual epilogue (`gated_linear`), plain ops anyone can
call. `deepmlf_fast.ops` is their only caller in the package, on its CUDA branch.
"""
