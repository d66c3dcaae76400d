"""Baselines the benchmarks compare against, written in our own words from the descriptions in
`/work/shared/reference/deepmlf-reference.md` (no code copied from the official repository).

* `official_xattn`: the MM-block cross-attention half (eager, as the official code computes it,
  and the same module on PyTorch SDPA);
* `self_attention`: padded LM self-attention with a dense mask (eager, SDPA, FlexAttention) and
  SDPA over the unpadded samples;
* `official_deepmlf`: a whole official-style DeepMLF training forward.
"""
