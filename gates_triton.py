"""
The short convs and gates around an order-2 Hyena operator's long convolution, as Triton kernels
(hyena.SHORT_CONV = 'fused'). Opt-in and CUDA only (CPU tests run them in Triton's interpreter; elsewhere the
operator takes its torch path). With p = in_proj(x) split into the streams q, a, v (each (B, T, D), token-major)
and sc() the depthwise causal short conv of width K,

    z = sc(a) * sc(v)             (B, D, T)   gate_in: the long convolution's input, channel-major
    y = fftconv(z, h, skip)       (B, D, T)
    o = y^T * sc(q)               (B, T, D)   gate_out: out_proj's input, token-major

which is hyena.HyenaOperator.forward for order 2. Under torch.compile inductor fuses this pointwise work, but its
backward (the gates' and short convs' gradients, their weight and bias reductions over batch and time, the
transposes between the two layouts) took ~3 ms of memory-bound kernels per operator at B * L = 64K on the H200,
against the long convolution's ~0.8 ms (BENCHMARKS.md, "Where the operator's time goes"). Here each gate's forward
is one kernel: a (BLOCK_T, BLOCK_C) tile of each stream is read once (the short conv's K - 1 neighbours come from
L1/L2) and the transposed tile written once. The backward is two kernels around the convolution's: gate_out_bwd
writes the convolution's output gradient gy = go^T * sc(q); after the convolution's backward, gates_bwd writes the
gradient of p whole (all three streams: each short conv's transpose applied to its output gradient, recomputed at
the K time steps it needs from go, y, gz and the streams, so that gradient never reaches memory) and sums the short
convs' weight and bias gradients over its time tiles (one small reduction over the programs' partial sums follows).
hyena.GatedConv runs the steps as one autograd Function, so that autograd does not concatenate the streams'
gradients in another pass.
"""
import contextlib

import torch

import fftconv_triton
from fftconv_triton import define_op, tl, triton

# Each kernel's tile (time steps, channels) and warps per program: the fastest on the H200 (BENCHMARKS.md)
TILES = dict(gate_in=(16, 128, 1), gate_out=(16, 128, 2), gate_out_bwd=(16, 128, 1), gates_bwd=(32, 64, 4))
GATES_BWD_TILES_PER_PROGRAM = 4  # gates_bwd: time tiles per program, whose weight-gradient sums it adds up itself


def applies(p, order, short_filter):
    """Whether the fused path runs: hyena.SHORT_CONV == 'fused' (checked by the caller), an order-2 operator whose
    short conv has a bias, and in_proj's output p on CUDA (or in the interpreter) with contiguous channels."""
    return (triton is not None and order == 2 and short_filter.bias is not None and p.stride(-1) == 1
            and (p.is_cuda or fftconv_triton._TRITON_INTERPRET))


