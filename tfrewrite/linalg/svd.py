"""Low-rank matrix factorisation: truncated SVD, balanced factors, rank choice."""
import numpy as np

# Below this many elements a full LAPACK SVD is cheap enough (~0.3 s at 1e6).
_FULL_SVD_MAX_ELEMENTS = 1_000_000
# Rows per chunk when streaming a float32 matrix through a float64 product.
_CHUNK_ROWS = 2048

_controller = []


def single_threaded_lapack():
    """Context manager: the BLAS runs on one thread inside (threadpoolctl, when installed; else no-op).

    For the small dense factorisations (eigh, Cholesky, solve of ~100-1000 square
    matrices) that the decompositions call hundreds of times. OpenBLAS threads
    those with many hand-offs between its threads; on a machine with more runnable
    threads than cores every hand-off waits for a time slice, and a 456 x 456
    solve was seen taking 0.28 s (0.04 s on one thread), an eigh of 441 x 441
    3.2 s. The big matrix products stay multi-threaded: they hand off rarely.
    """
    if not _controller:
        try:
            import scipy.linalg  # noqa: F401 -- load scipy's own OpenBLAS first: the controller sees only the
            # libraries loaded when it is made (numpy's alone left scipy's Cholesky and solves on 2 threads)
            from threadpoolctl import ThreadpoolController
            _controller.append(ThreadpoolController())
        except Exception:  # not installed, or no BLAS it knows: leave the threads alone
            _controller.append(None)
    ctl = _controller[0]
    if ctl is None:
        import contextlib
        return contextlib.nullcontext()
    return ctl.limit(limits=1, user_api="blas")


# Work on a layer whose weight has fewer elements than this runs on one BLAS thread (`blas_threads_for`): its
# products are small (a CP sweep of a 128×3×3×128 kernel: ~15M multiply-adds), so OpenBLAS's hand-offs between
# threads dominate; on the shared 2-core machine at load 4-5 the data-free budget of the VGG-style fixture took
# 51-53 s with OpenBLAS's default threads and 6.7-10 s on one thread (7.0 s either way when idle).
SMALL_LAYER_ELEMENTS = 1_000_000


def blas_threads_for(elements: int):
    """Context manager for the work on one layer: one BLAS thread for a small weight (see SMALL_LAYER_ELEMENTS),
    the BLAS's own threads for a large one (its big products gain from them)."""
    if elements < SMALL_LAYER_ELEMENTS:
        return single_threaded_lapack()
    import contextlib
    return contextlib.nullcontext()


def leading_left_vectors(unfolding, count):
    """Up to ``count`` leading left singular vectors of a short, wide matrix, from its small Gram matrix
    (float64), with deterministic signs (each vector's largest-magnitude entry positive)."""
    gram = unfolding @ unfolding.T
    with single_threaded_lapack():
        _, vec = np.linalg.eigh(gram)
    vec = vec[:, ::-1][:, :count]
    idx = np.argmax(np.abs(vec), axis=0)
    return vec * np.sign(vec[idx, np.arange(vec.shape[1])] + 0.0)[None, :]


def squared_norm(a, rows_per_chunk=1024) -> float:
    """‖A‖²_F summed in float64 by row chunks (a float64 copy of a 25088×4096 weight would be 800 MB)."""
    a = np.asarray(a)
    return sum(float(np.sum(np.square(a[i:i + rows_per_chunk], dtype=np.float64)))
               for i in range(0, len(a), rows_per_chunk))


