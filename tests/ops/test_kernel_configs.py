"""Every autotune config runs, and `DEEPMLF_TRITON_CONFIG` pins configs at launch time.

The interpreter cannot autotune, so without a pin it runs one config per call; these
tests pin each tile of each kernel's table in turn and check the results with the
error-ratio criterion. Configs that differ only in num_warps / num_stages are the same
program to the interpreter (those two only matter to the GPU compiler, which
`deepmlf_kernels.aot` checks), so each distinct tile runs once.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
pytest.importorskip("triton")

from deepmlf_kernels import attention, common, gated_linear  # noqa: E402  (after conftest's TRITON_INTERPRET)
from test_gated_linear import _fwd_bwd as _gl_fwd_bwd  # noqa: E402
from test_gated_linear import _inputs as _gl_inputs  # noqa: E402
from test_gated_linear import _kernel as _gl_kernel  # noqa: E402
from test_gated_linear import _reference as _gl_reference  # noqa: E402
from test_varlen_attention import _check as _attn_check  # noqa: E402
from test_varlen_attention import _last_key_dominant  # noqa: E402

ATTN_KERNELS = {"attn_fwd": "_fwd_kernel", "attn_bwd_dq": "_bwd_dq_kernel", "attn_bwd_dkdv": "_bwd_dkdv_kernel"}
# A head dim that pads to each BLOCK_D and leaves masked columns where it can.
HEAD_DIM_OF = {32: 30, 64: 48, 128: 80, 256: 160}
DTYPE_OF = {"16bit": torch.bfloat16, "tf32x3": torch.float32, "ieee": torch.float32, "tf32": torch.float32}
# The low-precision reference each class is held to: TF32's 10-bit operands to bf16's.
BASELINE_OF = {"16bit": torch.bfloat16, "tf32x3": torch.float32, "ieee": torch.float32, "tf32": torch.bfloat16}


def _attention_cases():
    """[(tile, dot class, BLOCK_D, kernels that have the tile there)] covering every
    (kernel, tile) pair of the tables, preferring bf16 and small head dims."""
    wanted = {(kernel, tile[:2]) for kernel, table in attention.ATTN_TABLE.items()
              for tiles in table.values() for tile in tiles}
    cases = []
    order = sorted({key for table in attention.ATTN_TABLE.values() for key in table},
                   key=lambda key: (key[0] != "16bit", key[0] == "tf32", key[1]))
    while wanted:
        tile = min(t for _, t in wanted)
        kernels = {k for k, t in wanted if t == tile}
        best = max(order, key=lambda key: len({k for k in kernels
                                               if tile in {t[:2] for t in attention.ATTN_TABLE[k].get(key, ())}}))
        covered = sorted(k for k in kernels if tile in {t[:2] for t in attention.ATTN_TABLE[k][best]})
        cases.append((tile, *best, tuple(covered)))
        wanted -= {(k, tile) for k in covered}
    return cases


@pytest.fixture
def tf32_setting():
    """Sets PyTorch's fp32 matmul precision for one test and restores it."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision

    def set_to(value):
        matmul.fp32_precision = value

    yield set_to
    matmul.fp32_precision = before


_ATTN_CASES = _attention_cases()


@pytest.mark.parametrize("tile, cls, block_d, kernels", _ATTN_CASES,
                         ids=[f"{m}x{n}-{cls}-d{bd}" for (m, n), cls, bd, _ in _ATTN_CASES])
