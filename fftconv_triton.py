"""
The long convolution of hyena.fftconv fused into Triton kernels, the FFTs done as matmuls on tensor cores
(impl 'triton': hyena.FFTCONV_IMPL = 'triton' or fftconv(..., impl='triton')). Opt-in and CUDA only; it takes
L <= TRITON_MAX_N / 2 and hyena.fftconv falls back to its 'fast' path everywhere else. Measured on an H200
(BENCHMARKS.md): at L = 1K, B*L = 64K, d = 768 fwd+bwd 3.1 ms (tf32) / 1.6 ms (bf16) against cuFFT's 4.5 ms.

FlashFFTConv's idea (Fu et al. 2023, arXiv:2311.05908) in a two-factor Monarch form. For N = N1 * N2, with the
signal x[n1 * N2 + n2] seen as an (N1, N2) matrix and frequencies k = k1 + N1 * k2:
    X[k1, k2] = ((F_N1 @ x) * T) @ F_N2,        T[k1, n2] = exp(-2 pi i k1 n2 / N)   (twiddles)
    x[n1, n2] = (conj(F_N1) @ ((X @ conj(F_N2)) * conj(T))) / N
so a row's FFT, the product with the filter's spectrum (precomputed in the same (k1, k2) layout) and the
inverse FFT are 8 small real matmuls with everything in registers: one read of u, one write of y. N >= 2L, so
the input is zero in rows n1 >= N1/2 (stage one uses half of F_N1) and only output rows n1 < N1/2 are kept
(the last stage computes half, real part only). The backward uses the same kernel with conj(K) for grad_u (the
correlation), and a second kernel for grad_k = sum_b IDFT(conj(U_b) G_b) and grad_D = sum_b,t g u, reduced over
the batch in registers.
"""
import contextlib
import math
import os

import torch

TRITON_DOT = 'tf32'     # operand precision of the Triton kernels' matmuls: 'tf32', 'bf16' or 'ieee' (exact fp32)
TRITON_MAX_N = 4096     # largest FFT size the Triton kernel takes (registers); longer inputs use 'fast'
TRITON_NUM_WARPS = 0    # 0: by FFT size
TRITON_ROWS = 0         # batch rows per program (0: enough programs to fill the GPU)
_TRITON_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'  # CPU tests run the kernels interpreted
_TRITON_POISON = False  # tests: fill kernel outputs with NaN first, so an unwritten element shows
_MFFT_CONSTS = {}

try:
    import triton
    import triton.language as tl
except Exception:  # not installed (CPU machines), or broken: the fallback is the 'fast' path
    triton = tl = None

