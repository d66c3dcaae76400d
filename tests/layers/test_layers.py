"""The public layers against an independent plain-PyTorch reference: an open_flamingo-style
tanh-gated cross-attention block (written below as open_flamingo writes it: `to_q`, a fused
`to_kv`, `to_out`, explicit softmax, `x + tanh(gate) * ...`). Each layer is built from it with
`from_module`, and outputs and the gradients of inputs and every weight must agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deepmlf_fast.layers import FusionTokens, Gate, GatedCrossAttention, GatedFFN

DIM, KV_DIM, HEADS = 32, 6, 4


class MaskedCrossAttention(nn.Module):
    """open_flamingo's cross-attention (media masked by a (B, L) bool mask instead of media locations)."""

    def __init__(self, dim, dim_visual, dim_head, heads, norm=nn.LayerNorm):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm = norm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, media, media_mask=None):
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x)
        k, v = self.to_kv(media).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)
        if media_mask is not None:
            sim = sim.masked_fill(~media_mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class GatedCrossAttentionBlock(nn.Module):
    """open_flamingo's `GatedCrossAttentionBlock`; `gate_fn` tanh as there (sigmoid for DeepMLF's gates)."""

    def __init__(self, dim=DIM, dim_visual=KV_DIM, heads=HEADS, norm=nn.LayerNorm, gate_fn=torch.tanh):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim // heads, heads, norm)
        self.attn_gate = nn.Parameter(torch.tensor([0.3]))
        self.ff = nn.Sequential(norm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(),
                                nn.Linear(4 * dim, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.tensor([-0.2]))
        self.gate_fn = gate_fn

    def attend(self, x, media, media_mask=None):
        return self.attn(x, media, media_mask) * self.gate_fn(self.attn_gate) + x

    def feed_forward(self, x):
        return self.ff(x) * self.gate_fn(self.ff_gate) + x


def reference_block(norm=nn.LayerNorm, gate="tanh") -> GatedCrossAttentionBlock:
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(norm=norm, gate_fn=torch.tanh if gate == "tanh" else torch.sigmoid).double()
    with torch.no_grad():  # non-trivial norm parameters
        for m in block.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.2, 0.2)
    return block


ATTN_PAIRS = {"norm.weight": "attn.norm.weight", "norm.bias": "attn.norm.bias", "q_proj.weight": "attn.to_q.weight",
              "kv_proj.weight": "attn.to_kv.weight", "o_proj.weight": "attn.to_out.weight", "gate.alpha": "attn_gate"}


def grads(module, *inputs) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in module.named_parameters()}
    out.update({f"input{i}": t.grad for i, t in enumerate(inputs)})
    return out


def inputs(b=3, f=5, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    av = torch.randn(b, length, KV_DIM, generator=g, dtype=torch.float64, requires_grad=True)
    return x, av, torch.randn(b, f, DIM, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
@pytest.mark.parametrize("gate", ["tanh", "sigmoid"])
@pytest.mark.parametrize("form", ["plain", "absorbed"])
@pytest.mark.parametrize("lengths", [None, (7, 3, 1)])
def test_gated_cross_attention_matches_the_flamingo_block(norm, gate, form, lengths):
    block = reference_block(norm, gate)
    layer = GatedCrossAttention.from_module(block, gate=gate, form=form)
    assert layer.q_proj.weight.dtype == torch.float64 and layer.norm_kind == ("layernorm" if norm is nn.LayerNorm else "rmsnorm")
    x, av, dout = inputs()
    lens = None if lengths is None else torch.tensor(lengths)
    mask = None if lens is None else torch.arange(av.shape[1])[None] < lens[:, None]
    want = block.attend(x, av, mask)
    (want * dout).sum().backward()
    want_grads = {**{k: block.get_parameter(v).grad for k, v in ATTN_PAIRS.items() if norm is nn.LayerNorm or "bias" not in k},
                  "input0": x.grad, "input1": av.grad}
    x.grad = av.grad = None
    got = layer(x, av, lens)
    (got * dout).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    got_grads = grads(layer, x, av)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name].reshape(g.shape), g, atol=1e-10, rtol=1e-9, msg=name)


