"""Drop-in layers: `nn.Module`s with conventional constructors and parameter names that run
deepmlf-fast's fused ops (Triton on CUDA, the PyTorch reference elsewhere).

* `Gate`: a learned scalar or per-channel gate `sigmoid(alpha)` / `tanh(alpha)`;
* `GatedCrossAttention`: `x + gate * W_o MHA(norm(x) W_q, A W_k, A W_v)` from a few query
  tokens to a narrow key/value sequence, in one fused op;
* `GatedFFN`: `x + gate * dropout(mlp(norm(x)))` around any position-wise MLP;
* `FusionTokens`: a table of learnable tokens broadcast over the batch.

Each has a `from_module` constructor that copies an equivalent module from elsewhere
(open_flamingo-style gated blocks, torchtune's `TanhGate`, an `nn.Embedding` of prompt tokens).
"""

from deepmlf_fast.layers.cross_attention import GatedCrossAttention
from deepmlf_fast.layers.ffn import GatedFFN
from deepmlf_fast.layers.gate import Gate, make_norm
from deepmlf_fast.layers.tokens import FusionTokens

__all__ = ["FusionTokens", "Gate", "GatedCrossAttention", "GatedFFN", "make_norm"]