if triton is not None:
    @triton.jit
    def _mfft_dot(a, b, PREC: tl.constexpr):
        if PREC == 'bf16':
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            out = tl.dot(a, b, input_precision=PREC, out_dtype=tl.float32)
        return out

    @triton.jit
    def _mfft_forward(xr, xi, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC: tl.constexpr):
        """DFT of a complex row x = xr + i xi whose only nonzero entries are its first N/2, given as
        (N1/2, N2) matrices: (N1, N2) re, im in the [k1, k2] layout."""
        ar = _mfft_dot(F1hr, xr, PREC) - _mfft_dot(F1hi, xi, PREC)
        ai = _mfft_dot(F1hr, xi, PREC) + _mfft_dot(F1hi, xr, PREC)
        br = ar * Tr - ai * Ti
        bi = ar * Ti + ai * Tr
        cr = _mfft_dot(br, F2r, PREC) - _mfft_dot(bi, F2i, PREC)
        ci = _mfft_dot(br, F2i, PREC) + _mfft_dot(bi, F2r, PREC)
        return cr, ci

    @triton.jit
    def _mfft_inverse_stage2(yr, yi, Tr, Ti, F2r, F2i, PREC: tl.constexpr):
        """(y @ conj(F_N2)) * conj(T): the first half of the inverse DFT."""
        dr = _mfft_dot(yr, F2r, PREC) + _mfft_dot(yi, F2i, PREC)
        di = _mfft_dot(yi, F2r, PREC) - _mfft_dot(yr, F2i, PREC)
        return dr * Tr + di * Ti, di * Tr - dr * Ti

    @triton.jit
    def _mfft_load_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1: tl.constexpr, N2: tl.constexpr):
        """The DFT matrices and twiddles of _mfft_consts: F_N1's first N1/2 columns (stage one of the forward:
        the input's upper half is zero) and first N1/2 rows (last stage of the inverse: only the first half of
        the output is kept), F_N2, T; and t, the time index of a row seen as an (N1/2, N2) matrix."""
        H1: tl.constexpr = N1 // 2
        i1 = tl.arange(0, N1)
        h1 = tl.arange(0, H1)
        i2 = tl.arange(0, N2)
        F1hr = tl.load(f1r_ptr + i1[:, None] * N1 + h1[None, :])
        F1hi = tl.load(f1i_ptr + i1[:, None] * N1 + h1[None, :])
        F1tr = tl.load(f1r_ptr + h1[:, None] * N1 + i1[None, :])
        F1ti = tl.load(f1i_ptr + h1[:, None] * N1 + i1[None, :])
        F2r = tl.load(f2r_ptr + i2[:, None] * N2 + i2[None, :])
        F2i = tl.load(f2i_ptr + i2[:, None] * N2 + i2[None, :])
        mat = i1[:, None] * N2 + i2[None, :]
        t = h1[:, None] * N2 + i2[None, :]  # time index of the (N1/2, N2) input / output layout
        return F1hr, F1hi, F1tr, F1ti, F2r, F2i, tl.load(tr_ptr + mat), tl.load(ti_ptr + mat), t

    @triton.jit
    def _mfft_row_pair(b0, has_second, c, B, C, L, tmask):
        """Offsets of rows (b0, c) and (b0 + 1, c) of a contiguous (B, C, L) tensor, and their load masks."""
        base0 = (b0 * C + c).to(tl.int64) * L
        return base0, base0 + C * L, tmask & (b0 < B), tmask & (b0 + 1 < B) & has_second

    @triton.jit
    def _mfft_conv_kernel(u_ptr, y_ptr, kr_ptr, ki_ptr, d_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                          B, C, L, ROWS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr):
        """y[b, c] = IDFT(DFT(u[b, c]) * K[c])[:L] + d[c] u[b, c], for one channel c and ROWS batch rows.
        Two rows at a time share one complex FFT: with a real filter, conv(u_b + i u_b', k) =
        conv(u_b, k) + i conv(u_b', k), so the real and imaginary parts of the result are the two outputs."""
        c = tl.program_id(0)
        pb = tl.program_id(1)
        F1hr, F1hi, F1tr, F1ti, F2r, F2i, Tr, Ti, t = _mfft_load_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr,
                                                                        tr_ptr, ti_ptr, N1, N2)
        tmask = t < L
        mat = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
        Kr = tl.load(kr_ptr + c * (N1 * N2) + mat)
        Ki = tl.load(ki_ptr + c * (N1 * N2) + mat)
        dc = tl.load(d_ptr + c)
        for r in range(0, ROWS, 2):
            base0, base1, m0, m1 = _mfft_row_pair(pb * ROWS + r, r + 1 < ROWS, c, B, C, L, tmask)
            xr = tl.load(u_ptr + base0 + t, mask=m0, other=0.0).to(tl.float32)
            xi = tl.load(u_ptr + base1 + t, mask=m1, other=0.0).to(tl.float32)
            cr, ci = _mfft_forward(xr, xi, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC)
            er, ei = _mfft_inverse_stage2(cr * Kr - ci * Ki, cr * Ki + ci * Kr, Tr, Ti, F2r, F2i, PREC)
            # last stage, output rows n1 < N1/2: conj(F_N1) @ e, real part -> row b0, imaginary -> row b0 + 1
            y0 = (_mfft_dot(F1tr, er, PREC) + _mfft_dot(F1ti, ei, PREC)) * (1.0 / (N1 * N2)) + dc * xr
            y1 = (_mfft_dot(F1tr, ei, PREC) - _mfft_dot(F1ti, er, PREC)) * (1.0 / (N1 * N2)) + dc * xi
            tl.store(y_ptr + base0 + t, y0.to(y_ptr.dtype.element_ty), mask=m0)
            tl.store(y_ptr + base1 + t, y1.to(y_ptr.dtype.element_ty), mask=m1)

    @triton.jit
    def _mfft_corr_kernel(u_ptr, g_ptr, gk_ptr, gd_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                          B, C, L, Lk, ROWS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr):
        """Partial sums over this program's ROWS batch rows, channel c: gk[pb, c] = IDFT(sum conj(U) G)[:Lk]
        (the filter's gradient) and gd[pb, c] = sum g u (the skip term's). Rows go in pairs: with
        U = DFT(u_b + i u_b') and G = DFT(g_b + i g_b'), conj(U) G = (conj(U_b) G_b + conj(U_b') G_b') + i X,
        where X is the spectrum of a real signal too, so Re(IDFT(.)) is the sum of the two correlations."""
        c = tl.program_id(0)
        pb = tl.program_id(1)
        F1hr, F1hi, F1tr, F1ti, F2r, F2i, Tr, Ti, t = _mfft_load_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr,
                                                                        tr_ptr, ti_ptr, N1, N2)
        tmask = t < L
        sr = tl.zeros([N1, N2], dtype=tl.float32)
        si = tl.zeros([N1, N2], dtype=tl.float32)
        H1: tl.constexpr = N1 // 2
        dd = tl.zeros([H1, N2], dtype=tl.float32)
        for r in range(0, ROWS, 2):
            base0, base1, m0, m1 = _mfft_row_pair(pb * ROWS + r, r + 1 < ROWS, c, B, C, L, tmask)
            ur0 = tl.load(u_ptr + base0 + t, mask=m0, other=0.0).to(tl.float32)
            ui0 = tl.load(u_ptr + base1 + t, mask=m1, other=0.0).to(tl.float32)
            gr0 = tl.load(g_ptr + base0 + t, mask=m0, other=0.0).to(tl.float32)
            gi0 = tl.load(g_ptr + base1 + t, mask=m1, other=0.0).to(tl.float32)
            ur, ui = _mfft_forward(ur0, ui0, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC)
            gr, gi = _mfft_forward(gr0, gi0, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC)
            sr += ur * gr + ui * gi
            si += ur * gi - ui * gr
            dd += ur0 * gr0 + ui0 * gi0
        er, ei = _mfft_inverse_stage2(sr, si, Tr, Ti, F2r, F2i, PREC)
        gk = (_mfft_dot(F1tr, er, PREC) + _mfft_dot(F1ti, ei, PREC)) * (1.0 / (N1 * N2))
        out = (pb * C + c).to(tl.int64)
        tl.store(gk_ptr + out * Lk + t, gk, mask=t < Lk)
        tl.store(gd_ptr + out, tl.sum(tl.sum(dd, axis=1), axis=0))