def test_gated_cross_attention_on_empty_sequences():
    block = reference_block()
    layer = GatedCrossAttention.from_module(block)
    x, av, _ = inputs(b=2, f=3)
    q = x.detach()
    out = layer(q, av, torch.tensor([7, 0]))
    torch.testing.assert_close(out[:1], block.attend(q[:1], av[:1]), atol=1e-10, rtol=1e-10)
    assert torch.equal(out[1], q[1])  # no visible step: the residual alone


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: CUDA, else the CPU under TRITON_INTERPRET=1 (tests/conftest.py)."""
    triton = pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if not triton.knobs.runtime.interpret:
        pytest.skip("deepmlf_kernels was imported before TRITON_INTERPRET=1 was set")
    return "cpu"


def test_gated_cross_attention_triton_path_runs_the_same_function(device):
    layer = GatedCrossAttention.from_module(reference_block()).float().to(device)
    layer.backend = "triton"
    x, av, dout = (t.detach().float().to(device).requires_grad_() for t in inputs())
    got = layer(x, av, torch.tensor([7, 3, 1], device=device))
    (got * dout).sum().backward()
    got_grads = grads(layer, x, av)
    layer.zero_grad()
    x.grad = av.grad = None
    layer.backend = "reference"
    want = layer(x, av, torch.tensor([7, 3, 1], device=device))
    (want * dout).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, g in grads(layer, x, av).items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-4, rtol=1e-4, msg=name)


def test_from_module_refuses_what_the_fused_op_cannot_run():
    block = GatedCrossAttentionBlock()
    block.attn.to_q = nn.Linear(DIM, 2 * DIM, bias=False)
    with pytest.raises(ValueError, match=r"heads \* dim_head == dim \(32\), found 64"):
        GatedCrossAttention.from_module(block)
    block = GatedCrossAttentionBlock()
    block.attn.to_out = nn.Linear(DIM, DIM)
    with pytest.raises(ValueError, match="bias-free"):
        GatedCrossAttention.from_module(block)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_gated_ffn_matches_the_flamingo_block(norm):
    block = reference_block(norm)
    layer = GatedFFN.from_module(block)
    x, _, dout = inputs()
    want = block.feed_forward(x)
    (want * dout).sum().backward()
    want_grads = {"input0": x.grad, "gate.alpha": block.ff_gate.grad, "norm.weight": block.ff[0].weight.grad,
                  "mlp.0.weight": block.ff[1].weight.grad, "mlp.2.weight": block.ff[3].weight.grad}
    x.grad = None
    got = layer(x)
    (got * dout).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    got_grads = grads(layer, x)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-12, rtol=1e-10, msg=name)


class TanhGate(nn.Module):
    """torchtune's `TanhGate`: `x * tanh(scale)`."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.4]))

    def forward(self, x):
        return x * self.scale.tanh()


def test_gate_from_a_parameter_or_a_module():
    tt = TanhGate()
    gate = Gate.from_module(tt)
    x = torch.randn(3, 4)
    torch.testing.assert_close(x * gate(), tt(x), atol=0, rtol=0)
    gate().sum().backward()
    tt(torch.ones(1)).sum().backward()
    torch.testing.assert_close(gate.alpha.grad, tt.scale.grad)
    channels = nn.Parameter(torch.linspace(-1, 1, 5))
    sig = Gate.from_module(channels, "sigmoid")
    assert sig.alpha.shape == (5,) and sig.alpha is not channels
    torch.testing.assert_close(sig(), torch.sigmoid(channels))
    with pytest.raises(ValueError, match="one parameter"):
        Gate.from_module(nn.Linear(2, 2))


def test_fusion_tokens_from_an_embedding():
    emb = nn.Embedding(6, DIM)
    tokens = FusionTokens.from_module(emb)
    out = tokens(3)
    assert out.shape == (3, 6, DIM) and torch.equal(out[2], emb.weight)
    (out * torch.arange(3.0)[:, None, None]).sum().backward()
    torch.testing.assert_close(tokens.weight.grad, torch.full((6, DIM), 3.0))  # summed over the batch
    assert torch.equal(FusionTokens.from_module(emb.weight).weight, emb.weight)
