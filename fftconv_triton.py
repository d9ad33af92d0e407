"""
The long convolution of hyena.fftconv fused into Triton kernels, the FFTs done as matmuls on tensor cores
(impl 'triton': hyena.FFTCONV_IMPL = 'triton' or fftconv(..., impl='triton')). Opt-in and CUDA only (CPU tests
run it in Triton's interpreter; elsewhere hyena.fftconv uses its 'fast' path). Two paths: one kernel per
direction up to L = TRITON_MAX_N / 2 (monarch_forward / _backward), the four-step FFT (four_step_forward /
_backward, at the end) beyond; hyena._Conv and hyena.GatedConv call them. Measured on an H200 (BENCHMARKS.md),
B*L = 64K, d = 768, bf16, fwd+bwd: 1.1 ms at L = 1K, 1.9 ms at 16K, 3.3 ms at 64K, against cuFFT's 4.6, 5.7 and
9.5 ms.

FlashFFTConv's idea (Fu et al. 2023, arXiv:2311.05908) in a two-factor Monarch form. For N = N1 * N2, with the
signal x[n1 * N2 + n2] seen as an (N1, N2) matrix and frequencies k = k1 + N1 * k2:
    X[k1, k2] = ((F_N1 @ x) * T) @ F_N2,        T[k1, n2] = exp(-2 pi i k1 n2 / N)   (twiddles)
    x[n1, n2] = (conj(F_N1) @ ((X @ conj(F_N2)) * conj(T))) / N
so a row's FFT, the product with the filter's spectrum (in the same (k1, k2) layout, from the same forward FFT
run on the filter's rows by a small kernel) and the inverse FFT are 8 small real matmuls with everything in
registers: one read of u, one write of y. N >= 2L, so the input is zero in rows n1 >= N1/2 (stage one uses half
of F_N1) and only output rows n1 < N1/2 are kept (the last stage computes half, real part only). The backward is
one kernel too: it transforms g = dL/dy once and writes grad_u = IDFT(G conj(K)) + D g (the correlation), and
sums grad_k = sum_b IDFT(conj(U_b) G_b) and grad_D = sum_b,t g u over the batch in registers (up to FFT size
TRITON_MERGED_BWD_MAX_N; above it grad_u is a second kernel, the forward's with conj(K), because the merged one
spills registers there).
"""
import concurrent.futures
import contextlib
import functools
import math
import os

import torch

