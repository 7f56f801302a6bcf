"""Dense Cholesky factor and inverse by recursive blocking, in matrix products.

The arrow layout's tail (the smaller factor of a crossed design: 948 to 6,708
levels on the scale ladder) is one dense symmetric matrix ``S``; an evaluation
with a gradient needs its factor ``L`` and its inverse ``S^-1``. On XLA:CPU the
LAPACK kernels behind ``jnp.linalg.cholesky`` and ``solve_triangular`` run on
one thread (tmbx keeps jaxlib's LAPACK single-threaded, `tmbx._config`), at
about a quarter of the speed of XLA's own multi-threaded matrix product, and
XLA has no ``trtri``/``lauum`` at all. So the three steps are written here as
LAPACK writes its recursive variants (``potrf``, ``trtri``, ``lauum``): 2 x 2
blocks down to `BLOCK`, every off-diagonal update a matrix product, and the
triangular operands split again so that no product multiplies a triangle of
zeros. No library offers this for JAX. Measured on a 2-core machine: factor
and inverse at order 3,000 in 0.5-0.6 s, against 0.8-0.9 s for LAPACK's
``dpotrf`` (through XLA) plus ``dpotri`` (on the host, both cores); at 1,142
(InstEval's tail) about 0.05 s against 0.15 s for ``dpotrf`` plus
``cho_solve(L, I)``.

The products are arranged so that XLA never contracts the leading axis of both
operands (``A.T @ B``), which it runs at half the speed of ``A @ B.T``: the
inverse is kept as ``M = L^-T`` (upper triangular) rather than ``L^-1``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

#: the order at and below which a block goes to LAPACK (and products are plain)
BLOCK = 512
# Every level of the recursion is unrolled into the program, and XLA's compile
# time grows with the number of blocks: at 512 rather than 256 the factor, the
# inverse and its product compile in 1.2 s instead of 2.7 s at order 3,000
# (0.17 s instead of 0.47 s at 948) and run 3% slower there (0.26 s), as fast at
# 1,142; the 1e6-row Bernoulli ladder's fit compiles in 7.5 s instead of 8.6 s.


def chol_with_inverse(A):
    """``(L, M)``: the lower Cholesky factor of the symmetric positive definite
    ``A`` (symmetrized first, as ``_chol`` does) and
    ``M = L^-T``, upper triangular, so that ``A^-1 = M M'`` (`upper_gram`).

    With ``A = [[A11, A21'], [A21, A22]]``: ``L11 = chol(A11)``,
    ``L21 = A21 L11^-T``, ``L22 = chol(A22 - L21 L21')`` and
    ``M12 = -M11 L21' M22``. A matrix that is not positive definite gives NaN
    pivots on the diagonal of ``L``, as LAPACK's factor does through JAX."""
    A = 0.5 * (A + A.T)
    return _chol_inv(A)


def _chol_inv(A):
    n = A.shape[0]
    if n <= BLOCK:
        L = jnp.linalg.cholesky(A)
        return L, solve_triangular(L, jnp.eye(n, dtype=A.dtype), lower=True, trans=1)
    h = n // 2
    L11, M11 = _chol_inv(A[:h, :h])
    L21 = mul_upper(A[h:, :h], M11)
    L22, M22 = _chol_inv(A[h:, h:] - gram(L21))
    M12 = -mul_upper(upper_mul_t(M11, L21), M22)
    zero = jnp.zeros((h, n - h), A.dtype)
    return jnp.block([[L11, zero], [L21, L22]]), jnp.block([[M11, M12], [zero.T, M22]])


def upper_inverse(U):
    """``U^-1`` of an upper-triangular ``U`` (LAPACK's ``trtri``):
    ``[[A, C], [0, B]]^-1 = [[A^-1, -A^-1 C B^-1], [0, B^-1]]``."""
    n = U.shape[0]
    if n <= BLOCK:
        return solve_triangular(U, jnp.eye(n, dtype=U.dtype), lower=False)
    h = n // 2
    Ai, Bi = upper_inverse(U[:h, :h]), upper_inverse(U[h:, h:])
    X = -mul_upper(upper_mul(Ai, U[:h, h:]), Bi)
    return jnp.block([[Ai, X], [jnp.zeros((n - h, h), U.dtype), Bi]])


def upper_mul(U, X):
    """``U X`` for an upper-triangular ``U`` (n x n) and ``X`` (n x k)."""
    n = U.shape[0]
    if n <= BLOCK:
        return U @ X
    h = n // 2
    top = upper_mul(U[:h, :h], X[:h]) + U[:h, h:] @ X[h:]
    return jnp.concatenate([top, upper_mul(U[h:, h:], X[h:])], axis=0)


def upper_mul_t(U, X):
    """``U X'`` for an upper-triangular ``U`` (n x n) and ``X`` (k x n)."""
    n = U.shape[0]
    if n <= BLOCK:
        return U @ X.T
    h = n // 2
    top = upper_mul_t(U[:h, :h], X[:, :h]) + U[:h, h:] @ X[:, h:].T
    bottom = upper_mul_t(U[h:, h:], X[:, h:])
    return jnp.concatenate([top, bottom], axis=0)


def mul_upper(X, U):
    """``X U`` for an upper-triangular ``U`` (n x n) and ``X`` (k x n)."""
    n = U.shape[0]
    if n <= BLOCK:
        return X @ U
    h = n // 2
    left = mul_upper(X[:, :h], U[:h, :h])
    right = X[:, :h] @ U[:h, h:] + mul_upper(X[:, h:], U[h:, h:])
    return jnp.concatenate([left, right], axis=1)


def mul_upper_t(X, U):
    """``X U'`` for an upper-triangular ``U`` (n x n) and ``X`` (k x n)."""
    n = U.shape[0]
    if n <= BLOCK:
        return X @ U.T
    h = n // 2
    left = mul_upper_t(X[:, :h], U[:h, :h]) + X[:, h:] @ U[:h, h:].T
    right = mul_upper_t(X[:, h:], U[h:, h:])
    return jnp.concatenate([left, right], axis=1)


def gram(X):
    """``X X'`` (symmetric), its off-diagonal blocks computed once."""
    n = X.shape[0]
    if n <= BLOCK:
        return X @ X.T
    h = n // 2
    off = X[h:] @ X[:h].T
    return jnp.block([[gram(X[:h]), off.T], [off, gram(X[h:])]])


def upper_gram(M):
    """``M M'`` of an upper-triangular ``M`` (LAPACK's ``lauum``): with
    ``M = [[M11, M12], [0, M22]]``, ``[[M11 M11' + M12 M12', M12 M22'], [., M22 M22']]``."""
    n = M.shape[0]
    if n <= BLOCK:
        return M @ M.T
    h = n // 2
    X = M[:h, h:]
    top = upper_gram(M[:h, :h]) + gram(X)
    off = mul_upper_t(X, M[h:, h:])
    return jnp.block([[top, off], [off.T, upper_gram(M[h:, h:])]])
