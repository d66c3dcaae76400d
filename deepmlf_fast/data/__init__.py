"""Data: MMSA files, the synthetic default, tokenization and batching.

The names below load their module on first use (PEP 562), so `config` can read the dataset
registry (`data.specs`) without importing torch: `deepmlf --help` stays fast.
"""

import importlib

_HOME = {
    "Batch": "loader", "EpochSampler": "loader", "MMSADataset": "loader", "make_loader": "loader",
    "MMSAData": "mmsa", "MMSASplit": "mmsa", "convert_pickle": "mmsa", "from_mmsa_dict": "mmsa",
    "load_mmsa": "mmsa", "save_npz": "mmsa",
    "PackedLayout": "packing", "pack_padded": "packing",
    "DATASETS": "specs", "DatasetSpec": "specs", "dataset_spec": "specs",
    "make_synthetic": "synthetic", "rotten_tomatoes": "synthetic",
    "TokenizedText": "tokenize", "tokenize_texts": "tokenize",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'deepmlf_fast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deepmlf_fast.data.{_HOME[name]}"), name)