def test_every_attention_tile(device, assert_fa_close, monkeypatch, tf32_setting, tile, cls, block_d, kernels):
    """Causal cross lengths both ways, seqused_k, GQA and dropout, so every masked edge
    and loop bound of the tile is crossed."""
    pin = ";".join(f"{k}:BLOCK_M={tile[0]},BLOCK_N={tile[1]}" for k in kernels)
    monkeypatch.setenv(common.CONFIG_ENV, pin)
    tf32_setting("tf32" if cls == "tf32" else "ieee")
    _attn_check(assert_fa_close, [5, 37, 20], [9, 40, 3], 2, 1, HEAD_DIM_OF[block_d], DTYPE_OF[cls], device,
                seqused=[9, 33, 3], causal=True, dropout_p=0.1, baseline=BASELINE_OF[cls])
    for kernel in kernels:
        used = getattr(attention, ATTN_KERNELS[kernel]).last_config
        assert (used.kwargs["BLOCK_M"], used.kwargs["BLOCK_N"]) == tile, kernel


def _one_key_past(block_m, block_n):
    """(lens_q, lens_k) of two samples whose last query tile is full and ends one key past a key
    tile: Lq = one and two full query tiles, Lk = the next multiple of BLOCK_N at or above Lq,
    plus 1, so the causal key bound m0 + BLOCK_M + Lk - Lq of that tile is k * BLOCK_N + 1."""
    lens_q = [block_m, 2 * block_m]
    return lens_q, [-(-n // block_n) * block_n + 1 for n in lens_q]


@pytest.mark.parametrize("tile, cls, block_d, kernels", _ATTN_CASES,
                         ids=[f"{m}x{n}-{cls}-d{bd}" for (m, n), cls, bd, _ in _ATTN_CASES])
def test_every_attention_tile_reaches_the_last_causal_key(device, assert_fa_close, monkeypatch, tf32_setting, tile,
                                                          cls, block_d, kernels):
    """Forward and backward on full query tiles whose causal key bound is one past a key tile
    (`_one_key_past`), the last query row weighting that last key most (`_last_key_dominant`):
    a key loop bound one short, in any kernel of the tile, fails here in every dtype."""
    pin = ";".join(f"{k}:BLOCK_M={tile[0]},BLOCK_N={tile[1]}" for k in kernels)
    monkeypatch.setenv(common.CONFIG_ENV, pin)
    tf32_setting("tf32" if cls == "tf32" else "ieee")
    lens_q, lens_k = _one_key_past(*tile)
    _attn_check(assert_fa_close, lens_q, lens_k, 2, 1, HEAD_DIM_OF[block_d], DTYPE_OF[cls], device, causal=True,
                baseline=BASELINE_OF[cls], make_inputs=_last_key_dominant)
    for kernel in kernels:
        used = getattr(attention, ATTN_KERNELS[kernel]).last_config
        assert (used.kwargs["BLOCK_M"], used.kwargs["BLOCK_N"]) == tile, kernel


def _gemm_tiles():
    return sorted({(cls, tile[:3]) for cls, tiles in gated_linear.GEMM_TABLE.items() for tile in tiles},
                  key=lambda c: (c[0] != "16bit", c[1], c[0]))


@pytest.mark.parametrize("cls, tile", _gemm_tiles(), ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_every_gemm_tile(device, assert_fa_close, monkeypatch, tf32_setting, cls, tile):
    block_m, block_n, block_k = tile
    monkeypatch.setenv(common.CONFIG_ENV, f"gated_linear_fwd:BLOCK_M={block_m},BLOCK_N={block_n},BLOCK_K={block_k}")
    tf32_setting("tf32" if cls == "tf32" else "ieee")
    m, n, k = 45, 72, 100  # none a multiple of the tiles
    tensors, dout = _gl_inputs(m, n, k, True, DTYPE_OF[cls], device)
    kernel = _gl_fwd_bwd(_gl_kernel, tensors, dout, gate="tanh")
    low = [t.to(BASELINE_OF[cls]) if t.is_floating_point() and t is not tensors[3] else t for t in tensors]
    lowprec = _gl_fwd_bwd(_gl_reference, low, dout.to(BASELINE_OF[cls]), gate="tanh", dropout_p=0.0, keep=None)
    exact = _gl_fwd_bwd(_gl_reference, [t.double() for t in tensors], dout.double(), gate="tanh", dropout_p=0.0,
                        keep=None)
    for name, a, b, c in zip(("out", "dx", "dh", "dw", "dalpha"), kernel, lowprec, exact):
        assert_fa_close(name, a, b, c)
    assert gated_linear._fwd_kernel.last_config.kwargs == dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def test_pin_syntax():
    assert common.parse_pins("") == {}
    assert common.parse_pins("BLOCK_M=32, BLOCK_N=64") == {None: {"BLOCK_M": 32, "BLOCK_N": 64}}
    assert common.parse_pins("attn_bwd_dkdv:BLOCK_M=16;gated_linear_fwd:num_warps=8;") == {
        "attn_bwd_dkdv": {"BLOCK_M": 16}, "gated_linear_fwd": {"num_warps": 8}}
    for bad in ("BLOCK_X=16", "BLOCK_M=big", "BLOCK_M", "attn_bwd:BLOCK_M=16"):
        with pytest.raises(ValueError, match=common.CONFIG_ENV):
            common.parse_pins(bad)


def test_pin_filters_candidates():
    configs = attention.attention_configs("attn_fwd", "16bit", 64)
    assert common.apply_pin("attn_fwd", configs, "") == configs
    for text in ("BLOCK_M=16", "attn_fwd:BLOCK_M=16;BLOCK_M=999", "BLOCK_K=999;attn_fwd:BLOCK_M=16"):
        kept = common.apply_pin("attn_fwd", configs, text)
        assert kept and all(c.kwargs["BLOCK_M"] == 16 for c in kept), text
    assert common.apply_pin("attn_fwd", configs, "gated_linear_fwd:BLOCK_M=999") == configs
    with pytest.raises(ValueError, match="leaves no config for attn_fwd; its candidates"):
        common.apply_pin("attn_fwd", configs, "BLOCK_M=999")


def _tiny_attention(device):
    from deepmlf_kernels.attention import varlen_attention_triton

    cu = torch.tensor([0, 9], dtype=torch.int32, device=device)
    q = torch.randn(9, 1, 16, device=device)
    return varlen_attention_triton(q, q, q, cu, cu, 9, 9)


def test_pin_is_read_at_each_launch(device, monkeypatch):
    """Changing the variable between launches changes the config; unpinned, the
    interpreter takes the largest tile."""
    configs = attention.attention_configs("attn_fwd", "tf32x3", 32)
    tiles = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs})
    for m, n in tiles[:2]:
        monkeypatch.setenv(common.CONFIG_ENV, f"BLOCK_M={m},BLOCK_N={n}")
        _tiny_attention(device)
        assert attention._fwd_kernel.last_config.kwargs == dict(BLOCK_M=m, BLOCK_N=n)
    monkeypatch.delenv(common.CONFIG_ENV)
    _tiny_attention(device)
    if device == "cpu":
        largest = max(tiles, key=lambda t: t[0] * t[1])
        assert attention._fwd_kernel.last_config.kwargs == dict(BLOCK_M=largest[0], BLOCK_N=largest[1])


def test_shared_memory_limit_prunes_candidates(device, monkeypatch):
    """A device with less shared memory than a config needs never launches it."""
    configs = attention.attention_configs("attn_fwd", "tf32x3", 32)
    needs = sorted(attention.shared_memory_estimate("attn_fwd", c, 32, "tf32x3") for c in configs)
    assert needs[0] < needs[-1]
    monkeypatch.setattr(attention, "max_shared_memory", lambda _device: needs[0])
    _tiny_attention(device)
    used = attention._fwd_kernel.last_config
    assert attention.shared_memory_estimate("attn_fwd", used, 32, "tf32x3") == needs[0]
    monkeypatch.setattr(attention, "max_shared_memory", lambda _device: needs[0] - 1)
    with pytest.raises(RuntimeError, match="no config of attn_fwd fits"):
        _tiny_attention(device)
