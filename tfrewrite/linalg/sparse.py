"""TFLite sparse tensor encoding (schema ``SparsityParameters``) and pruning masks.

Format recap. ``Tensor.shape`` keeps the dense shape; the buffer holds only the
stored values, in traversal order. For an n-D tensor with a k-D block:

* ``traversal_order`` has n + k entries: a permutation of the n (block-level)
  dims, then a permutation of the k block dims numbered n .. n+k-1;
* ``block_map[i]`` is the original dim that block dim n+i splits; a blocked dim
  d of size D with block size b has D/b entries at block level;
* ``dims[i]`` describes dim ``traversal_order[i]``: DENSE (``dense_size``) or
  SPARSE_CSR (``segments`` / ``indices``, indexed by the linear position of the
  enclosing levels, exactly like CSR row pointers / column indices).

Only 1 x k blocks along the inner dim (1x4, 1x16) are accepted by TFLite kernels;
the encoders here also handle general 2-D blocks, the decoder any layout.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DimMeta:
    """One ``DimensionMetadata``: ``'DENSE'`` (dense_size) or ``'SPARSE_CSR'`` (segments, indices)."""

    format: str
    dense_size: int = 0
    segments: np.ndarray | None = None
    indices: np.ndarray | None = None


@dataclass
class SparseEncoding:
    """Plain-data mirror of a sparse TFLite tensor: buffer values + ``SparsityParameters``."""

    values: np.ndarray
    traversal_order: list[int]
    block_map: list[int]
    dims: list[DimMeta]
    dense_shape: tuple = field(default_factory=tuple)


def smallest_index_dtype(max_value):
    """uint8 / uint16 / int32: the smallest TFLite index vector type holding ``max_value``."""
    max_value = int(max_value)
    if max_value < 0:
        raise ValueError(f"index values are non-negative, got {max_value}")
    if max_value <= 0xFF:
        return np.dtype(np.uint8)
    if max_value <= 0xFFFF:
        return np.dtype(np.uint16)
    if max_value <= 0x7FFFFFFF:
        return np.dtype(np.int32)
    raise ValueError(f"{max_value} does not fit an int32 index vector")


def _csr_dim(counts, indices, dim_size):
    """CSR metadata from per-parent counts; dtypes sized by the largest possible value."""
    segments = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    seg_dtype = smallest_index_dtype(segments[-1])
    idx_dtype = smallest_index_dtype(max(int(dim_size) - 1, 0))
    return DimMeta("SPARSE_CSR", segments=segments.astype(seg_dtype),
                   indices=np.asarray(indices, dtype=np.int64).astype(idx_dtype))


def encode_csr_last_dim(dense):
    """All dims DENSE except the last, which is CSR (unstructured sparsity)."""
    x = np.asarray(dense)
    if x.ndim < 1:
        raise ValueError("need at least a 1-D tensor")
    rows = x.reshape(-1, x.shape[-1])
    mask = rows != 0
    if not mask.any() and mask.size:
        mask.flat[0] = True  # one explicit zero: TFLite rejects a sparse tensor with no stored values
    _, cols = np.nonzero(mask)  # row-major order = traversal order
    dims = [DimMeta("DENSE", dense_size=int(d)) for d in x.shape[:-1]]
    dims.append(_csr_dim(mask.sum(axis=1), cols, x.shape[-1]))
    return SparseEncoding(values=rows[mask].copy(), traversal_order=list(range(x.ndim)),
                          block_map=[], dims=dims, dense_shape=tuple(int(d) for d in x.shape))


def _check_blocks(shape, block):
    if len(shape) != 2:
        raise ValueError(f"need a 2-D matrix, got shape {tuple(shape)}")
    bh, bw = (int(v) for v in block)
    if bh < 1 or bw < 1 or shape[0] % bh or shape[1] % bw:
        raise ValueError(f"block {block} does not divide shape {tuple(shape)}")
    return bh, bw


def _block_view(x, bh, bw):
    """``[rows/bh, cols/bw, bh, bw]`` view of a 2-D array."""
    r, c = x.shape
    return x.reshape(r // bh, bh, c // bw, bw).transpose(0, 2, 1, 3)


def encode_blocks(dense_2d, block=(1, 4)):
    """Block-sparse encoding: CSR over block columns, kept blocks stored whole.

    A block is kept if any element is nonzero (zeros inside it are stored).
    For the usual ``1 x k`` block: traversal ``[0, 1, 2]``, ``block_map [1]``,
    dims DENSE(rows), CSR(block columns), DENSE(k).
    """
    x = np.asarray(dense_2d)
    bh, bw = _check_blocks(x.shape, block)
    blocks = _block_view(x, bh, bw)
    keep = np.any(blocks != 0, axis=(2, 3))
    if not keep.any() and keep.size:
        keep.flat[0] = True  # one explicit zero block: TFLite rejects a sparse tensor with no stored values
    _, bcols = np.nonzero(keep)
    block_dims = [d for d, b in enumerate((bh, bw)) if b > 1]
    grid = (x.shape[0] // bh, x.shape[1] // bw)
    dims = [DimMeta("DENSE", dense_size=grid[0]),
            _csr_dim(keep.sum(axis=1), bcols, grid[1])]
    dims += [DimMeta("DENSE", dense_size=(bh, bw)[d]) for d in block_dims]
    values = blocks[keep]  # [n_kept, bh, bw], row-major inside each block
    return SparseEncoding(values=values.reshape(-1).copy(),
                          traversal_order=list(range(2 + len(block_dims))),
                          block_map=block_dims, dims=dims,
                          dense_shape=tuple(int(d) for d in x.shape))


def decode(enc):
    """Dense array from a :class:`SparseEncoding` (any traversal order / block map).

    Walks the levels in traversal order keeping, per stored position, its linear
    index at the current level and its coordinate in every dim visited so far;
    the last level's linear index is the position in ``values``.
    """
    shape = tuple(int(d) for d in enc.dense_shape)
    n = len(shape)
    order = [int(d) for d in enc.traversal_order]
    block_map = [int(d) for d in enc.block_map]
    if len(order) != n + len(block_map) or len(enc.dims) != len(order):
        raise ValueError("traversal_order, block_map and dims do not match the shape")
    block_size = [1] * n
    for i, d in enumerate(block_map):
        meta = enc.dims[order.index(n + i)]
        if meta.format != "DENSE":
            raise ValueError("only DENSE block dims are supported")
        block_size[d] = int(meta.dense_size)
    sizes = [shape[d] // block_size[d] for d in range(n)] + [block_size[d] for d in block_map]

    linear = np.zeros(1, dtype=np.int64)
    coords = np.zeros((1, n + len(block_map)), dtype=np.int64)
    for dim, meta in zip(order, enc.dims):
        if meta.format == "DENSE":
            size = int(meta.dense_size) if meta.dense_size else sizes[dim]
            parent = np.repeat(np.arange(linear.size), size)
            local = np.tile(np.arange(size, dtype=np.int64), linear.size)
            linear = linear[parent] * size + local
        elif meta.format == "SPARSE_CSR":
            seg = np.asarray(meta.segments, dtype=np.int64)
            idx = np.asarray(meta.indices, dtype=np.int64)
            start, stop = seg[linear], seg[linear + 1]
            counts = stop - start
            parent = np.repeat(np.arange(linear.size), counts)
            # Children of parent p are start[p], start[p]+1, ..., stop[p]-1.
            offsets = np.arange(parent.size) - np.repeat(np.cumsum(counts) - counts, counts)
            linear = start[parent] + offsets
            local = idx[linear]
        else:
            raise ValueError(f"unknown dim format {meta.format!r}")
        coords = coords[parent]
        coords[:, dim] = local

    values = np.asarray(enc.values)
    if linear.size and linear.max() >= values.size:
        raise ValueError("encoding addresses more values than stored")
    out = np.zeros(shape, dtype=values.dtype)
    full = coords[:, :n] * np.asarray(block_size, dtype=np.int64)
    for i, d in enumerate(block_map):
        full[:, d] += coords[:, n + i]
    out[tuple(full.T)] = values[linear]
    return out


def encoded_nbytes(enc):
    """Bytes of stored values plus all segment / index vectors."""
    total = np.asarray(enc.values).nbytes
    for meta in enc.dims:
        if meta.format == "SPARSE_CSR":
            total += np.asarray(meta.segments).nbytes + np.asarray(meta.indices).nbytes
    return int(total)


def block_sparsity(dense_2d, block):
    """Fraction of ``block``-shaped tiles that are entirely zero."""
    x = np.asarray(dense_2d)
    bh, bw = _check_blocks(x.shape, block)
    keep = np.any(_block_view(x, bh, bw) != 0, axis=(2, 3))
    return float(1.0 - keep.mean()) if keep.size else 0.0


def _lowest_mask(scores, sparsity):
    """Bool keep-mask zeroing exactly ``round(sparsity*size)`` lowest scores (ties: lower flat index first)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return ~lowest_count_mask(scores, int(round(sparsity * np.size(scores))))


