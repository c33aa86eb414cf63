import numpy as np
import pytest

from tfrewrite.linalg import (
    DimMeta,
    SparseEncoding,
    block_sparsity,
    decode,
    encode_blocks,
    encode_csr_last_dim,
    encoded_nbytes,
    prune_blocks,
    prune_magnitude,
    smallest_index_dtype,
)

W = np.array([[0, 1.5, 0, 0, 0, 0, -2, 0],
              [0, 0, 0, 0, 3, 0.5, 0, 0]], dtype=np.float32)


def test_unstructured_example_exact():
    enc = encode_csr_last_dim(W)
    assert enc.traversal_order == [0, 1]
    assert enc.block_map == []
    assert enc.dense_shape == (2, 8)
    assert [d.format for d in enc.dims] == ["DENSE", "SPARSE_CSR"]
    assert enc.dims[0].dense_size == 2
    assert enc.dims[1].segments.tolist() == [0, 2, 4]
    assert enc.dims[1].indices.tolist() == [1, 6, 4, 5]
    assert enc.dims[1].segments.dtype == np.uint8 and enc.dims[1].indices.dtype == np.uint8
    assert enc.values.dtype == np.float32
    assert enc.values.tolist() == [1.5, -2, 3, 0.5]
    assert np.array_equal(decode(enc), W)
    assert encoded_nbytes(enc) == 4 * 4 + 3 + 4


def test_block_1x4_example_exact():
    enc = encode_blocks(W, (1, 4))
    assert enc.traversal_order == [0, 1, 2]
    assert enc.block_map == [1]
    assert [d.format for d in enc.dims] == ["DENSE", "SPARSE_CSR", "DENSE"]
    assert enc.dims[0].dense_size == 2
    assert enc.dims[1].segments.tolist() == [0, 2, 3]
    assert enc.dims[1].indices.tolist() == [0, 1, 1]
    assert enc.dims[2].dense_size == 4
    assert enc.values.tolist() == [0, 1.5, 0, 0, 0, 0, -2, 0, 3, 0.5, 0, 0]
    assert np.array_equal(decode(enc), W)
    assert encoded_nbytes(enc) == 12 * 4 + 3 + 3


def test_conv_kernel_layout():
    rng = np.random.default_rng(0)
    o, h, w, i = 3, 2, 2, 5
    k = rng.standard_normal((o, h, w, i)).astype(np.float32)
    k[rng.random(k.shape) < 0.6] = 0
    enc = encode_csr_last_dim(k)
    assert enc.traversal_order == [0, 1, 2, 3]
    assert [d.format for d in enc.dims] == ["DENSE"] * 3 + ["SPARSE_CSR"]
    assert [d.dense_size for d in enc.dims[:3]] == [o, h, w]
    seg = enc.dims[3].segments
    assert len(seg) == o * h * w + 1 and seg[-1] == np.count_nonzero(k)
    flat = k.reshape(-1, i)
    for row in range(o * h * w):
        cols = enc.dims[3].indices[seg[row]:seg[row + 1]]
        assert cols.tolist() == np.flatnonzero(flat[row]).tolist()
    assert np.array_equal(decode(enc), k)


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (5, 300), (3, 4, 2, 9), (2, 1, 3, 70)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_random_round_trip(shape, density):
    rng = np.random.default_rng(1000 * len(shape) + shape[-1] + int(100 * density))
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) >= density] = 0
    if x.shape[0] > 2:
        x[1] = 0  # an all-zero row / output channel
    enc = encode_csr_last_dim(x)
    out = decode(enc)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert np.array_equal(out, x)
    # An all-zero tensor keeps one explicit zero (TFLite rejects a sparse tensor with no stored values).
    assert enc.values.size == max(np.count_nonzero(x), 1)


@pytest.mark.parametrize("block", [(1, 4), (1, 16), (1, 1), (2, 4), (4, 1)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.7])
def test_block_round_trip(block, density):
    rng = np.random.default_rng(int(density * 100) + block[1])
    x = rng.standard_normal((8, 32))
    x[rng.random(x.shape) >= density] = 0
    x[2] = 0
    enc = encode_blocks(x, block)
    assert np.array_equal(decode(enc), x)
    n_kept = enc.values.size // (block[0] * block[1])
    assert n_kept == max(round((1 - block_sparsity(x, block)) * x.size / (block[0] * block[1])), 1)


def test_all_zero_tensor():
    z = np.zeros((4, 8), dtype=np.float32)
    for enc in (encode_csr_last_dim(z), encode_blocks(z, (1, 4))):
        # One explicit zero (a block of them): TFLite rejects a sparse tensor with no stored values.
        assert 1 <= enc.values.size <= 4 and not enc.values.any() and enc.values.dtype == np.float32
        assert enc.dims[1].segments.tolist() == [0] + [1] * 4
        assert np.array_equal(decode(enc), z)
    assert block_sparsity(z, (1, 4)) == 1.0


def test_block_must_divide():
    with pytest.raises(ValueError):
        encode_blocks(np.ones((2, 6)), (1, 4))
    with pytest.raises(ValueError):
        block_sparsity(np.ones((2, 6)), (1, 4))
    with pytest.raises(ValueError):
        prune_blocks(np.ones((2, 6)), 0.5, (1, 4))


def test_smallest_index_dtype_boundaries():
    assert smallest_index_dtype(0) == np.uint8
    assert smallest_index_dtype(255) == np.uint8
    assert smallest_index_dtype(256) == np.uint16
    assert smallest_index_dtype(65535) == np.uint16
    assert smallest_index_dtype(65536) == np.int32
    with pytest.raises(ValueError):
        smallest_index_dtype(2**31)


