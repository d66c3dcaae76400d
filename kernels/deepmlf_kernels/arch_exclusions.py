"""Configs the ahead-of-time check found unfit on one architecture; the launchers never try
them on a device of that compute capability (`common.excluded`).

A config is unfit where ptxas spills registers for it, or where Triton gives it more shared
memory than the launchers' estimate (which would then let it through to a launch that
fails). Generated, not hand-written: `python -m deepmlf_kernels.aot --arch all --exclusions`
compiles every config of every table for sm_80, 86, 89, 90, 100 and 120 and prints this
table; the same check (CI: a representative subset per architecture) fails when an entry
goes stale or a new unfit config appears.

`EXCLUDED[capability][(kernel, dot class, BLOCK_D or 0 for the GEMM, config)]` = the reason.
"""

EXCLUDED: dict[int, dict[tuple[str, str, int, str], str]] = {
    80: {
        ('attn_bwd_dkdv', '16bit', 64, 'BLOCK_M=32,BLOCK_N=64,num_warps=8,num_stages=2'): 'spills 72 B stores, 68 B loads per thread',
        ('attn_bwd_dkdv', 'tf32', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 48 B stores, 44 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 32, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 320 B stores, 260 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 1308 B stores, 1308 B loads per thread',
        ('attn_fwd', 'tf32x3', 32, 'BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=1'): 'spills 12 B stores, 12 B loads per thread',
        ('attn_fwd', 'tf32x3', 64, 'BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=1'): 'spills 88 B stores, 76 B loads per thread',
    },
    86: {
        ('attn_bwd_dkdv', '16bit', 64, 'BLOCK_M=32,BLOCK_N=64,num_warps=8,num_stages=2'): 'spills 68 B stores, 60 B loads per thread',
        ('attn_bwd_dkdv', 'tf32', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 48 B stores, 44 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 32, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 336 B stores, 268 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 1352 B stores, 1332 B loads per thread',
        ('attn_fwd', 'tf32x3', 64, 'BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=1'): 'spills 24 B stores, 12 B loads per thread',
    },
    89: {
        ('attn_bwd_dkdv', '16bit', 64, 'BLOCK_M=32,BLOCK_N=64,num_warps=8,num_stages=2'): 'spills 68 B stores, 60 B loads per thread',
        ('attn_bwd_dkdv', 'tf32', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 48 B stores, 44 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 32, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 336 B stores, 268 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 1352 B stores, 1332 B loads per thread',
        ('attn_fwd', 'tf32x3', 64, 'BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=1'): 'spills 24 B stores, 12 B loads per thread',
    },
    100: {
        ('attn_fwd', 'tf32x3', 64, 'BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=1'): 'spills 132 B stores, 128 B loads per thread',
    },
    120: {
        ('attn_bwd_dkdv', '16bit', 64, 'BLOCK_M=32,BLOCK_N=64,num_warps=8,num_stages=2'): 'spills 88 B stores, 84 B loads per thread',
        ('attn_bwd_dkdv', 'tf32', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 92 B stores, 88 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 32, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 420 B stores, 348 B loads per thread',
        ('attn_bwd_dkdv', 'tf32x3', 64, 'BLOCK_M=16,BLOCK_N=64,num_warps=8,num_stages=1'): 'spills 1376 B stores, 1444 B loads per thread',
    },
}