def truncated_svd(matrix, rank, seed=0):
    """Top-``rank`` singular triplets ``(U [m,r], s [r], Vt [r,n])`` in float64.

    Small matrices (< 1e6 elements) or ``rank >= min(shape)/2`` use a full thin SVD.
    Otherwise a seeded randomized subspace iteration on the short side is used
    (:func:`_subspace_svd`): a few power steps in float32, then a float64
    Rayleigh-Ritz step. 4096 x 25088 float32 at rank 64: 7 products with A
    (was up to 19) and no Householder QR; the Frobenius error is within ~1e-4
    (relative) of the optimum on flat spectra, and singular values match LAPACK
    to ~1e-9 relative when the spectrum has a gap after ``rank``. Ritz values
    converge from below: on flat spectra the trailing ones may be slightly low.
    """
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"truncated_svd needs a 2-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    rank = min(rank, min(a.shape))
    if a.size < _FULL_SVD_MAX_ELEMENTS or 2 * rank >= min(a.shape):
        u, s, vt = np.linalg.svd(a.astype(np.float64, copy=False), full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    return _subspace_svd(a, rank, seed=seed)


def _subspace_svd(a, rank, seed=0, oversample=None, max_iter=4, tol=1e-3):
    """Randomized subspace iteration on the short side, float64 Rayleigh-Ritz finish.

    ``v`` (short side, ``n x width``) starts as ``orth(A^T A Omega)`` for a seeded
    Gaussian ``Omega`` and gets at most ``max_iter`` further ``A^T A`` steps. It
    stops early when the sine of the largest angle between successive top-``rank``
    Ritz subspaces is below ``tol`` (singular values then err by about its square).
    A few power steps are all the Frobenius error ``||A - U S V^T||`` needs
    (Halko, Martinsson & Tropp 2011, sec. 4.5); the error was within 0.25 %
    (relative) of 9 steps on VGG16's random-init FC weights (flat spectra, the
    slowest case), 0.5 % of the optimum.

    Costs: each step is two float32 products with A (``2 m n width`` each), unless
    the steps would cost more than forming the ``n x n`` Gram matrix ``A^T A`` once
    (``m n^2``, one float32 SYRK); then the steps multiply by it instead (4096 x
    25088 at rank 704: 5 s for the Gram matrix vs 2.3 s per product). Only the
    short side is orthonormalised, by Cholesky-QR on its small Gram matrix. The
    final Rayleigh-Ritz step is float64 when cheap (``m n width <= 2e9``), else
    float32 products (singular values then err by ~1e-6 of ``s_1``, and ``U`` is
    orthonormal to ~1e-6: what float32 factors hold anyway).
    """
    if a.shape[0] < a.shape[1]:
        # Work on the tall orientation; the transposed view costs nothing.
        v, s, ut = _subspace_svd(a.T, rank, seed, oversample, max_iter, tol)
        return ut.T, s, v.T
    m, n = a.shape
    if oversample is None:
        oversample = max(32, rank // 4)
    width = min(n, rank + oversample)
    a32 = a.astype(np.float32, copy=False)
    gram32 = a32.T @ a32 if 2 * (max_iter + 1) * width > n else None  # SYRK

    def step(v):  # A^T A v
        if gram32 is not None:
            return gram32 @ v.astype(np.float32)
        return a32.T @ (a32 @ v.astype(np.float32))
    rng = np.random.default_rng(seed)
    v = _orthonormal(step(rng.standard_normal((n, width)).astype(np.float32)))
    top_prev = None
    for _ in range(max_iter):
        z = step(v)
        if gram32 is not None:  # cheap steps: take them all, no convergence test
            v = _orthonormal(z, passes=1)  # the span is what counts until the last step
            continue
        # Top Ritz vectors of A^T A on span(v): stop once their span stops moving.
        # Ritz values are useless for this in float32 (noise ~eps*s_1^2), angles are not.
        h = v.T @ z.astype(np.float64)
        with single_threaded_lapack():
            _, w = np.linalg.eigh(0.5 * (h + h.T))
        top = v @ w[:, ::-1][:, :rank]
        v = _orthonormal(z)
        if top_prev is not None:
            with single_threaded_lapack():
                cosines = np.linalg.svd(top_prev.T @ top, compute_uv=False)
            if 1.0 - np.min(cosines) ** 2 <= tol * tol:
                break
        top_prev = top
    if gram32 is not None and max_iter > 0:
        v = _orthonormal(v, passes=1)  # second Cholesky-QR pass of the last step
    # Rayleigh-Ritz on span(v): the SVD of y = A v through its small Gram matrix.
    exact = m * n * width <= 2e9
    if exact:  # float64, A streamed by row chunks (no float64 copy of A)
        y = np.empty((m, width))
        for start in range(0, m, _CHUNK_ROWS):
            y[start:start + _CHUNK_ROWS] = a[start:start + _CHUNK_ROWS].astype(np.float64) @ v
        gram = y.T @ y
    elif gram32 is not None:  # y^T y = v^T (A^T A) v, and y itself is never needed
        gram = v.T @ step(v).astype(np.float64)
    else:
        y = (a32 @ v.astype(np.float32)).astype(np.float64)
        gram = y.T @ y
    with single_threaded_lapack():
        lam, w = np.linalg.eigh(0.5 * (gram + gram.T))
    lam, w = lam[::-1][:rank], w[:, ::-1][:, :rank]
    s = np.sqrt(np.clip(lam, 0.0, None))
    safe = np.where(s > 0, s, 1.0)
    if not exact and gram32 is not None:
        u = (a32 @ ((v @ w) / safe).astype(np.float32)).astype(np.float64)
    else:
        u = (y @ w) / safe
    if exact:
        # The Gram route leaves u orthonormal only to ~eps*(s_1/s_i)^2: one
        # Cholesky-QR pass (cheap here: m x rank) restores it. Huge matrices
        # skip it: their u is orthonormal to float32 precision (~1e-6).
        gram = u.T @ u
        with single_threaded_lapack():
            try:
                inv = np.linalg.inv(np.linalg.cholesky(gram))
            except np.linalg.LinAlgError:
                inv = None
                u, _ = np.linalg.qr(u)
        if inv is not None:
            u = u @ inv.T
    return u, s, (v @ w).T


def _orthonormal(z, passes=2):
    """Orthonormal float64 basis of the columns of the short ``n x width`` block ``z``.

    Cholesky-QR ``passes`` times in float64 (a second pass restores the
    orthogonality the first loses to the Gram matrix's squared condition number;
    two are exact when ``cond(z) < ~1e7``). The triangular factor is inverted (width x width) and
    applied by a matrix product. Householder QR when the Gram matrix is too
    ill-conditioned for that (the second Gram matrix is then far from I).
    """
    q = z.astype(np.float64)
    eye = np.eye(q.shape[1])
    try:
        for attempt in range(passes):
            gram = q.T @ q
            if attempt == 1 and not np.max(np.abs(gram - eye)) < 0.1:
                raise np.linalg.LinAlgError("first Cholesky-QR pass too inaccurate")
            with single_threaded_lapack():
                inv = np.linalg.inv(np.linalg.cholesky(gram))
            q = q @ inv.T  # q R^{-1}, R = chol^T
        if np.all(np.isfinite(q)):
            return q
    except np.linalg.LinAlgError:
        pass
    with single_threaded_lapack():
        q, _ = np.linalg.qr(z.astype(np.float64))
    return q


def lowrank_factors(matrix, rank):
    """Factors ``left [m,r]``, ``right [r,n]`` (float32) with ``left @ right ~= matrix``.

    Each singular value is split as sqrt into both sides so the two factors have
    similar magnitudes (safer for float32 / later quantisation).
    """
    u, s, vt = truncated_svd(matrix, rank)
    root = np.sqrt(s)
    return (u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32)


def rank_for_energy(singular_values, energy):
    """Smallest r with ``sum(s[:r]**2) / sum(s**2) >= energy``.

    ``singular_values`` must be *all* of them (the full spectrum): the denominator
    is the total energy. A 1e-12 relative slack absorbs rounding so that
    ``energy=1.0`` returns the numerical rank. Returns at least 1.
    """
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)).ravel())[::-1]
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    if s.size == 0:
        raise ValueError("no singular values given")
    cumulative = np.cumsum(s * s)
    total = cumulative[-1]
    if total == 0.0:
        return 1
    r = int(np.searchsorted(cumulative, energy * total * (1.0 - 1e-12), side="left")) + 1
    return max(1, min(r, s.size))