if triton is not None:
    @triton.jit
    def _tile(t_blocks, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile: batch row, time steps and channels (program axis 0 the (batch, time-block) tiles,
        axis 1 the channel blocks)."""
        n = tl.program_id(0)
        t = (n % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        return (n // t_blocks).to(tl.int64), t, tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)

    @triton.jit
    def _short_conv_tile(x_ptr, w_ptr, b_ptr, row, t, c, c_ok, T, x_st, K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        """sc(x)[t, c] = b[c] + sum_j w[c, j] x[t - K + 1 + j, c], x zero before t = 0: fp32 (BLOCK_T, BLOCK_C)."""
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32) + bias[None, :]
        for j in tl.static_range(K):
            s = t - (K - 1) + j
            x = tl.load(x_ptr + row + s[:, None] * x_st + c[None, :],
                        mask=((s >= 0) & (s < T))[:, None] & c_ok[None, :], other=0.0)
            acc += tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)[None, :] * x.to(tl.float32)
        return acc

    @triton.jit
    def _weight_grad_terms(gs, x_ptr, t, c, c_ok, T, x_st, K: tl.constexpr, KP: tl.constexpr):
        """A tile's share of a short conv's parameter gradients, gs the gradient of its output at times t:
        (KP, BLOCK_C) with [j, c] = sum_t gs[t, c] x[t - K + 1 + j, c] for the taps j < K, [K, c] = sum_t gs[t, c]."""
        tap = tl.arange(0, KP)[:, None]
        acc = tl.where(tap == K, tl.sum(gs, axis=0)[None, :], 0.0)
        for j in tl.static_range(K):
            s = t - (K - 1) + j
            x = tl.load(x_ptr + s[:, None] * x_st + c[None, :], mask=((s >= 0) & (s < T))[:, None] & c_ok[None, :],
                        other=0.0)
            acc += tl.where(tap == j, tl.sum(gs * x.to(tl.float32), axis=0)[None, :], 0.0)
        return acc

    @triton.jit
    def _gate_in_kernel(a_ptr, v_ptr, wa_ptr, ba_ptr, wv_ptr, bv_ptr, z_ptr, T, D, t_blocks, a_sb, a_st, v_sb, v_st,
                        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """z[b, c, t] = sc(a)[b, t, c] * sc(v)[b, t, c]."""
        b, t, c = _tile(t_blocks, BLOCK_T, BLOCK_C)
        c_ok = c < D
        z = (_short_conv_tile(a_ptr, wa_ptr, ba_ptr, b * a_sb, t, c, c_ok, T, a_st, K, BLOCK_T, BLOCK_C)
             * _short_conv_tile(v_ptr, wv_ptr, bv_ptr, b * v_sb, t, c, c_ok, T, v_st, K, BLOCK_T, BLOCK_C))
        tl.store(z_ptr + (b * D + c[None, :]) * T + t[:, None], z.to(z_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & c_ok[None, :])

    @triton.jit
    def _gate_out_kernel(y_ptr, q_ptr, wq_ptr, bq_ptr, o_ptr, T, D, t_blocks, y_sb, y_sc, y_st, q_sb, q_st,
                         K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """o[b, t, c] = y[b, c, t] * sc(q)[b, t, c]."""
        b, t, c = _tile(t_blocks, BLOCK_T, BLOCK_C)
        c_ok = c < D
        mask = (t < T)[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + b * y_sb + c[None, :] * y_sc + t[:, None] * y_st, mask=mask, other=0.0).to(tl.float32)
        o = y * _short_conv_tile(q_ptr, wq_ptr, bq_ptr, b * q_sb, t, c, c_ok, T, q_st, K, BLOCK_T, BLOCK_C)
        tl.store(o_ptr + (b * T + t[:, None]) * D + c[None, :], o.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_out_bwd_kernel(go_ptr, q_ptr, wq_ptr, bq_ptr, gy_ptr, T, D, t_blocks, go_sb, go_st, q_sb, q_st,
                             K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """Given go = dL/do (B, T, D): the convolution's output gradient gy[b, c, t] = go[b, t, c] * sc(q)[b, t, c]."""
        b, t, c = _tile(t_blocks, BLOCK_T, BLOCK_C)
        c_ok = c < D
        mask = (t < T)[:, None] & c_ok[None, :]
        go = tl.load(go_ptr + b * go_sb + t[:, None] * go_st + c[None, :], mask=mask, other=0.0).to(tl.float32)
        gy = go * _short_conv_tile(q_ptr, wq_ptr, bq_ptr, b * q_sb, t, c, c_ok, T, q_st, K, BLOCK_T, BLOCK_C)
        tl.store(gy_ptr + (b * D + c[None, :]) * T + t[:, None], gy.to(gy_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gates_bwd_kernel(go_ptr, y_ptr, gz_ptr, p_ptr, w_ptr, b_ptr, gp_ptr, sums_ptr, T, D, t_groups, go_sb, go_st,
                          y_sb, y_sc, y_st, gz_sb, gz_sc, gz_st, p_sb, p_st, K: tl.constexpr, KP: tl.constexpr,
                          TILES_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """Given go = dL/do (B, T, D), y the convolution's output and gz = dL/dz (both (B, D, T)): the gradient of p
        (B, T, 3D) and the partial sums of the short convs' weight and bias gradients over this program's TILES_PER
        time tiles, sums[program, j, s * D + c] for stream s (q, a, v). Each stream's output gradient,
        gs_q = go * y^T, gs_a = gz^T * sc(v), gs_v = gz^T * sc(a), is recomputed at the K times t .. t + K - 1 that
        the short conv's transpose reads: dL/dx[t, c] = sum_s w[c, K - 1 - s] gs[t + s, c]."""
        n = tl.program_id(0)
        b = (n // t_groups).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < D
        q_ptr = p_ptr + b * p_sb
        a_ptr, v_ptr = q_ptr + D, q_ptr + 2 * D
        wq_ptr, wa_ptr, wv_ptr = w_ptr, w_ptr + D * K, w_ptr + 2 * D * K
        ba_ptr, bv_ptr = b_ptr + D, b_ptr + 2 * D  # q's short conv itself is not needed: gs_q = go * y^T
        sums_q = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
        sums_a = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
        sums_v = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
        for i in range(TILES_PER):
            t = ((n % t_groups) * TILES_PER + i) * BLOCK_T + tl.arange(0, BLOCK_T)
            gx_q = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            gx_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            gx_v = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            for s in tl.static_range(K):
                ts = t + s
                m = (ts < T)[:, None] & c_ok[None, :]
                go = tl.load(go_ptr + b * go_sb + ts[:, None] * go_st + c[None, :], mask=m, other=0.0)
                y = tl.load(y_ptr + b * y_sb + c[None, :] * y_sc + ts[:, None] * y_st, mask=m, other=0.0)
                gz = tl.load(gz_ptr + b * gz_sb + c[None, :] * gz_sc + ts[:, None] * gz_st, mask=m,
                             other=0.0).to(tl.float32)
                gs_q = go.to(tl.float32) * y.to(tl.float32)
                gs_a = gz * _short_conv_tile(v_ptr, wv_ptr, bv_ptr, 0, ts, c, c_ok, T, p_st, K, BLOCK_T, BLOCK_C)
                gs_v = gz * _short_conv_tile(a_ptr, wa_ptr, ba_ptr, 0, ts, c, c_ok, T, p_st, K, BLOCK_T, BLOCK_C)
                tap = K - 1 - s
                gx_q += tl.load(wq_ptr + c * K + tap, mask=c_ok, other=0.0).to(tl.float32)[None, :] * gs_q
                gx_a += tl.load(wa_ptr + c * K + tap, mask=c_ok, other=0.0).to(tl.float32)[None, :] * gs_a
                gx_v += tl.load(wv_ptr + c * K + tap, mask=c_ok, other=0.0).to(tl.float32)[None, :] * gs_v
                if s == 0:
                    sums_q += _weight_grad_terms(gs_q, q_ptr, t, c, c_ok, T, p_st, K, KP)
                    sums_a += _weight_grad_terms(gs_a, a_ptr, t, c, c_ok, T, p_st, K, KP)
                    sums_v += _weight_grad_terms(gs_v, v_ptr, t, c, c_ok, T, p_st, K, KP)
            mask = (t < T)[:, None] & c_ok[None, :]
            out = gp_ptr + (b * T + t[:, None]) * (3 * D) + c[None, :]
            tl.store(out, gx_q.to(gp_ptr.dtype.element_ty), mask=mask)
            tl.store(out + D, gx_a.to(gp_ptr.dtype.element_ty), mask=mask)
            tl.store(out + 2 * D, gx_v.to(gp_ptr.dtype.element_ty), mask=mask)
        out = sums_ptr + n * KP * (3 * D) + tl.arange(0, KP)[:, None] * (3 * D) + c[None, :]
        tl.store(out, sums_q, mask=c_ok[None, :])
        tl.store(out + D, sums_a, mask=c_ok[None, :])
        tl.store(out + 2 * D, sums_v, mask=c_ok[None, :])


def _launch(kernel, B, T, W):
    """(grid, time blocks, launch options) of a kernel named in TILES: one program per (batch, time-block) tile
    and block of channels."""
    block_t, block_c, warps = TILES[kernel]
    t_blocks = -(-T // block_t)
    return (B * t_blocks, -(-W // block_c)), t_blocks, dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)


def _device(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _gate_in_impl(a, v, wa, ba, wv, bv):
    B, T, D = a.shape
    z = a.new_empty(B, D, T)
    grid, t_blocks, launch = _launch('gate_in', B, T, D)
    with _device(a):
        _gate_in_kernel[grid](a, v, wa, ba, wv, bv, z, T, D, t_blocks, a.stride(0), a.stride(1), v.stride(0),
                              v.stride(1), K=wa.shape[1], **launch)
    return z


def _gate_out_impl(y, q, wq, bq):
    B, T, D = q.shape
    o = q.new_empty(B, T, D)
    grid, t_blocks, launch = _launch('gate_out', B, T, D)
    with _device(q):
        _gate_out_kernel[grid](y, q, wq, bq, o, T, D, t_blocks, *y.stride(), q.stride(0), q.stride(1),
                               K=wq.shape[1], **launch)
    return o


def _gate_out_bwd_impl(go, q, wq, bq):
    B, T, D = q.shape
    gy = q.new_empty(B, D, T)
    grid, t_blocks, launch = _launch('gate_out_bwd', B, T, D)
    with _device(q):
        _gate_out_bwd_kernel[grid](go, q, wq, bq, gy, T, D, t_blocks, go.stride(0), go.stride(1), q.stride(0),
                                   q.stride(1), K=wq.shape[1], **launch)
    return gy


def _gates_bwd_impl(go, y, gz, p, w, bias):
    """go (B, T, D) with contiguous channels, y and gz (B, D, T), p (B, T, 3D), the short conv's weight w (3D, K)
    and bias (3D,) -> (the gradient of p (B, T, 3D), the weight and bias gradient sums (K + 1, 3D) fp32: rows j < K
    the taps', row K the bias')."""
    B, T, D = go.shape
    K = w.shape[1]
    block_t, block_c, warps = TILES['gates_bwd']
    per = GATES_BWD_TILES_PER_PROGRAM
    t_groups = -(-T // (block_t * per))
    grid = (B * t_groups, -(-D // block_c))
    gp = p.new_empty(B, T, 3 * D)
    sums = torch.empty((grid[0], 1 << K.bit_length(), 3 * D), device=p.device, dtype=torch.float32)
    with _device(p):
        _gates_bwd_kernel[grid](go, y, gz, p, w, bias, gp, sums, T, D, t_groups, go.stride(0), go.stride(1),
                                *y.stride(), *gz.stride(), p.stride(0), p.stride(1), K=K, KP=sums.shape[1],
                                TILES_PER=per, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    return gp, (sums.sum(0) if grid[0] > 1 else sums[0])[:K + 1]


if triton is not None:
    define_op('gate_in(Tensor a, Tensor v, Tensor wa, Tensor ba, Tensor wv, Tensor bv) -> Tensor', _gate_in_impl,
              lambda a, v, wa, ba, wv, bv: a.new_empty(a.shape[0], a.shape[2], a.shape[1]))
    define_op('gate_out(Tensor y, Tensor q, Tensor wq, Tensor bq) -> Tensor', _gate_out_impl,
              lambda y, q, wq, bq: q.new_empty(q.shape))
    define_op('gate_out_bwd(Tensor go, Tensor q, Tensor wq, Tensor bq) -> Tensor', _gate_out_bwd_impl,
              lambda go, q, wq, bq: q.new_empty(q.shape[0], q.shape[2], q.shape[1]))
    define_op('gates_bwd(Tensor go, Tensor y, Tensor gz, Tensor p, Tensor w, Tensor bias) -> (Tensor, Tensor)',
              _gates_bwd_impl,
              lambda go, y, gz, p, w, bias: (p.new_empty(p.shape),
                                             p.new_empty((w.shape[1] + 1, w.shape[0]), dtype=torch.float32)))


def gates(p, weight, bias):
    """The streams of in_proj's output p (B, T, 3D) and the short conv's weight (3D, 1, K) and bias (3D,), split
    for the kernels: ((q, wq, bq), (a, wa, ba), (v, wv, bv)), each a view."""
    D, K = p.shape[-1] // 3, weight.shape[-1]
    weight, bias = weight.view(3, D, K), bias.view(3, D)
    return tuple((x, weight[i], bias[i]) for i, x in enumerate(p.split(D, dim=-1)))
