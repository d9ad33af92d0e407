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
L1/L2) and the transposed tile written once. Its backward writes the gradients of the short convs' outputs and
sums its program's share of their weight and bias gradients (param_grads adds the partials up, inside the compiled
graph when there is one); after both gates, one kernel applies the short convs' transpose to all three streams and
writes the gradient of p whole (hyena.GatedConv runs in_proj and the three steps as one autograd Function, so that
autograd does not concatenate the streams' gradients in another pass, and in_proj's bias gradient comes from the
short conv's bias gradient without another pass over the gradient of p: input_bias_grad).
"""
import torch

import fftconv_triton
from fftconv_triton import define_op, device_of, tl, triton

# Each kernel's tile (time steps, channels) and warps per program: the fastest on the H200 (BENCHMARKS.md). The
# backward kernels' fourth number: how many time tiles one program takes, summing the short conv's weight-gradient
# partials over them in registers (fewer partials for param_grads to reduce, but fewer programs in flight). They
# reach the ops as arguments, since the partials' shape depends on them: a compiled graph then records them.
TILES = dict(gate_in=(16, 128, 1), gate_out=(16, 128, 2), gate_in_bwd=(16, 64, 1, 4), gate_out_bwd=(16, 128, 1, 1),
             input_grad=(16, 128, 4))


def applies(x, order, short_filter):
    """Whether the fused path runs: hyena.SHORT_CONV == 'fused' (checked by the caller), an order-2 operator whose
    short conv has a bias, and its input x on CUDA (or in the interpreter)."""
    return (triton is not None and order == 2 and short_filter.bias is not None
            and (x.is_cuda or fftconv_triton._TRITON_INTERPRET))


if triton is not None:
    @triton.jit
    def _tile(n, t_blocks, BLOCK_T: tl.constexpr):
        """Tile n's batch row and time steps (tiles numbered over (batch, time block), program axis 0)."""
        return (n // t_blocks).to(tl.int64), (n % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)

    @triton.jit
    def _channels(BLOCK_C: tl.constexpr):
        """This program's channels (program axis 1 the channel blocks)."""
        return tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)

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
    def _weight_grad_sums(acc, gs, x_ptr, row, t, c, c_ok, T, x_st, K: tl.constexpr, KP: tl.constexpr):
        """acc (KP, BLOCK_C) plus this tile's share of the short conv's parameter gradients, gs the gradient of
        its output: acc[j, c] += sum_t gs[t, c] x[t - K + 1 + j, c] for the taps j < K, acc[K, c] += sum_t gs[t, c]."""
        tap = tl.arange(0, KP)[:, None]
        acc += tl.where(tap == K, tl.sum(gs, axis=0)[None, :], 0.0)
        for j in tl.static_range(K):
            s = t - (K - 1) + j
            x = tl.load(x_ptr + row + s[:, None] * x_st + c[None, :],
                        mask=((s >= 0) & (s < T))[:, None] & c_ok[None, :], other=0.0)
            acc += tl.where(tap == j, tl.sum(gs * x.to(tl.float32), axis=0)[None, :], 0.0)
        return acc

    @triton.jit
    def _store_sums(acc, sums_ptr, c, c_ok, W, K: tl.constexpr, KP: tl.constexpr):
        """This program's partial sums: sums[program, j, c] = acc[j, c], j <= K."""
        tap = tl.arange(0, KP)[:, None]
        tl.store(sums_ptr + tl.program_id(0) * (K + 1) * W + tap * W + c[None, :], acc,
                 mask=(tap <= K) & c_ok[None, :])

    @triton.jit
    def _gate_in_kernel(a_ptr, v_ptr, wa_ptr, ba_ptr, wv_ptr, bv_ptr, z_ptr, T, D, t_blocks, a_sb, a_st, v_sb, v_st,
                        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """z[b, c, t] = sc(a)[b, t, c] * sc(v)[b, t, c]."""
        b, t = _tile(tl.program_id(0), t_blocks, BLOCK_T)
        c = _channels(BLOCK_C)
        c_ok = c < D
        z = (_short_conv_tile(a_ptr, wa_ptr, ba_ptr, b * a_sb, t, c, c_ok, T, a_st, K, BLOCK_T, BLOCK_C)
             * _short_conv_tile(v_ptr, wv_ptr, bv_ptr, b * v_sb, t, c, c_ok, T, v_st, K, BLOCK_T, BLOCK_C))
        tl.store(z_ptr + (b * D + c[None, :]) * T + t[:, None], z.to(z_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & c_ok[None, :])

    @triton.jit
    def _gate_out_kernel(y_ptr, q_ptr, wq_ptr, bq_ptr, o_ptr, T, D, t_blocks, y_sb, y_sc, y_st, q_sb, q_st,
                         K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """o[b, t, c] = y[b, c, t] * sc(q)[b, t, c]."""
        b, t = _tile(tl.program_id(0), t_blocks, BLOCK_T)
        c = _channels(BLOCK_C)
        c_ok = c < D
        mask = (t < T)[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + b * y_sb + c[None, :] * y_sc + t[:, None] * y_st, mask=mask, other=0.0).to(tl.float32)
        o = y * _short_conv_tile(q_ptr, wq_ptr, bq_ptr, b * q_sb, t, c, c_ok, T, q_st, K, BLOCK_T, BLOCK_C)
        tl.store(o_ptr + (b * T + t[:, None]) * D + c[None, :], o.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_in_bwd_kernel(gz_ptr, a_ptr, v_ptr, wa_ptr, ba_ptr, wv_ptr, bv_ptr, gs_ptr, sums_ptr, T, D, t_blocks,
                            n_tiles, gz_sb, gz_sc, gz_st, a_sb, a_st, v_sb, v_st, K: tl.constexpr, KP: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SUM_TILES: tl.constexpr):
        """Given gz = dL/dz (B, D, T): the gradients of sc(a) and sc(v), gz^T * sc(v) and gz^T * sc(a), into
        gs (B, T, 2D), and the partial sums of both short convs' weight and bias gradients over this program's
        SUM_TILES tiles into sums (programs, K + 1, 2D), a's channels first."""
        c = _channels(BLOCK_C)
        c_ok = c < D
        acc_a = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
        acc_v = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
        first = tl.program_id(0) * SUM_TILES
        for n in range(first, tl.minimum(first + SUM_TILES, n_tiles)):
            b, t = _tile(n, t_blocks, BLOCK_T)
            mask = (t < T)[:, None] & c_ok[None, :]
            gz = tl.load(gz_ptr + b * gz_sb + c[None, :] * gz_sc + t[:, None] * gz_st, mask=mask,
                         other=0.0).to(tl.float32)
            gs_a = gz * _short_conv_tile(v_ptr, wv_ptr, bv_ptr, b * v_sb, t, c, c_ok, T, v_st, K, BLOCK_T, BLOCK_C)
            gs_v = gz * _short_conv_tile(a_ptr, wa_ptr, ba_ptr, b * a_sb, t, c, c_ok, T, a_st, K, BLOCK_T, BLOCK_C)
            out = gs_ptr + (b * T + t[:, None]) * (2 * D) + c[None, :]
            tl.store(out, gs_a.to(gs_ptr.dtype.element_ty), mask=mask)
            tl.store(out + D, gs_v.to(gs_ptr.dtype.element_ty), mask=mask)
            acc_a = _weight_grad_sums(acc_a, gs_a, a_ptr, b * a_sb, t, c, c_ok, T, a_st, K, KP)
            acc_v = _weight_grad_sums(acc_v, gs_v, v_ptr, b * v_sb, t, c, c_ok, T, v_st, K, KP)
        _store_sums(acc_a, sums_ptr, c, c_ok, 2 * D, K, KP)
        _store_sums(acc_v, sums_ptr + D, c, c_ok, 2 * D, K, KP)

    @triton.jit
    def _gate_out_bwd_kernel(go_ptr, y_ptr, q_ptr, wq_ptr, bq_ptr, gy_ptr, gs_ptr, sums_ptr, T, D, t_blocks, n_tiles,
                             go_sb, go_st, y_sb, y_sc, y_st, q_sb, q_st, K: tl.constexpr, KP: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SUM_TILES: tl.constexpr):
        """Given go = dL/do (B, T, D): gy = go^T * sc(q) (B, D, T), the gradient of sc(q), go * y^T, into gs
        (B, T, D), and the partial sums of the short conv's weight and bias gradients over this program's
        SUM_TILES tiles into sums (programs, K + 1, D)."""
        c = _channels(BLOCK_C)
        c_ok = c < D
        acc = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
        first = tl.program_id(0) * SUM_TILES
        for n in range(first, tl.minimum(first + SUM_TILES, n_tiles)):
            b, t = _tile(n, t_blocks, BLOCK_T)
            mask = (t < T)[:, None] & c_ok[None, :]
            go = tl.load(go_ptr + b * go_sb + t[:, None] * go_st + c[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + b * y_sb + c[None, :] * y_sc + t[:, None] * y_st, mask=mask,
                        other=0.0).to(tl.float32)
            sc = _short_conv_tile(q_ptr, wq_ptr, bq_ptr, b * q_sb, t, c, c_ok, T, q_st, K, BLOCK_T, BLOCK_C)
            tl.store(gy_ptr + (b * D + c[None, :]) * T + t[:, None], (go * sc).to(gy_ptr.dtype.element_ty),
                     mask=mask)
            gs = go * y
            tl.store(gs_ptr + (b * T + t[:, None]) * D + c[None, :], gs.to(gs_ptr.dtype.element_ty), mask=mask)
            acc = _weight_grad_sums(acc, gs, q_ptr, b * q_sb, t, c, c_ok, T, q_st, K, KP)
        _store_sums(acc, sums_ptr, c, c_ok, D, K, KP)

    @triton.jit
    def _short_conv_input_grad_kernel(gs1_ptr, gs2_ptr, w_ptr, gx_ptr, T, W1, W, t_blocks, K: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """gx[b, t, c] = sum_s w[c, K - 1 - s] gs[b, t + s, c]: the gradient of the short conv's input x (B, T, W),
        given gs, that of its output, as two contiguous pieces (channels [0, W1) in gs1, the rest in gs2), and its
        weight w (W, K): x[t] reaches sc[t + s] through tap K - 1 - s."""
        b, t = _tile(tl.program_id(0), t_blocks, BLOCK_T)
        c = _channels(BLOCK_C)
        c_ok = c < W
        in1, in2 = c < W1, (c >= W1) & c_ok
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for s in tl.static_range(K):
            ts = ((b * T + t + s)[:, None]).to(tl.int64)
            t_ok = (t + s < T)[:, None]
            g = (tl.load(gs1_ptr + ts * W1 + c[None, :], mask=t_ok & in1[None, :], other=0.0).to(tl.float32)
                 + tl.load(gs2_ptr + ts * (W - W1) + (c - W1)[None, :], mask=t_ok & in2[None, :],
                           other=0.0).to(tl.float32))
            acc += tl.load(w_ptr + c * K + (K - 1 - s), mask=c_ok, other=0.0).to(tl.float32)[None, :] * g
        tl.store(gx_ptr + (b * T + t[:, None]) * W + c[None, :], acc.to(gx_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & c_ok[None, :])


def _launch(tiles, B, T, W):
    """(grid, time blocks, launch options) for tiles, an entry of TILES: one program per block of channels and per
    (batch, time-block) tile, or per tiles[3] of them for the backward kernels."""
    block_t, block_c, warps, *sum_tiles = tiles
    t_blocks = -(-T // block_t)
    launch = dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    if sum_tiles:
        launch['SUM_TILES'] = sum_tiles[0]
    return (-(-B * t_blocks // launch.get('SUM_TILES', 1)), -(-W // block_c)), t_blocks, launch


def _gate_in_impl(a, v, wa, ba, wv, bv):
    B, T, D = a.shape
    z = a.new_empty(B, D, T)
    grid, t_blocks, launch = _launch(TILES['gate_in'], B, T, D)
    with device_of(a):
        _gate_in_kernel[grid](a, v, wa, ba, wv, bv, z, T, D, t_blocks, a.stride(0), a.stride(1), v.stride(0),
                              v.stride(1), K=wa.shape[1], **launch)
    return z


def _gate_out_impl(y, q, wq, bq):
    B, T, D = q.shape
    o = q.new_empty(B, T, D)
    grid, t_blocks, launch = _launch(TILES['gate_out'], B, T, D)
    with device_of(q):
        _gate_out_kernel[grid](y, q, wq, bq, o, T, D, t_blocks, *y.stride(), q.stride(0), q.stride(1),
                               K=wq.shape[1], **launch)
    return o


def _sums(tiles, x, K, W):
    """The per-program partial sums of the weight and bias gradients that a backward kernel run with tiles writes
    for input x (B, T, .): (programs, K + 1, W) fp32; param_grads adds them up."""
    grid, _, _ = _launch(tiles, x.shape[0], x.shape[1], 1)
    return x.new_empty((grid[0], K + 1, W), dtype=torch.float32)


def _short_conv_input_grad_impl(gs_q, gs_av, w):
    """gs_q (B, T, D) and gs_av (B, T, 2D), contiguous: the gradient of the short conv's output, its q and its
    (a, v) channels; w (3D, K) -> the gradient of its input, in_proj's output (B, T, 3D)."""
    B, T, D = gs_q.shape
    gx = gs_q.new_empty(B, T, 3 * D)
    grid, t_blocks, launch = _launch(TILES['input_grad'], B, T, 3 * D)
    with device_of(gs_q):
        _short_conv_input_grad_kernel[grid](gs_q, gs_av, w, gx, T, D, 3 * D, t_blocks, K=w.shape[1], **launch)
    return gx


def _gate_in_bwd_impl(gz, a, v, wa, ba, wv, bv, tiles):
    B, T, D = a.shape
    K = wa.shape[1]
    gs = a.new_empty(B, T, 2 * D)
    grid, t_blocks, launch = _launch(tiles, B, T, D)
    sums = _sums(tiles, a, K, 2 * D)
    with device_of(a):
        _gate_in_bwd_kernel[grid](gz, a, v, wa, ba, wv, bv, gs, sums, T, D, t_blocks, B * t_blocks, *gz.stride(),
                                  a.stride(0), a.stride(1), v.stride(0), v.stride(1), K=K, KP=1 << K.bit_length(),
                                  **launch)
    return gs, sums


def _gate_out_bwd_impl(go, y, q, wq, bq, tiles):
    B, T, D = q.shape
    K = wq.shape[1]
    gy, gs = y.new_empty(B, D, T), q.new_empty(B, T, D)
    grid, t_blocks, launch = _launch(tiles, B, T, D)
    sums = _sums(tiles, q, K, D)
    with device_of(q):
        _gate_out_bwd_kernel[grid](go, y, q, wq, bq, gy, gs, sums, T, D, t_blocks, B * t_blocks, go.stride(0),
                                   go.stride(1), *y.stride(), q.stride(0), q.stride(1), K=K, KP=1 << K.bit_length(),
                                   **launch)
    return gy, gs, sums


if triton is not None:
    define_op('gate_in(Tensor a, Tensor v, Tensor wa, Tensor ba, Tensor wv, Tensor bv) -> Tensor', _gate_in_impl,
              lambda a, v, wa, ba, wv, bv: a.new_empty(a.shape[0], a.shape[2], a.shape[1]))
    define_op('gate_out(Tensor y, Tensor q, Tensor wq, Tensor bq) -> Tensor', _gate_out_impl,
              lambda y, q, wq, bq: q.new_empty(q.shape))
    define_op('gate_out_bwd(Tensor go, Tensor y, Tensor q, Tensor wq, Tensor bq, int[] tiles) '
              '-> (Tensor, Tensor, Tensor)', _gate_out_bwd_impl,
              lambda go, y, q, wq, bq, tiles: (y.new_empty(y.shape), q.new_empty(q.shape),
                                               _sums(tiles, q, wq.shape[1], q.shape[2])))
    define_op('gate_in_bwd(Tensor gz, Tensor a, Tensor v, Tensor wa, Tensor ba, Tensor wv, Tensor bv, int[] tiles) '
              '-> (Tensor, Tensor)', _gate_in_bwd_impl,
              lambda gz, a, v, wa, ba, wv, bv, tiles: (a.new_empty(a.shape[0], a.shape[1], 2 * a.shape[2]),
                                                       _sums(tiles, a, wa.shape[1], 2 * a.shape[2])))
    define_op('short_conv_input_grad(Tensor gs_q, Tensor gs_av, Tensor w) -> Tensor', _short_conv_input_grad_impl,
              lambda gs_q, gs_av, w: gs_q.new_empty(gs_q.shape[0], gs_q.shape[1], 3 * gs_q.shape[2]))


def param_grads(sums_q, sums_av, weight, bias):
    """The backward kernels' partial sums, (programs, K + 1, D) for q and (programs, K + 1, 2D) for a and v -> the
    gradients of the short conv's weight (3D, 1, K) and bias (3D,). Under torch.compile the sums are two small
    reductions inside the graph (as eager calls in the ops they cost 0.4 ms of the GPT-2-size 1K step)."""
    K = weight.shape[-1]
    sums = torch.cat([sums_q.sum(0), sums_av.sum(0)], dim=1)  # (K + 1, 3D)
    # contiguous, the parameter's layout: in the compiled graph the reduction writes it so, where autograd would
    # otherwise copy a transposed gradient into that layout in a kernel of its own
    return sums[:K].t().contiguous().view(weight.shape).to(weight.dtype), sums[K].to(bias.dtype)


def input_bias_grad(gs_q, gs_av, weight, bias_grad):
    """The gradient of in_proj's bias (3D,), a bias on the short conv's input, given gs, the gradient of the conv's
    output (its q and its (a, v) channels, (B, T, D) and (B, T, 2D)), the conv's weight w (3D, 1, K) and its bias
    gradient S = sum_u gs[u]. Input step t reaches output t + s through tap K - 1 - s while t + s < T, so
    sum_t dL/dp[t] = sum_s w[K - 1 - s] (S - sum_{u<s} gs[u]) = S sum_j w[j] - sum_{u<K-1} gs[u] sum_{j<K-1-u} w[j]:
    it reads gs's first K - 1 steps, where summing dL/dp read all of (B, T, 3D)."""
    K = weight.shape[-1]
    w = weight.flatten(1).float()
    heads = torch.cat([gs_q[:, :K - 1], gs_av[:, :K - 1]], dim=2).float().sum(0).t()  # (3D, min(T, K - 1))
    reach = w.cumsum(1)[:, :K - 1].flip(1)[:, :heads.shape[1]]  # reach[:, u] = sum_{j<K-1-u} w[j]
    return bias_grad.float() * w.sum(1) - (heads * reach).sum(1)


def gates(p, weight, bias):
    """The streams of in_proj's output p (B, T, 3D) and the short conv's weight (3D, 1, K) and bias (3D,), split
    for the kernels: ((q, wq, bq), (a, wa, ba), (v, wv, bv)), each a view."""
    D, K = p.shape[-1] // 3, weight.shape[-1]
    weight, bias = weight.view(3, D, K), bias.view(3, D)
    return tuple((x, weight[i], bias[i]) for i, x in enumerate(p.split(D, dim=-1)))
