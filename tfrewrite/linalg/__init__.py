"""Maths layer: plain functions on numpy arrays (no TFLite knowledge here).

Submodules: ``svd`` (low-rank matrices), ``cp`` (CP decomposition of conv kernels),
``tucker`` (Tucker-2), ``rank`` (parameter counts and rank choice), ``sparse``
(TFLite sparse tensor encoding and pruning masks), ``obs`` (data-aware pruning:
OBS / SparseGPT), ``quant`` (int8 / float16).

Only numpy is imported eagerly; scipy and tensorly are imported inside the functions
that need them so that ``import tfrewrite.linalg`` stays cheap.
"""
from .svd import (
    truncated_svd,
    lowrank_factors,
    rank_for_energy,
    svd_break_even_rank,
    rank_for_ratio,
    whitened_lowrank_factors,
)
from .cp import CPResult, cp3, cp_reconstruct
from .tucker import TuckerResult, tucker2, tucker2_reconstruct
from .rank import (
    cp_params,
    tucker2_params,
    svd_params,
    cp_max_useful_rank,
    tucker2_ranks_for_ratio,
    cp_rank_for_ratio,
    cp_rank_for_energy,
    tucker2_ranks_for_energy,
)
from .sparse import (
    DimMeta,
    SparseEncoding,
    encode_csr_last_dim,
    encode_blocks,
    decode,
    encoded_nbytes,
    smallest_index_dtype,
    block_sparsity,
    prune_magnitude,
    prune_blocks,
)
from .quant import quantize_symmetric_int8, dequantize_int8, to_float16
