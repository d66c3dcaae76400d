import torch

from deepmlf_fast.data.packing import PackedLayout


def test_layout_rows_and_positions():
    lay = PackedLayout.build(torch.tensor([3, 1, 2]), n_fusion=2, fusion_start=5)
    # rows: [t t t f f | t f f | t t f f]
    assert lay.n_rows == 12 and lay.max_seqlen == 5
    assert lay.cu_seqlens.tolist() == [0, 5, 8, 12]
    assert lay.text_rows.tolist() == [0, 1, 2, 5, 8, 9]
    assert lay.fusion_rows.tolist() == [3, 4, 6, 7, 10, 11]
    assert lay.last_text_rows.tolist() == [2, 5, 9]
    assert lay.position_ids.tolist() == [0, 1, 2, 5, 6, 0, 5, 6, 0, 1, 5, 6]
    assert lay.cu_seqlens_text.tolist() == [0, 3, 4, 6] and lay.max_seqlen_text == 3
    assert lay.cu_seqlens_fusion.tolist() == [0, 2, 4, 6]
    assert lay.cu_seqlens.dtype == torch.int32


def test_layout_batch_of_one_single_token():
    lay = PackedLayout.build(torch.tensor([1]), n_fusion=1, fusion_start=50)
    assert lay.text_rows.tolist() == [0] and lay.fusion_rows.tolist() == [1]
    assert lay.position_ids.tolist() == [0, 50]