TRITON_DOTS = ('tf32', 'bf16', 'ieee')  # what TRITON_DOT may be (config keys and bench variants check it)
TRITON_DOT = 'tf32'     # operand precision of the Triton kernels' matmuls: 'tf32', 'bf16' or 'ieee' (exact fp32)
# The filter spectrum's dot precision, by TRITON_DOT: tf32 (1.2e-3 of max |K|, where bf16 dots gave 3.3e-3 for 30%
# less time); 'ieee' stays exact, and slow at FFT size 4096 (2.1 ms for 768 channels on the H200: it spills)
SPECTRUM_DOT = dict(tf32='tf32', bf16='tf32', ieee='ieee')
TRITON_MAX_N = 4096     # largest FFT size of the one-kernel path (registers); longer inputs take the four-step path
TRITON_INNER_N = 0      # four-step path: row FFT length Ni, N = 2H * Ni (0: by N, see _four_step_plan)
TRITON_NUM_WARPS = 0    # 0: by path, 4 one-kernel, 2 four-step (_mfft_launch; 8 were 2x slower on the H200)
TRITON_ROWS = 0         # rows per program (0: 16, or fewer when there are few)
SPECTRUM_CHANNELS = 2   # filter channels per program of the spectrum kernel, which load the DFT constants once (at
#                         N = 2048, 768 channels, on an H100: 8.3 us at 2, 9.7 at 4; 17.1 at one channel before)
TRITON_MERGED_BWD_MAX_N = 2048  # FFT sizes up to this compute grad u in the grad-k kernel too (one transform of g;
#                                 at 4096 its registers spill: 2x slower than a second kernel on the H200)
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
        return _mfft_forward_stage2(ar, ai, Tr, Ti, F2r, F2i, PREC)

    @triton.jit
    def _mfft_forward_stage2(ar, ai, Tr, Ti, F2r, F2i, PREC: tl.constexpr):
        """(a * T) @ F_N2, the second half of the forward DFT: (re, im)."""
        br = ar * Tr - ai * Ti
        bi = ar * Ti + ai * Tr
        return (_mfft_dot(br, F2r, PREC) - _mfft_dot(bi, F2i, PREC),
                _mfft_dot(br, F2i, PREC) + _mfft_dot(bi, F2r, PREC))

    @triton.jit
    def _mfft_inverse_stage2(yr, yi, Tr, Ti, F2r, F2i, PREC: tl.constexpr):
        """(y @ conj(F_N2)) * conj(T): the first half of the inverse DFT."""
        dr = _mfft_dot(yr, F2r, PREC) + _mfft_dot(yi, F2i, PREC)
        di = _mfft_dot(yi, F2r, PREC) - _mfft_dot(yr, F2i, PREC)
        return dr * Tr + di * Ti, di * Tr - dr * Ti

    @triton.jit
    def _mfft_inverse_stage1(er, ei, F1r, F1i, PREC: tl.constexpr):
        """conj(F_N1) @ e, the last stage of the (unnormalized) inverse DFT: (re, im); F_N1 may be its first rows."""
        return (_mfft_dot(F1r, er, PREC) + _mfft_dot(F1i, ei, PREC),
                _mfft_dot(F1r, ei, PREC) - _mfft_dot(F1i, er, PREC))

    @triton.jit
    def _mfft_load_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1: tl.constexpr, N2: tl.constexpr):
        """The DFT matrices of _mfft_consts: F_N1's first N1/2 columns (stage one of the forward: the input's upper
        half is zero) and first N1/2 rows (last stage of the inverse: only the first half of the output is kept),
        F_N2, the twiddles T; the row-major index of (N1, N2) and the time index of the (N1/2, N2) input / output."""
        H1: tl.constexpr = N1 // 2
        i1 = tl.arange(0, N1)
        h1 = tl.arange(0, H1)
        i2 = tl.arange(0, N2)
        mat = i1[:, None] * N2 + i2[None, :]
        return (tl.load(f1r_ptr + i1[:, None] * N1 + h1[None, :]), tl.load(f1i_ptr + i1[:, None] * N1 + h1[None, :]),
                tl.load(f1r_ptr + h1[:, None] * N1 + i1[None, :]), tl.load(f1i_ptr + h1[:, None] * N1 + i1[None, :]),
                tl.load(f2r_ptr + i2[:, None] * N2 + i2[None, :]), tl.load(f2i_ptr + i2[:, None] * N2 + i2[None, :]),
                tl.load(tr_ptr + mat), tl.load(ti_ptr + mat), mat, h1[:, None] * N2 + i2[None, :])

    @triton.jit
    def _mfft_row_pair(pb, r, ROWS: tl.constexpr, c, B, C, L, t):
        """Offsets of the rows (b0, c) and (b0 + 1, c) of a contiguous (B, C, L) tensor, b0 = pb * ROWS + r, and
        their load masks (an odd batch, or an odd ROWS, leaves the second row out)."""
        b0 = pb * ROWS + r
        base0 = (b0 * C + c).to(tl.int64) * L
        # a row outside the batch (or this program's rows) gets length 0: one comparison per mask, since Triton
        # 3.9's interpreter turns a tensor & a scalar bool into an int32 mask, which tl.load rejects
        m0 = t < tl.where(b0 < B, L, 0)
        m1 = t < tl.where(b0 + 1 < tl.minimum(B, (pb + 1) * ROWS), L, 0)
        return base0, base0 + C * L, m0, m1

    @triton.jit
    def _mfft_conv_kernel(u_ptr, y_ptr, kr_ptr, ki_ptr, d_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                          B, C, L, ROWS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr):
        """y[b, c] = IDFT(DFT(u[b, c]) * K[c])[:L] + d[c] u[b, c], for one channel c and ROWS batch rows.
        Two rows at a time share one complex FFT: with a real filter, conv(u_b + i u_b', k) =
        conv(u_b, k) + i conv(u_b', k), so the real and imaginary parts of the result are the two outputs."""
        c = tl.program_id(0)
        pb = tl.program_id(1)
        F1hr, F1hi, F1tr, F1ti, F2r, F2i, Tr, Ti, mat, t = _mfft_load_consts(
            f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2)
        Kr = tl.load(kr_ptr + c * (N1 * N2) + mat)
        Ki = tl.load(ki_ptr + c * (N1 * N2) + mat)
        dc = tl.load(d_ptr + c)
        for r in range(0, ROWS, 2):
            base0, base1, m0, m1 = _mfft_row_pair(pb, r, ROWS, c, B, C, L, t)
            xr = tl.load(u_ptr + base0 + t, mask=m0, other=0.0).to(tl.float32)
            xi = tl.load(u_ptr + base1 + t, mask=m1, other=0.0).to(tl.float32)
            cr, ci = _mfft_forward(xr, xi, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC)
            er, ei = _mfft_inverse_stage2(cr * Kr - ci * Ki, cr * Ki + ci * Kr, Tr, Ti, F2r, F2i, PREC)
            # last stage, output rows n1 < N1/2: real part -> row b0, imaginary -> row b0 + 1
            zr, zi = _mfft_inverse_stage1(er, ei, F1tr, F1ti, PREC)
            tl.store(y_ptr + base0 + t, (zr * (1.0 / (N1 * N2)) + dc * xr).to(y_ptr.dtype.element_ty), mask=m0)
            tl.store(y_ptr + base1 + t, (zi * (1.0 / (N1 * N2)) + dc * xi).to(y_ptr.dtype.element_ty), mask=m1)

    @triton.jit
    def _mfft_spectrum_kernel(k_ptr, kr_ptr, ki_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, C, Lk,
                              N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr, CHANNELS: tl.constexpr):
        """The filter's spectrum K[c] = DFT_N(k[c]) (zero-padded to N = N1 N2) of CHANNELS channels c, in the
        [k1, k2] layout the two kernels above read: one row FFT each. For 768 channels at N = 2048, 8.3 us on an
        H100 (tf32, two channels a program); at one channel a program 17 us on an H200, against 57 us for
        torch.fft.fft of k (cuFFT's r2c and a Hermitian fill) and the two copies that split re and im."""
        F1hr, F1hi, F1tr, F1ti, F2r, F2i, Tr, Ti, mat, t = _mfft_load_consts(
            f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2)
        first = tl.program_id(0).to(tl.int64) * CHANNELS
        for c in range(first, tl.minimum(first + CHANNELS, C)):
            kc = tl.load(k_ptr + c * Lk + t, mask=t < Lk, other=0.0).to(tl.float32)
            # a real row: stage one without the products of a zero imaginary part
            cr, ci = _mfft_forward_stage2(_mfft_dot(F1hr, kc, PREC), _mfft_dot(F1hi, kc, PREC), Tr, Ti, F2r, F2i,
                                          PREC)
            out = c * (N1 * N2) + mat
            tl.store(kr_ptr + out, cr)
            tl.store(ki_ptr + out, ci)

    @triton.jit
    def _mfft_conv_bwd_kernel(u_ptr, g_ptr, gu_ptr, gk_ptr, gd_ptr, kr_ptr, ki_ptr, d_ptr, f1r_ptr, f1i_ptr, f2r_ptr,
                              f2i_ptr, tr_ptr, ti_ptr, B, C, L, Lk, ROWS: tl.constexpr, N1: tl.constexpr,
                              N2: tl.constexpr, PREC: tl.constexpr, GRAD_U: tl.constexpr):
        """The backward of _mfft_conv_kernel for channel c, given u and g = dL/dy, over this program's ROWS batch
        rows: partial sums gk[pb, c] = IDFT(sum conj(U) G)[:Lk] (the filter's gradient) and gd[pb, c] = sum g u
        (the skip term's), and with GRAD_U the input's gradient gu = IDFT(G conj(K))[:L] + d g (the adjoint of a
        convolution is a correlation), from the same transform of g. Rows go in pairs: with U = DFT(u_b + i u_b')
        and G = DFT(g_b + i g_b'), conj(U) G = (conj(U_b) G_b + conj(U_b') G_b') + i X, where X is the spectrum of a
        real signal too, so Re(IDFT(.)) is the sum of the two correlations; and G conj(K) is the spectrum of
        corr(g_b, k) + i corr(g_b', k), as in the forward."""
        c = tl.program_id(0)
        pb = tl.program_id(1)
        F1hr, F1hi, F1tr, F1ti, F2r, F2i, Tr, Ti, mat, t = _mfft_load_consts(
            f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2)
        if GRAD_U:
            dc = tl.load(d_ptr + c)
        sr = tl.zeros([N1, N2], dtype=tl.float32)
        si = tl.zeros([N1, N2], dtype=tl.float32)
        dd = tl.zeros([N1 // 2, N2], dtype=tl.float32)
        for r in range(0, ROWS, 2):
            base0, base1, m0, m1 = _mfft_row_pair(pb, r, ROWS, c, B, C, L, t)
            ur0 = tl.load(u_ptr + base0 + t, mask=m0, other=0.0).to(tl.float32)
            ui0 = tl.load(u_ptr + base1 + t, mask=m1, other=0.0).to(tl.float32)
            gr0 = tl.load(g_ptr + base0 + t, mask=m0, other=0.0).to(tl.float32)
            gi0 = tl.load(g_ptr + base1 + t, mask=m1, other=0.0).to(tl.float32)
            ur, ui = _mfft_forward(ur0, ui0, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC)
            gr, gi = _mfft_forward(gr0, gi0, F1hr, F1hi, Tr, Ti, F2r, F2i, PREC)
            sr += ur * gr + ui * gi
            si += ur * gi - ui * gr
            dd += ur0 * gr0 + ui0 * gi0
            if GRAD_U:  # conj(K), loaded (from L2) per row pair: held across the loop it spilled registers
                Kr = tl.load(kr_ptr + c * (N1 * N2) + mat)
                Ki = -tl.load(ki_ptr + c * (N1 * N2) + mat)
                er, ei = _mfft_inverse_stage2(gr * Kr - gi * Ki, gr * Ki + gi * Kr, Tr, Ti, F2r, F2i, PREC)
                zr, zi = _mfft_inverse_stage1(er, ei, F1tr, F1ti, PREC)
                tl.store(gu_ptr + base0 + t, (zr * (1.0 / (N1 * N2)) + dc * gr0).to(gu_ptr.dtype.element_ty), mask=m0)
                tl.store(gu_ptr + base1 + t, (zi * (1.0 / (N1 * N2)) + dc * gi0).to(gu_ptr.dtype.element_ty), mask=m1)
        # the rows' products summed, then one inverse
        er, ei = _mfft_inverse_stage2(sr, si, Tr, Ti, F2r, F2i, PREC)
        gk = (_mfft_dot(F1tr, er, PREC) + _mfft_dot(F1ti, ei, PREC)) * (1.0 / (N1 * N2))
        out = (pb * C + c).to(tl.int64)
        tl.store(gk_ptr + out * Lk + t, gk, mask=t < Lk)
        tl.store(gd_ptr + out, tl.sum(tl.sum(dd, axis=1), axis=0))

    # ---- four-step path (N > TRITON_MAX_N): the row kernels between the outer matmuls of four_step_forward ----
    @triton.jit
    def _mfft_full_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1: tl.constexpr, N2: tl.constexpr):
        """All of F_N1, F_N2 and T (a full complex row, no zero half), and the row-major index of (N1, N2)."""
        i1 = tl.arange(0, N1)
        i2 = tl.arange(0, N2)
        sq1 = i1[:, None] * N1 + i1[None, :]
        sq2 = i2[:, None] * N2 + i2[None, :]
        mat = i1[:, None] * N2 + i2[None, :]
        return (tl.load(f1r_ptr + sq1), tl.load(f1i_ptr + sq1), tl.load(f2r_ptr + sq2), tl.load(f2i_ptr + sq2),
                tl.load(tr_ptr + mat), tl.load(ti_ptr + mat), mat)

    @triton.jit
    def _mfft_outer_twiddle(tw_ptr, ko, mat, half, NI: tl.constexpr):
        """exp(-2 pi i ko n / N) for the row ko of the outer step, n = the inner index (the four-step twiddle), from
        the (2, H + 1, Ni) table of _outer_twiddles: an L2-resident load was 4-5x faster than sin/cos in the
        kernel on the H200 (libdevice's accurate sin and cos, and the registers they take)."""
        return tl.load(tw_ptr + ko * NI + mat), tl.load(tw_ptr + half + ko * NI + mat)

    @triton.jit
    def _mfft_outer_row(q, H, tw_ptr, mat, half, NI: tl.constexpr):
        """Row q of the four-step layout: its signal r = q // (H + 1), its outer frequency ko and its twiddle."""
        ko = q % (H + 1)
        wr, wi = _mfft_outer_twiddle(tw_ptr, ko, mat, half, NI)
        return q // (H + 1), ko, wr, wi

    @triton.jit
    def _mfft_load_row(a_ptr, off, half, mask, wr, wi):
        """Row (re at off, im at off + half) times the twiddle w, in fp32."""
        xr = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xi = tl.load(a_ptr + off + half, mask=mask, other=0.0).to(tl.float32)
        return xr * wr - xi * wi, xr * wi + xi * wr

    @triton.jit
    def _mfft_inverse_store(z_ptr, off, half, mask, yr, yi, wr, wi, F1r, F1i, F2r, F2i, Tr, Ti,
                            PREC: tl.constexpr):
        """Unnormalized inverse DFT of the (k1, k2) spectrum y, times conj(w), stored as (re, im) rows."""
        er, ei = _mfft_inverse_stage2(yr, yi, Tr, Ti, F2r, F2i, PREC)
        zr, zi = _mfft_inverse_stage1(er, ei, F1r, F1i, PREC)
        tl.store(z_ptr + off, (zr * wr + zi * wi).to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(z_ptr + off + half, (zi * wr - zr * wi).to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mfft_rows_kernel(a_ptr, z_ptr, k_ptr, tw_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, n_rows, C,
                          H, P, ROWS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, MODE: tl.constexpr,
                          PREC: tl.constexpr):
        """Rows q = (r, ko) of a (R, P, N1 * N2) tensor (P = _spectrum_rows(H); rows 2H + 2 .. P - 1 are padding
        that no program touches): [r, ko] holds the real part of the outer step's row ko (0 <= ko <= H),
        [r, H + 1 + ko] its imaginary part. Each row is twiddled and transformed (the inner
        DFT); MODE 'fft' stores the spectrum, MODE 'conv' / 'adjoint' multiplies it by K[r % C, ko] (or conj(K))
        and stores the twiddled inverse (unnormalized: the outer inverse matmul scales by 1/N)."""
        F1r, F1i, F2r, F2i, Tr, Ti, mat = _mfft_full_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                                                            N1, N2)
        half = (H + 1) * (N1 * N2)
        for j in range(ROWS):
            q = tl.program_id(0) * ROWS + j
            r, ko, wr, wi = _mfft_outer_row(q, H, tw_ptr, mat, half, N1 * N2)
            mask = mat < tl.where(q < n_rows, N1 * N2, 0)  # one comparison: see _mfft_row_pair
            off = (r * P + ko).to(tl.int64) * (N1 * N2) + mat
            xr, xi = _mfft_load_row(a_ptr, off, half, mask, wr, wi)
            cr, ci = _mfft_forward(xr, xi, F1r, F1i, Tr, Ti, F2r, F2i, PREC)
            if MODE == 'fft':
                tl.store(z_ptr + off, cr.to(z_ptr.dtype.element_ty), mask=mask)
                tl.store(z_ptr + off + half, ci.to(z_ptr.dtype.element_ty), mask=mask)
            else:
                k_off = ((r % C) * P + ko).to(tl.int64) * (N1 * N2) + mat
                Kr = tl.load(k_ptr + k_off, mask=mask, other=0.0).to(tl.float32)
                Ki = tl.load(k_ptr + k_off + half, mask=mask, other=0.0).to(tl.float32)
                if MODE == 'adjoint':  # grad u: the correlation, conj(K)
                    Ki = -Ki
                _mfft_inverse_store(z_ptr, off, half, mask, cr * Kr - ci * Ki, cr * Ki + ci * Kr, wr, wi,
                                    F1r, F1i, F2r, F2i, Tr, Ti, PREC)

    @triton.jit
    def _mfft_rows_grad_k_kernel(au_ptr, ag_ptr, s_ptr, tw_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                                 B, C, H, P, ROWS: tl.constexpr, PAIRS: tl.constexpr, N1: tl.constexpr,
                                 N2: tl.constexpr, PREC: tl.constexpr):
        """Programs (PAIRS pairs (c, ko), batch rows pb * ROWS ...): S[pb, c, ko] = twiddled inverse of sum_b
        conj(U[b, c, ko]) G[b, c, ko], with U and G the inner spectra of the outer-step rows of u and g (layout as
        _mfft_rows_kernel); summed over pb and through the outer inverse matmul, the filter's gradient. Several
        pairs per program when the batch is small, so that each program loads the DFT constants for ~16 rows."""
        F1r, F1i, F2r, F2i, Tr, Ti, mat = _mfft_full_consts(f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                                                            N1, N2)
        pb = tl.program_id(1)
        half = (H + 1) * (N1 * N2)
        for i in range(PAIRS):
            c, ko, wr, wi = _mfft_outer_row(tl.program_id(0) * PAIRS + i, H, tw_ptr, mat, half, N1 * N2)
            q_ok = mat < tl.where(c < C, N1 * N2, 0)  # one comparison per mask: see _mfft_row_pair
            sr = tl.zeros([N1, N2], dtype=tl.float32)
            si = tl.zeros([N1, N2], dtype=tl.float32)
            for j in range(ROWS):
                b = pb * ROWS + j
                mask = mat < tl.where((c < C) & (b < B), N1 * N2, 0)
                off = ((b * C + c) * P + ko).to(tl.int64) * (N1 * N2) + mat
                ur, ui = _mfft_load_row(au_ptr, off, half, mask, wr, wi)
                ur, ui = _mfft_forward(ur, ui, F1r, F1i, Tr, Ti, F2r, F2i, PREC)
                gr, gi = _mfft_load_row(ag_ptr, off, half, mask, wr, wi)
                gr, gi = _mfft_forward(gr, gi, F1r, F1i, Tr, Ti, F2r, F2i, PREC)
                sr += ur * gr + ui * gi
                si += ur * gi - ui * gr
            off = ((pb * C + c) * P + ko).to(tl.int64) * (N1 * N2) + mat
            _mfft_inverse_store(s_ptr, off, half, q_ok, sr, si, wr, wi, F1r, F1i, F2r, F2i, Tr, Ti, PREC)


def in_dtype_of(y, u):
    """y in u's dtype for an autograd Function's forward to return: y itself when it already is. torch 2.11 compiles
    a Function whose forward ends in a no-op .to() to wrong gradients (zeros for the 'fast' path with fp32 inputs;
    the four-step path's backward run in the forward graph on a constant gradient); 2.13 does not. tests/test_bench.py
    reproduces both on the CPU under torch 2.11, tests/test_cuda.py holds compiled gradients to eager ones."""
    return y if y.dtype == u.dtype else y.to(u.dtype)


def _mfft_plan(L):
    """FFT size N >= 2L (a power of two, >= 512 so every matmul dimension is >= 16) and N = N1 * N2, N1 >= N2."""
    N = max(512, 2 ** math.ceil(math.log2(2 * L)))
    m = N.bit_length() - 1
    N1 = 2 ** ((m + 1) // 2)
    return N, N1, N // N1


def _cached_constant(key, device, make):
    """make() (tensors built on the CPU) moved to device, once per key. Built in a helper thread: CUDA graph
    trees (torch.compile's mode='reduce-overhead') route every allocation of the thread that warms up or records
    a graph into that graph's private pool, where a tensor cached beyond the graph's run breaks the pool's
    bookkeeping ("tensors in the cudagraph pool not tracked as outputs"); another thread allocates outside it."""
    if key not in _MFFT_CONSTS:
        def build():
            out = tuple(t.contiguous().to(device) for t in make())
            if out[0].is_cuda:
                torch.cuda.synchronize(out[0].device)  # ready before any stream of the caller's reads it
            return out
        with concurrent.futures.ThreadPoolExecutor(1) as helper:
            _MFFT_CONSTS[key] = helper.submit(build).result()
    return _MFFT_CONSTS[key]


def _mfft_consts(N1, N2, device):
    """DFT matrices F_N1, F_N2 and twiddles T (real and imaginary parts, fp32), cached per device."""
    def make():
        N = N1 * N2
        j1, j2 = torch.arange(N1, dtype=torch.float64), torch.arange(N2, dtype=torch.float64)
        a1 = -2 * math.pi * torch.outer(j1, j1).remainder(N1) / N1
        a2 = -2 * math.pi * torch.outer(j2, j2).remainder(N2) / N2
        at = -2 * math.pi * torch.outer(j1, j2) / N
        return tuple(x.float() for x in (a1.cos(), a1.sin(), a2.cos(), a2.sin(), at.cos(), at.sin()))
    return _cached_constant((N1, N2, str(device)), device, make)


def _mfft_launch(n_rows, warps):
    """Rows per program (the one-kernel path takes them in pairs) and warps per program (TRITON_NUM_WARPS, else
    the caller's default): 16 rows, fewer only when there are fewer. On the H200 (BENCHMARKS.md, kernel sweeps)
    the first version's 8 warps were 2x slower than 4 on 64 x 64 matmuls; on 32 x 32 (L = 1K) 2 warps tied 4 at
    batch 64 but lost by 22% at batch 16 (fewer programs to fill the GPU), so the one-kernel path takes 4."""
    return max(1, min(TRITON_ROWS or 16, n_rows)), TRITON_NUM_WARPS or warps


def _four_step_plan(L):
    """Four-step FFT of size N = 2H * Ni (N >= 2L, powers of two): an outer DFT of size 2H over rows of Ni
    (a matmul; the input's last H rows are zero) and inner DFTs of size Ni = N1 * N2 in the row kernels."""
    N = 2 ** math.ceil(math.log2(2 * L))
    Ni = TRITON_INNER_N or max(256, min(1024, N // 128))  # H <= 64 up to L = 64K: fastest in the sweep
    if Ni < 256 or Ni & (Ni - 1):
        raise ValueError(f"fftconv_triton: TRITON_INNER_N must be 0 (auto) or a power of two >= 256, got {Ni}")
    N = max(N, 2 * Ni)
    return (N, Ni, N // Ni // 2) + _inner_split(Ni)


def _inner_split(Ni):
    """Ni = N1 * N2, powers of two, N1 >= N2."""
    N1 = 2 ** (Ni.bit_length() // 2)
    return N1, Ni // N1


def _spectrum_rows(H):
    """Rows per signal in the four-step layout: the 2H + 2 of the outer DFT's H + 1 complex frequencies, rounded up
    to a multiple of 8 with zero rows. A dimension of 2H + 2 (130 at H = 64) in the outer matmuls made inductor pad
    them with copies of the big operand, or cuBLAS take its 'align2' kernels (BENCHMARKS.md, "Seventh session")."""
    return -(-(2 * H + 2) // 8) * 8


def _outer_matrices(H, Ni, device, dtype):
    """The outer DFT of a real input, its first H + 1 frequencies stacked as [cos; -sin] (P, H), and its inverse
    (H, P) for a Hermitian spectrum, y[n] = (1/N) sum_k w_k (Zr[k] cos - Zi[k] sin)(2 pi n k / 2H), with w_k = 2
    except at k = 0 and k = H, whose conjugate partners are themselves; P = _spectrum_rows(H), the rows (and
    columns) past 2H + 2 zero. Cached when eager: built per call, they were ~70 of an eager forward and backward's
    ~100 small kernels, whose host time (6.4 ms at L = 16K on the H200) was three times the GPU's. Built per call
    under torch.compile, which traces the autograd Function, rejects a cache filled inside it and folds these
    small constants anyway."""
    def make(on='cpu'):
        n = torch.arange(H, dtype=torch.float64, device=on)
        f = torch.arange(H + 1, dtype=torch.float64, device=on)
        angle = 2 * math.pi * torch.outer(f, n) / (2 * H)  # (H + 1, H)
        forward = torch.cat([angle.cos(), -angle.sin()])
        w = torch.where((f == 0) | (f == H), 1.0, 2.0).unsqueeze(1)
        inverse = torch.cat([w * angle.cos(), -w * angle.sin()]).t() / (2 * H * Ni)
        pad = _spectrum_rows(H) - (2 * H + 2)
        forward = torch.nn.functional.pad(forward, (0, 0, 0, pad))
        inverse = torch.nn.functional.pad(inverse, (0, pad))
        return forward.to(dtype), inverse.contiguous().to(dtype)
    if torch.compiler.is_compiling():
        return make(device)
    return _cached_constant(('outer', H, Ni, str(device), dtype), device, make)


def applies(u, k, D):
    return (triton is not None and u.dim() == 3 and k.dim() == 2 and k.shape[0] == u.shape[1]
            and (D is None or tuple(D.shape) == (u.shape[1],))
            and u.dtype in (torch.float32, torch.bfloat16, torch.float16) and (u.is_cuda or _TRITON_INTERPRET))


def one_kernel(L):
    """Whether length L takes the one-kernel path (else the four-step one)."""
    return _mfft_plan(L)[0] <= TRITON_MAX_N


def device_of(x):
    """The context a kernel launch on x's device runs in: that CUDA device current, or nothing on the CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _mfft_conv_impl(u, kr, ki, d, prec, rows, warps):
    B, C, L = u.shape
    N1, N2 = kr.shape[1], kr.shape[2]
    y = torch.full_like(u, float('nan')) if _TRITON_POISON else torch.empty_like(u)
    grid = (C, -(-B // rows))
    with device_of(u):
        _mfft_conv_kernel[grid](u, y, kr, ki, d, *_mfft_consts(N1, N2, u.device), B, C, L, rows,
                                N1=N1, N2=N2, PREC=prec, num_warps=warps)
    return y


def _mfft_spectrum_impl(k, n1, n2, prec, warps):
    C, Lk = k.shape
    kr, ki = (k.new_empty((C, n1, n2), dtype=torch.float32) for _ in range(2))
    with device_of(k):
        _mfft_spectrum_kernel[(-(-C // SPECTRUM_CHANNELS),)](k, kr, ki, *_mfft_consts(n1, n2, k.device), C, Lk,
                                                             N1=n1, N2=n2, PREC=prec, CHANNELS=SPECTRUM_CHANNELS,
                                                             num_warps=warps)
    return kr, ki


def _mfft_conv_bwd_impl(u, g, kr, ki, d, Lk, prec, rows, warps, grad_u):
    """(grad u (B, C, L) in u's dtype, or an empty tensor without grad_u; grad k (C, Lk) and grad D (C,) in fp32):
    the kernel's per-program partial sums, summed over the programs only when there are several (at batch <= rows,
    the GPT-2-size step's case, no reduction kernel)."""
    B, C, L = u.shape
    N1, N2 = kr.shape[1], kr.shape[2]
    nb = -(-B // rows)
    make = functools.partial(torch.full, fill_value=float('nan')) if _TRITON_POISON else torch.empty
    gu = make(u.shape if grad_u else (0,), device=u.device, dtype=u.dtype)
    gk = make((nb, C, Lk), device=u.device, dtype=torch.float32)  # the kernel writes every element
    gd = make((nb, C), device=u.device, dtype=torch.float32)
    with device_of(u):
        _mfft_conv_bwd_kernel[(C, nb)](u, g, gu if grad_u else g, gk, gd, kr, ki, d,  # (g: never written)
                                       *_mfft_consts(N1, N2, u.device), B, C, L, Lk, rows, N1=N1, N2=N2, PREC=prec,
                                       GRAD_U=grad_u, num_warps=warps)
    if nb > 1:
        return gu, gk.sum(0), gd.sum(0)
    return gu, gk.view(C, Lk), gd.view(C)


def _mfft_rows_impl(a, k, C, H, mode, prec, rows, warps):
    R, _, Ni = a.shape
    N1, N2 = _inner_split(Ni)
    z = torch.full_like(a, float('nan')) if _TRITON_POISON else torch.empty_like(a)
    z[:, 2 * H + 2:] = 0  # the padding rows meet the inverse matrix's zero columns: no NaN may hide there
    n_rows = R * (H + 1)
    with device_of(a):
        _mfft_rows_kernel[(-(-n_rows // rows),)](a, z, k, _outer_twiddles(H, Ni, a.device),
                                                 *_mfft_consts(N1, N2, a.device), n_rows, C, H, a.shape[1], rows,
                                                 N1=N1, N2=N2, MODE=mode, PREC=prec, num_warps=warps)
    return z


def _grad_k_dtype(au):
    """The batch-summed spectra products: fp32, float64 when the rows are ('ieee', see four_step_forward)."""
    return torch.float64 if au.dtype == torch.float64 else torch.float32


def _mfft_rows_grad_k_impl(au, ag, B, C, H, prec, rows, warps):
    """rows: rows per program, batch rows first; the rest of them go to more (c, ko) pairs per program."""
    Ni = au.shape[-1]
    N1, N2 = _inner_split(Ni)
    batch_rows = min(rows, B)
    pairs = rows // batch_rows
    nb = -(-B // batch_rows)
    make = functools.partial(torch.full, fill_value=float('nan')) if _TRITON_POISON else torch.empty
    s = make((nb, C, au.shape[1], Ni), device=au.device, dtype=_grad_k_dtype(au))
    s[:, :, 2 * H + 2:] = 0
    with device_of(au):
        _mfft_rows_grad_k_kernel[(-(-C * (H + 1) // pairs), nb)](au, ag, s, _outer_twiddles(H, Ni, au.device),
                                                                 *_mfft_consts(N1, N2, au.device), B, C, H,
                                                                 au.shape[1], batch_rows, pairs, N1=N1, N2=N2,
                                                                 PREC=prec, num_warps=warps)
    return s.sum(0) if nb > 1 else s.view(s.shape[1:])


_LIB = torch.library.Library('hyena', 'FRAGMENT')


def define_op(schema, impl, fake):
    """A custom op hyena::name (schema 'name(...) -> ...'): opaque to torch.compile, which fuses the pointwise work
    around it but never traces the launch. Through torch.library.Library rather than torch.library.custom_op: the
    same op to the compiler, but ~10 instead of ~34 us of Python per call (timed with a no-op body on a 2-core
    CPU), and the student's training step waits on its launches (BENCHMARKS.md). Once per process."""
    name = schema.split('(')[0]
    if hasattr(torch.ops.hyena, name):
        return
    _LIB.define(schema)
    _LIB.impl(name, impl, 'CompositeExplicitAutograd')
    torch.library.register_fake(f'hyena::{name}', fake, lib=_LIB)


if triton is not None:
    def _conv_bwd_fake(u, g, kr, ki, d, lk, prec, rows, warps, grad_u):
        return (u.new_empty(u.shape if grad_u else (0,)), u.new_empty(u.shape[1], lk, dtype=torch.float32),
                u.new_empty(u.shape[1], dtype=torch.float32))

    define_op('mfft_conv(Tensor u, Tensor kr, Tensor ki, Tensor d, str prec, int rows, int warps) -> Tensor',
              _mfft_conv_impl, lambda u, kr, ki, d, prec, rows, warps: torch.empty_like(u))
    define_op('mfft_spectrum(Tensor k, int n1, int n2, str prec, int warps) -> (Tensor, Tensor)', _mfft_spectrum_impl,
              lambda k, n1, n2, prec, warps: tuple(k.new_empty((k.shape[0], n1, n2), dtype=torch.float32)
                                                   for _ in range(2)))
    define_op('mfft_conv_bwd(Tensor u, Tensor g, Tensor kr, Tensor ki, Tensor d, int lk, str prec, int rows, '
              'int warps, bool grad_u) -> (Tensor, Tensor, Tensor)', _mfft_conv_bwd_impl, _conv_bwd_fake)
    define_op('mfft_rows(Tensor a, Tensor k, int c, int h, str mode, str prec, int rows, int warps) -> Tensor',
              _mfft_rows_impl, lambda a, k, c, h, mode, prec, rows, warps: torch.empty_like(a))
    define_op('mfft_rows_grad_k(Tensor au, Tensor ag, int b, int c, int h, str prec, int rows, int warps) -> Tensor',
              _mfft_rows_grad_k_impl,
              lambda au, ag, b, c, h, prec, rows, warps: au.new_empty((c, au.shape[1], au.shape[-1]),
                                                                      dtype=_grad_k_dtype(au)))


def monarch_forward(u, k, D):
    """fftconv for N <= TRITON_MAX_N, one kernel per direction: u (B, C, L), k (C, Lk), D (C,) or None -> (y,
    tensors to save, settings). Saves only u and the filter's spectrum; the backward recomputes the row FFTs
    inside the kernels."""
    B, C, L = u.shape
    _, N1, N2 = _mfft_plan(L)
    rows, warps = _mfft_launch(B, 4)
    with torch.autocast(device_type=u.device.type, enabled=False):
        # [c, k1, k2] = K[k1 + N1 k2]; tf32 unless TRITON_DOT asks for exact fp32 (the rows' own FFTs are no finer)
        kr, ki = torch.ops.hyena.mfft_spectrum(k.float().contiguous(), N1, N2, SPECTRUM_DOT[TRITON_DOT], 4)
        d = D.float().contiguous() if D is not None else torch.zeros(C, device=u.device, dtype=torch.float32)
        u = u.contiguous()
        y = torch.ops.hyena.mfft_conv(u, kr, ki, d, TRITON_DOT, rows, warps)
    return y, (u, kr, ki, d), (N1, N2, k.shape[-1], TRITON_DOT, rows, warps, k.dtype, None if D is None else D.dtype)


def monarch_backward(saved, cfg, needs, grad_y):
    """(grad u, grad k, grad D) of monarch_forward, each None where needs (three bools) says so."""
    u, kr, ki, d = saved
    N1, N2, Lk, prec, rows, warps, k_dtype, d_dtype = cfg
    g = grad_y.to(u.dtype).contiguous()
    grad_u = grad_k = grad_D = None
    merge = needs[0] and N1 * N2 <= TRITON_MERGED_BWD_MAX_N
    if needs[1] or (d_dtype is not None and needs[2]):  # one transform of g for grad k and D (and grad u)
        gu, gk, gd = torch.ops.hyena.mfft_conv_bwd(u, g, kr, ki, d, Lk, prec, rows, warps, merge)
        grad_u = gu if merge else None
        grad_k = gk.to(k_dtype)
        grad_D = gd.to(d_dtype) if d_dtype is not None else None
    if needs[0] and grad_u is None:  # the adjoint of a convolution with k is a correlation: conj(K)
        grad_u = torch.ops.hyena.mfft_conv(g, kr, -ki, d, prec, rows, warps)
    return grad_u, grad_k, grad_D


def _outer_twiddles(H, Ni, device):
    """(2, H + 1, Ni) fp32: cos and sin of -2 pi ko n / N, the four-step twiddles of _mfft_rows_kernel."""
    def make():
        ko, n = torch.arange(H + 1, dtype=torch.float64), torch.arange(Ni, dtype=torch.float64)
        angle = -2 * math.pi * torch.outer(ko, n) / (2 * H * Ni)
        return torch.stack([angle.cos(), angle.sin()]).float(),
    return _cached_constant(('twiddle', H, Ni, str(device)), device, make)[0]


def _outer_rows(x, H, Ni, dtype):
    """(R, L) real -> (R, P, Ni): the outer DFT (size 2H) of x zero-padded to H * Ni, one matmul."""
    forward, _ = _outer_matrices(H, Ni, x.device, dtype)
    x = x.to(dtype)
    if x.shape[-1] < H * Ni:
        x = torch.nn.functional.pad(x, (0, H * Ni - x.shape[-1]))
    return torch.matmul(forward, x.view(-1, H, Ni))


def _outer_inverse(z, H, n_out):
    """(R, P, Ni) from the row kernels -> (R, n_out) real: the outer inverse DFT, scaled by 1/N."""
    Ni = z.shape[-1]
    _, inverse = _outer_matrices(H, Ni, z.device, z.dtype)
    return torch.matmul(inverse, z).view(-1, H * Ni)[:, :n_out]


def four_step_forward(u, k, D):
    """fftconv for N > TRITON_MAX_N (u (B, C, L), k (C, Lk), D (C,) or None) -> (y, tensors to save, settings).
    The four-step FFT (Bailey 1990; the Monarch view of FlashFFTConv, arXiv:2311.05908 §3.2): the signal
    zero-padded to N = 2H * Ni is an (2H, Ni) matrix whose last H rows are zero; an outer DFT over its columns (a
    cuBLAS matmul, keeping the H + 1 frequencies a real input needs), a twiddle, then row DFTs of size Ni, the
    product with the filter's spectrum and the inverse row DFTs fused in one Triton kernel (_mfft_rows_kernel, in
    registers), and the outer inverse as a second matmul. The skip term D is folded into the filter's first tap
    (conv(u, k) + D u = conv(u, k + D delta)), so grad D is grad k[:, 0]. Intermediates (between the matmuls and
    the row kernels) are bf16 for TRITON_DOT 'bf16', fp32 for 'tf32', float64 for 'ieee'."""
    B, C, L = u.shape
    _, Ni, H, _, _ = _four_step_plan(L)
    # the outer matmuls' dtype: cuBLAS follows torch's global TF32 switch for fp32 (training.py and bench.py
    # turn it on), so 'ieee' runs them in float64 to stay exact (measured 3.8e-4 error at L = 16K in fp32)
    dtype = {'bf16': torch.bfloat16, 'tf32': torch.float32, 'ieee': torch.float64}[TRITON_DOT]
    rows, warps = _mfft_launch(B * C * (H + 1), 2)
    with torch.autocast(device_type=u.device.type, enabled=False):
        taps = k.float()
        if D is not None:
            taps = torch.cat([taps[:, :1] + D.float()[:, None], taps[:, 1:]], dim=1)
        spectrum = torch.ops.hyena.mfft_rows(_outer_rows(taps, H, Ni, dtype), taps, C, H, 'fft', TRITON_DOT,
                                             rows, warps)
        z = torch.ops.hyena.mfft_rows(_outer_rows(u.reshape(B * C, L), H, Ni, dtype), spectrum, C, H, 'conv',
                                      TRITON_DOT, rows, warps)
        y = _outer_inverse(z, H, L).reshape(B, C, L)
    cfg = (H, Ni, k.shape[-1], TRITON_DOT, rows, warps, k.dtype, None if D is None else D.dtype)
    return in_dtype_of(y, u), (u, spectrum), cfg


def four_step_backward(saved, cfg, needs, grad_y):
    """(grad u, grad k, grad D) of four_step_forward, each None where needs (three bools) says so."""
    u, spectrum = saved
    H, Ni, Lk, prec, rows, warps, k_dtype, d_dtype = cfg
    B, C, L = u.shape
    grad_u = grad_k = grad_D = None
    with torch.autocast(device_type=u.device.type, enabled=False):
        g_rows = _outer_rows(grad_y.reshape(B * C, L), H, Ni, spectrum.dtype)
        if needs[0]:
            z = torch.ops.hyena.mfft_rows(g_rows, spectrum, C, H, 'adjoint', prec, rows, warps)
            grad_u = _outer_inverse(z, H, L).reshape(B, C, L).to(u.dtype)
        if needs[1] or (d_dtype is not None and needs[2]):
            u_rows = _outer_rows(u.reshape(B * C, L), H, Ni, spectrum.dtype)
            s = torch.ops.hyena.mfft_rows_grad_k(u_rows, g_rows, B, C, H, prec, rows, warps)
            grad_taps = _outer_inverse(s, H, Lk)
            grad_k = grad_taps.to(k_dtype)
            grad_D = grad_taps[:, 0].to(d_dtype) if d_dtype is not None else None
    return grad_u, grad_k, grad_D