def _mfft_plan(L):
    """FFT size N >= 2L (a power of two, >= 512 so every matmul dimension is >= 16) and N = N1 * N2, N1 >= N2."""
    N = max(512, 2 ** math.ceil(math.log2(2 * L)))
    m = N.bit_length() - 1
    N1 = 2 ** ((m + 1) // 2)
    return N, N1, N // N1


def _mfft_consts(N1, N2, device):
    """DFT matrices F_N1, F_N2 and twiddles T (real and imaginary parts, fp32), cached per device."""
    key = (N1, N2, str(device))
    if key not in _MFFT_CONSTS:
        N = N1 * N2
        j1, j2 = torch.arange(N1, dtype=torch.float64), torch.arange(N2, dtype=torch.float64)
        a1 = -2 * math.pi * torch.outer(j1, j1).remainder(N1) / N1
        a2 = -2 * math.pi * torch.outer(j2, j2).remainder(N2) / N2
        at = -2 * math.pi * torch.outer(j1, j2) / N
        _MFFT_CONSTS[key] = tuple(t.float().contiguous().to(device) for t in
                                  (a1.cos(), a1.sin(), a2.cos(), a2.sin(), at.cos(), at.sin()))
    return _MFFT_CONSTS[key]


def _mfft_launch(B, C, N):
    """Batch rows per program and warps per program: enough programs to fill the GPU a few times over."""
    rows = TRITON_ROWS or 2 * max(1, -(-B * C // 4096))  # even: rows go through the FFT in pairs
    warps = TRITON_NUM_WARPS or (4 if N <= 1024 else 8)
    return min(rows, B), warps


def applies(u, k, D):
    return (triton is not None and u.dim() == 3 and k.dim() == 2 and k.shape[0] == u.shape[1]
            and (D is None or tuple(D.shape) == (u.shape[1],))
            and u.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (u.is_cuda or _TRITON_INTERPRET) and _mfft_plan(u.shape[-1])[0] <= TRITON_MAX_N)


def _mfft_conv_impl(u, kr, ki, d, prec, rows, warps):
    B, C, L = u.shape
    N1, N2 = kr.shape[1], kr.shape[2]
    y = torch.full_like(u, float('nan')) if _TRITON_POISON else torch.empty_like(u)
    grid = (C, -(-B // rows))
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _mfft_conv_kernel[grid](u, y, kr, ki, d, *_mfft_consts(N1, N2, u.device), B, C, L, rows,
                                N1=N1, N2=N2, PREC=prec, num_warps=warps)
    return y


def _mfft_corr_impl(u, g, N1, N2, Lk, prec, rows, warps):
    B, C, L = u.shape
    nb = -(-B // rows)
    fill = float('nan') if _TRITON_POISON else 0.0
    gk = torch.full((nb, C, Lk), fill, device=u.device, dtype=torch.float32)
    gd = torch.full((nb, C), fill, device=u.device, dtype=torch.float32)
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _mfft_corr_kernel[(C, nb)](u, g, gk, gd, *_mfft_consts(N1, N2, u.device), B, C, L, Lk, rows,
                                   N1=N1, N2=N2, PREC=prec, num_warps=warps)
    return gk, gd


if triton is not None and not hasattr(torch.ops.hyena, 'mfft_conv'):
    # Custom ops: opaque to torch.compile, which fuses the gates around them but never traces the launches.
    @torch.library.custom_op('hyena::mfft_conv', mutates_args=())
    def _mfft_conv_op(u: torch.Tensor, kr: torch.Tensor, ki: torch.Tensor, d: torch.Tensor, prec: str,
                      rows: int, warps: int) -> torch.Tensor:
        return _mfft_conv_impl(u, kr, ki, d, prec, rows, warps)

    @_mfft_conv_op.register_fake
    def _(u, kr, ki, d, prec, rows, warps):
        return torch.empty_like(u)

    @torch.library.custom_op('hyena::mfft_corr', mutates_args=())
    def _mfft_corr_op(u: torch.Tensor, g: torch.Tensor, n1: int, n2: int, lk: int, prec: str, rows: int,
                      warps: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _mfft_corr_impl(u, g, n1, n2, lk, prec, rows, warps)

    @_mfft_corr_op.register_fake
    def _(u, g, n1, n2, lk, prec, rows, warps):
        nb = -(-u.shape[0] // rows)
        return u.new_empty(nb, u.shape[1], lk, dtype=torch.float32), u.new_empty(nb, u.shape[1], dtype=torch.float32)


class MonarchFFTConv(torch.autograd.Function):
    """fftconv through the Triton kernels (impl 'triton'): u (B, C, L) contiguous, k (C, Lk), D (C,) or None.
    Saves only u and the filter's spectrum; the backward recomputes the row FFTs inside the kernels."""

    @staticmethod
    def forward(ctx, u, k, D):
        B, C, L = u.shape
        N, N1, N2 = _mfft_plan(L)
        rows, warps = _mfft_launch(B, C, N)
        with torch.autocast(device_type=u.device.type, enabled=False):
            k_f = torch.fft.fft(k.float(), n=N).view(C, N2, N1).transpose(1, 2)  # [c, k1, k2] = K[k1 + N1 k2]
            kr, ki = k_f.real.contiguous(), k_f.imag.contiguous()
            d = D.float().contiguous() if D is not None else torch.zeros(C, device=u.device, dtype=torch.float32)
            u = u.contiguous()
            y = torch.ops.hyena.mfft_conv(u, kr, ki, d, TRITON_DOT, rows, warps)
        ctx.save_for_backward(u, kr, ki, d)
        ctx.cfg = (N1, N2, k.shape[-1], TRITON_DOT, rows, warps, k.dtype, None if D is None else D.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, kr, ki, d = ctx.saved_tensors
        N1, N2, Lk, prec, rows, warps, k_dtype, d_dtype = ctx.cfg
        g = grad_y.to(u.dtype).contiguous()
        grad_u = grad_k = grad_D = None
        if ctx.needs_input_grad[0]:  # the adjoint of a convolution with k is a correlation: conj(K)
            grad_u = torch.ops.hyena.mfft_conv(g, kr, -ki, d, prec, rows, warps)
        if ctx.needs_input_grad[1] or (d_dtype is not None and ctx.needs_input_grad[2]):
            gk, gd = torch.ops.hyena.mfft_corr(u, g, N1, N2, Lk, prec, rows, warps)
            grad_k = gk.sum(0).to(k_dtype)
            grad_D = gd.sum(0).to(d_dtype) if d_dtype is not None else None
        return grad_u, grad_k, grad_D