def svd_break_even_rank(m, n):
    """Largest r with ``r*(m+n) < m*n`` (above it the factors are not smaller)."""
    return (int(m) * int(n) - 1) // (int(m) + int(n))


def rank_for_ratio(m, n, ratio):
    """Rank whose factor params ``r*(m+n)`` are about ``m*n/ratio`` (floor, >= 1)."""
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    return max(1, int(np.floor(int(m) * int(n) / (ratio * (int(m) + int(n))))))


def whitened_lowrank_factors(matrix, input_cov, rank, damping=1e-6):
    """Rank-r ``(left [m,r], right [r,n])`` minimising ``||(W - left@right) S||_F``.

    ``W`` maps inputs x (length n) to outputs ``W @ x``; ``input_cov`` is the
    second-moment matrix ``E[x x^T]`` and ``S S^T = input_cov + damping*mean(diag)*I``,
    so the objective is the expected squared output error on those inputs.
    With ``C`` the Cholesky factor the optimum is exact: the best rank-r
    approximation ``M_r`` of ``M = W C``, mapped back as ``M_r C^{-1}``.
    The damping keeps ``C^{-1}`` bounded when some input directions never occur.
    """
    from scipy import linalg as sla

    w = np.asarray(matrix, dtype=np.float64)
    cov = np.asarray(input_cov, dtype=np.float64)
    n = w.shape[1]
    if cov.shape != (n, n):
        raise ValueError(f"input_cov must be [{n},{n}], got {cov.shape}")
    cov = 0.5 * (cov + cov.T)
    scale = float(np.mean(np.diag(cov)))
    if not scale > 0.0:
        scale = 1.0
    cov = cov + damping * scale * np.eye(n)
    try:
        c = sla.cholesky(cov, lower=True)  # cov = c @ c.T
        m_ = w @ c
        u, s, vt = truncated_svd(m_, rank)
        root = np.sqrt(s)
        # right = diag(root) vt c^{-1}  <=>  c^T right^T = vt^T diag(root)
        right = sla.solve_triangular(c, (root[:, None] * vt).T, lower=True, trans="T").T
    except np.linalg.LinAlgError:
        # Not numerically positive definite even after damping: eigh and clip.
        lam, vec = np.linalg.eigh(cov)
        lam = np.maximum(lam, damping * scale)
        m_ = (w @ vec) * np.sqrt(lam)
        u, s, vt = truncated_svd(m_, rank)
        root = np.sqrt(s)
        right = ((root[:, None] * vt) / np.sqrt(lam)) @ vec.T
    left = u * root
    return left.astype(np.float32), right.astype(np.float32)