def lowest_count_mask(scores, count):
    """Bool mask (True = among the lowest) of exactly ``count`` lowest scores, ties by lower flat index:
    deterministic, and a partition rather than a sort (VGG16's first FC layer has 10⁸ weights)."""
    flat = np.asarray(scores).ravel()
    out = np.zeros(flat.size, dtype=bool)
    if count >= flat.size:
        out[:] = True
    elif count > 0:
        threshold = np.partition(flat, count - 1)[count - 1]
        out = flat < threshold
        out[np.flatnonzero(flat == threshold)[:count - int(out.sum())]] = True
    return out.reshape(np.shape(scores))


def prune_magnitude(weights, sparsity):
    """Keep-mask (True = keep) removing the ``round(sparsity*size)`` smallest ``|w|``."""
    w = np.asarray(weights)
    # |w| is exact in the weights' own float type; integers and float16 are compared in float64.
    return _lowest_mask(np.abs(w if w.dtype in (np.float32, np.float64) else w.astype(np.float64)), sparsity)


def prune_blocks(weights_2d, sparsity, block=(1, 4), norm="l2"):
    """Element keep-mask removing ``round(sparsity*n_blocks)`` blocks of lowest norm (``'l2'`` or ``'l1'``)."""
    x = np.asarray(weights_2d, dtype=np.float64)
    bh, bw = _check_blocks(x.shape, block)
    blocks = _block_view(x, bh, bw)
    if norm == "l2":
        scores = np.sqrt(np.sum(blocks * blocks, axis=(2, 3)))
    elif norm == "l1":
        scores = np.sum(np.abs(blocks), axis=(2, 3))
    else:
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
    keep = _lowest_mask(scores, sparsity)
    return np.repeat(np.repeat(keep, bh, axis=0), bw, axis=1)
