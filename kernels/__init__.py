"""Triton kernels with their launchers and autograd Functions, installed as
`deepmlf_fast.kernels`. They know nothing of DeepMLF: plain attention ops anyone can call."""
