"""Data: MMSA files, the synthetic default, tokenization and batching."""

from deepmlf_fast.data.loader import Batch, EpochSampler, MMSADataset, make_loader
from deepmlf_fast.data.mmsa import MMSAData, MMSASplit, convert_pickle, from_mmsa_dict, load_mmsa, save_npz
from deepmlf_fast.data.packing import PackedLayout, pack_padded
from deepmlf_fast.data.specs import DATASETS, DatasetSpec, dataset_spec
from deepmlf_fast.data.synthetic import make_synthetic, rotten_tomatoes
from deepmlf_fast.data.tokenize import TokenizedText, tokenize_texts

__all__ = [
    "DATASETS",
    "Batch",
    "DatasetSpec",
    "EpochSampler",
    "MMSAData",
    "MMSADataset",
    "MMSASplit",
    "PackedLayout",
    "TokenizedText",
    "convert_pickle",
    "dataset_spec",
    "from_mmsa_dict",
    "load_mmsa",
    "make_loader",
    "make_synthetic",
    "pack_padded",
    "rotten_tomatoes",
    "save_npz",
    "tokenize_texts",
]