@pytest.mark.parametrize("nnz,dtype", [(255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.int32)])
def test_segment_dtype_follows_stored_count(nnz, dtype):
    x = np.zeros((nnz, 2), dtype=np.float32)  # inner dim 2: indices stay uint8
    x[:, 1] = 1
    enc = encode_csr_last_dim(x)
    assert enc.dims[-1].segments.dtype == dtype
    assert enc.dims[-1].indices.dtype == np.uint8
    assert int(enc.dims[-1].segments[-1]) == nnz


@pytest.mark.parametrize("size,dtype", [(256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.int32)])
def test_index_dtype_follows_dim_size(size, dtype):
    x = np.zeros((1, size), dtype=np.float32)
    x[0, 0] = 1  # one stored value: segments uint8, indices sized by size - 1
    enc = encode_csr_last_dim(x)
    assert enc.dims[-1].indices.dtype == dtype
    assert enc.dims[-1].segments.dtype == np.uint8
    x[0, -1] = 2
    assert np.array_equal(decode(encode_csr_last_dim(x)), x)


def test_block_index_dtype_counts_blocks():
    # 300 block columns of width 4 -> block index max 299 -> uint16; 10 kept blocks -> uint8.
    x = np.zeros((1, 1200), dtype=np.float32)
    x[0, :40] = 1
    enc = encode_blocks(x, (1, 4))
    assert enc.dims[1].indices.dtype == np.uint16
    assert enc.dims[1].segments.dtype == np.uint8


def test_decoder_is_general_column_major_traversal():
    # Hand-written encoding: traverse columns first (traversal [1, 0]), CSR over rows.
    enc = SparseEncoding(
        values=np.array([1.5, 3, 0.5, -2], dtype=np.float32),
        traversal_order=[1, 0],
        block_map=[],
        dims=[DimMeta("DENSE", dense_size=8),
              DimMeta("SPARSE_CSR", segments=np.array([0, 0, 1, 1, 1, 2, 3, 4, 4], np.uint8),
                      indices=np.array([0, 1, 1, 0], np.uint8))],
        dense_shape=(2, 8),
    )
    assert np.array_equal(decode(enc), W)


def test_decoder_general_2x2_blocks_with_inner_column_major():
    x = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    x[:2, :2] = 0  # block (0, 0) empty
    # Block-level rows DENSE, block cols CSR, then inside a block columns before rows.
    enc = SparseEncoding(
        values=np.array([3, 7, 4, 8, 9, 13, 10, 14, 11, 15, 12, 16], dtype=np.float32),
        traversal_order=[0, 1, 3, 2],
        block_map=[0, 1],
        dims=[DimMeta("DENSE", dense_size=2),
              DimMeta("SPARSE_CSR", segments=np.array([0, 1, 3], np.uint8),
                      indices=np.array([1, 0, 1], np.uint8)),
              DimMeta("DENSE", dense_size=2),
              DimMeta("DENSE", dense_size=2)],
        dense_shape=(4, 4),
    )
    assert np.array_equal(decode(enc), x)


def test_encoded_nbytes_vs_dense():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    sparse = x * prune_magnitude(x, 0.9)
    enc = encode_csr_last_dim(sparse)
    # 10% float32 values + 1 byte index each + uint16 segments.
    assert encoded_nbytes(enc) == enc.values.size * 4 + enc.values.size * 1 + 65 * 2
    assert encoded_nbytes(enc) < x.nbytes
    assert encoded_nbytes(encode_csr_last_dim(x)) > x.nbytes  # dense: encoding costs more


def test_prune_magnitude_exact_count_and_threshold():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 3, 3, 8))
    for sparsity in (0.0, 0.1, 0.333, 0.5, 0.9, 1.0):
        mask = prune_magnitude(x, sparsity)
        assert mask.shape == x.shape and mask.dtype == bool
        assert np.count_nonzero(~mask) == round(sparsity * x.size)
        if 0 < sparsity < 1:
            assert np.abs(x[~mask]).max() <= np.abs(x[mask]).min()


def test_prune_magnitude_ties_deterministic():
    x = np.array([1.0, -1.0, 1.0, 2.0, 1.0, 0.0])
    mask = prune_magnitude(x, 0.5)  # prune 3: the zero, then the first two tied ones
    assert mask.tolist() == [False, False, True, True, True, False]
    assert np.array_equal(mask, prune_magnitude(x, 0.5))


def test_prune_blocks():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 32))
    mask = prune_blocks(x, 0.75, (1, 4))
    assert mask.shape == x.shape
    pruned = x * mask
    assert block_sparsity(pruned, (1, 4)) == 0.75
    blocks = np.linalg.norm(x.reshape(8, 8, 4), axis=2)
    kept = mask.reshape(8, 8, 4).all(axis=2)
    assert np.array_equal(kept, mask.reshape(8, 8, 4).any(axis=2))  # whole blocks only
    assert blocks[~kept].max() <= blocks[kept].min()
    l1 = prune_blocks(x, 0.5, (1, 4), norm="l1").reshape(8, 8, 4).all(axis=2)
    s1 = np.abs(x).reshape(8, 8, 4).sum(axis=2)
    assert s1[~l1].max() <= s1[l1].min()
    enc = encode_blocks(pruned, (1, 4))
    assert enc.values.size == 8 * 8 * 4 // 4
    assert np.array_equal(decode(enc), pruned)
