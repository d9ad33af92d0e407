"""
Recurrent (constant-memory) decoding for Hyena students.

After training, each long filter h (one per channel, length L) of a HyenaOperator is fitted with a small
diagonal state-space model in modal form (LaughingHyena, Massaroli et al. 2023, arXiv:2310.18780):

    h[0] = direct                                   (kept exact: the SSM's feed-through term)
    h[t] = Re( sum_{k < d_state} R_k * p_k^(t-1) )   t >= 1, complex poles |p_k| < 1, residues R_k

d_state counts COMPLEX modes per channel, as StripedHyena's state_size does: the decoding state holds
d_state complex numbers (2 * d_state floats) per channel, and since each mode enters through Re(), it
stands for a conjugate pair: a real SSM of order up to 2 * d_state.

Decoding then needs, per layer and per long convolution, only the state x_k = sum_{s<=t} p_k^(t-s) z_s:

    y_t = direct * z_t + Re(sum_k R_k x_k(t-1)) (+ the operator's skip D z_t);   x(t) = p * x(t-1) + z_t

O(d_state * D) per token and memory constant in the context length (hyena.py's HyenaOperator._prefill
and _step take this path when op.modal is set; the FFT forward is unchanged and still uses the exact
filter). Poles, residues and state stay in fp32 / complex64 whatever the model's dtype (as StripedHyena).

    python recurrent.py --ckpt=out-distill/ckpt.pt --d_state=16 --out=out-distill/ckpt_recurrent.pt
    python recurrent.py --ckpt=out-distill/ckpt.pt --d_state=32 --out=out-distill/ckpt_r32.pt \
        --dataset=pystdlib --eval_seqs=16 --eval_len=1024
    python recurrent.py --ckpt=... --eval_seqs=0            # fit and save only, no perplexity

The script loads a student checkpoint, fits every Hyena layer, prints each layer's fit error, saves a
recurrent checkpoint (the student's dict plus 'modal': {'d_state', 'length', 'fit_errors', ...}; its
state dict holds the poles and residues) and reports val perplexity of the convolutional student (full
FFT forward) against recurrent decoding (teacher-forced: the val tokens fed one at a time through the
cache) on the same eval_seqs sequences of eval_len tokens from data/<dataset>/val.bin (or data_dir).

From Python:

    import recurrent
    errors = recurrent.fit_model(model, d_state=16)        # {layer index: relative L2 fit error}
    cache = model.new_cache(max_len)                       # max_len is not a limit in recurrent mode
    logits, _ = model(prompt, cache=cache); logits, _ = model(next_token, cache=cache) ...
    model.generate(idx, n, use_cache=True)                 # decodes recurrently
    model = recurrent.load_model('out-distill/ckpt_recurrent.pt', device='cuda')

Fitting (fit_filter), per channel, in float64:
  1. poles: Ho-Kalman / ESPRIT (Kung's method) on the square Hankel matrix H[i, j] = h[1 + i + j] of the
     filter: its dominant singular subspace (randomized range finder) is shift-invariant for a sum of
     exponentials, and the eigenvalues of the shift are the poles. A real realization of order r has
     conjugate pairs (one mode each, through Re()) and real poles (one mode each), so realizations of a few
     orders r <= 2 * d_state are cut (by least-squares energy) or padded to d_state modes, |p| is clamped to
     max_radius, and per channel the candidate with the best least-squares fit is kept;
  2. residues: linear least squares on the whole length;
  3. refinement: `iters` steps of variable projection (Golub-Pereyra): Adam on the poles alone (polar form,
     |p| < max_radius by construction), the residues being the least-squares solution for the current
     poles; per channel, the better of (2) and (3) is kept, so refining never makes a channel worse.
Every least-squares solve uses the normal equations with the Gram matrix in closed form (_gram_and_projection:
O(d^2) per channel instead of O(d^2 L)); only A^T h needs the powers p^n.
A filter that is itself modal with d_state modes is recovered to ~1e-7 or better by steps 1-2 alone, where
2 * d_state < L / 2 (the Hankel matrix's rank is capped by its columns).
The fit error reported is ||h - h_fit|| / ||h|| per channel, and per layer over all its channels pooled
(Frobenius norms). Beyond the fitted length (default block_size, the filter's l_max) the modal filter
continues by its own decay, not by the implicit filter's extrapolation.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hyena import HyenaOperator, fft_size

MAX_RADIUS = 0.9999  # |p| <= this: time constant <= 1e4 tokens, the fp32 state stays well conditioned
RIDGE = 1e-12  # relative ridge of the least-squares residue solve (nearly equal poles make it singular)
CHUNK_ELEMENTS = 1 << 24  # bound on (channels x modes x length) tensors built at once, fitting and prefill


# ---- the modal filter ------------------------------------------------------------------------------------

class ModalFilter(nn.Module):
    """Modal form of one HyenaOperator's long filters: channels = (order - 1) * d_model, d_state modes each.

    Buffers (saved in the state dict; poles and residues as real pairs, so they load with weights_only):
    poles, residues (channels, d_state, 2) fp32; direct (channels,) fp32, the exact h[0];
    error (channels,) fp32, each channel's relative fit error. They stay fp32 under model.half() or
    model.to(bfloat16): a pole at 0.999 would round to 1.0 in bf16 (see _apply)."""

    def __init__(self, channels, d_state):
        super().__init__()
        self.channels, self.d_state = channels, d_state
        self.register_buffer('poles', torch.zeros(channels, d_state, 2))
        self.register_buffer('residues', torch.zeros(channels, d_state, 2))
        self.register_buffer('direct', torch.zeros(channels))
        self.register_buffer('error', torch.zeros(channels))

    @classmethod
    def from_fit(cls, poles, residues, direct, error=None):
        """From complex poles and residues (channels, d_state), direct (channels,), error (channels,)."""
        m = cls(*poles.shape)
        m.poles.copy_(torch.view_as_real(poles.to(torch.complex64).cpu()))
        m.residues.copy_(torch.view_as_real(residues.to(torch.complex64).cpu()))
        m.direct.copy_(direct.float().cpu())
        if error is not None:
            m.error.copy_(error.float().cpu())
        return m.to(direct.device)

    def _apply(self, fn, recurse=True):
        # Follow the module's device moves but never its dtype casts: probe fn for the target device.
        device = fn(torch.zeros((), device=self.poles.device)).device
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device)
        return self

    def complex_poles(self):
        return torch.view_as_complex(self.poles)

    def complex_residues(self):
        return torch.view_as_complex(self.residues)

    def extra_repr(self):
        return f"channels={self.channels}, d_state={self.d_state}"

    def filter(self, L):
        """The filter this modal form stands for, (channels, L) fp32 (computed in float64)."""
        p, R = self.complex_poles().to(torch.complex128), self.complex_residues().to(torch.complex128)
        taps = _modal_response(p, R, max(L - 1, 0))
        return torch.cat([self.direct.double().unsqueeze(1), taps], dim=1)[:, :L].float()

    def initial_state(self, inputs):
        """Decoding state after a prompt: inputs, one (B, D, T) long-conv input per order step, ->
        (order - 1, B, D, d_state) complex64 with x = sum_{t<T} p^(T-1-t) z_t for each mode.

        Computed in closed form, as one Vandermonde product per chunk of the prompt, rather than by running
        the recurrence over it: the same O(B * D * d_state * T) work, but as a few large matmuls instead of
        T small sequential steps (T kernel launches per layer on a GPU). The powers p^n (n * log p) and the
        sum are in float64, so a 64K-token prompt loses no phase accuracy and TF32 matmuls (enabled by
        training.setup_precision) do not apply. An FFT would give the convolution at every position; only
        the last one is needed, so the direct sum is cheaper."""
        states = []
        D = inputs[0].shape[1]
        p = self.complex_poles().to(torch.complex128)
        logp_all = torch.complex(p.abs().clamp_min(1e-30).log(), p.angle()).view(len(inputs), D, self.d_state)
        for i, z in enumerate(inputs):
            B, _, T = z.shape
            z = z.double().permute(1, 0, 2)  # (D, B, T)
            acc = z.new_zeros(D, B, 2 * self.d_state)
            step = max(1, CHUNK_ELEMENTS // (4 * D * self.d_state))
            for s in range(0, T, step):
                e = min(T, s + step)
                n = torch.arange(T - 1 - s, T - 1 - e, -1, device=z.device, dtype=torch.float64)  # exponents
                w = torch.exp(logp_all[i].unsqueeze(1) * n.view(1, -1, 1))  # (D, chunk, d) complex128
                acc += torch.bmm(z[..., s:e], torch.cat([w.real, w.imag], dim=-1))  # (D, B, 2d)
            acc = acc.float()
            states.append(torch.complex(acc[..., :self.d_state], acc[..., self.d_state:]).permute(1, 0, 2))
        return torch.stack(states).contiguous()

    def step(self, state, i, v):
        """One token through order step i: state (order - 1, B, D, d_state) complex64 (updated in place),
        v (B, D) fp32 the long-conv input -> h conv z at this position, without the skip term."""
        D = v.shape[-1]
        p = self.complex_poles().view(-1, D, self.d_state)[i]
        R = self.complex_residues().view(-1, D, self.d_state)[i]
        x = state[i]
        y = (x * R).real.sum(-1) + self.direct.view(-1, D)[i] * v
        x.mul_(p).add_(v.unsqueeze(-1))
        return y


# ---- fitting ------------------------------------------------------------------------------------------------

def _powers(p, N):
    """p^n for n = 0..N-1: (..., N), by cumulative product (exact at p = 0: 1, 0, 0, ...)."""
    if N == 0:
        return p.new_zeros(*p.shape, 0)
    rep = p.unsqueeze(-1).expand(*p.shape, N - 1)
    return torch.cat([torch.ones_like(p).unsqueeze(-1), torch.cumprod(rep, dim=-1)], dim=-1)


def _modal_response(p, R, N):
    """Re(sum_k R_k p_k^n) for n = 0..N-1: (C, N), chunked over channels."""
    out = []
    step = max(1, CHUNK_ELEMENTS // max(1, p.shape[1] * N))
    for s in range(0, p.shape[0], step):
        out.append((R[s:s + step].unsqueeze(-1) * _powers(p[s:s + step], N)).real.sum(1))
    return torch.cat(out) if out else p.real.new_zeros(0, N)


def _ridge_solve(gram, proj):
    """x = solve(A^T A + ridge I, A^T g) per channel: least squares by the normal equations, with a ridge relative
    to the Gram matrix's mean diagonal (nearly equal poles make A^T A singular)."""
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + RIDGE * scale * eye, proj.unsqueeze(-1)).squeeze(-1)


def _solve_residues(g, p):
    """Least-squares residues: min_R ||g - Re(sum_k R_k p_k^n)|| per channel; g (C, N) real, p (C, M), |p| < 1
    (a pole at 0 touches g[0] only)."""
    M = p.shape[1]
    x = _ridge_solve(*_gram_and_projection(p.abs().clamp_min(1e-300).log(), p.angle(), g))
    return torch.complex(x[:, :M], x[:, M:])  # Re(R p^n) = Re R Re p^n - Im R Im p^n


def _default_poles(C, d, dtype, device):
    """Fallback poles (radius 0.5, angles spread over (0, pi)) for slots the Hankel step leaves empty."""
    angles = math.pi * (torch.arange(d, dtype=dtype, device=device) + 0.5) / d
    return torch.polar(torch.full((d,), 0.5, dtype=dtype, device=device), angles).expand(C, d).clone()


def _hankel_subspace(g, cols, rank, power_iters=4, oversample=10):
    """Orthonormal basis (C, cols, rank) of the dominant right singular subspace of the Hankel matrices
    H[c, i, j] = g[c, i + j] (C, N - cols + 1, cols), by a randomized range finder with power iterations
    (Halko et al. 2011) and a Rayleigh-Ritz step: a few products with H instead of a full SVD or an
    eigendecomposition of a cols x cols matrix per channel, both slow for cols ~ L/2. H is never formed:
    H v and H^T w are both cross-correlations of g, out[i] = sum_t g[i + t] v[t], done by FFT in
    O(N log N) per vector instead of O(N cols). Chunked over channels; the random start is seeded, so fits
    are reproducible."""
    C, N = g.shape
    k = min(rank + oversample, cols)
    n = fft_size(N)  # >= N: the correlations' lags reach N - 1 at most, so nothing wraps around
    gen = torch.Generator(device=g.device).manual_seed(0)
    out = []
    step = max(1, CHUNK_ELEMENTS // (k * n))
    for s in range(0, C, step):
        spectrum = torch.fft.rfft(g[s:s + step], n=n).unsqueeze(1)  # (c, 1, n // 2 + 1)

        def correlate(v):  # (c, T, k) -> (c, N - T + 1, k): H v for T = cols, H^T v for T = N - cols + 1
            w = torch.fft.irfft(spectrum * torch.fft.rfft(v.transpose(1, 2), n=n).conj(), n=n)
            return w[..., :N - v.shape[1] + 1].transpose(1, 2)
        Q = torch.randn(spectrum.shape[0], cols, k, generator=gen, device=g.device, dtype=g.dtype)
        for _ in range(power_iters):
            Q = torch.linalg.qr(correlate(correlate(Q))).Q
        HQ = correlate(Q)
        _, W = torch.linalg.eigh(HQ.transpose(1, 2) @ HQ)  # ascending
        out.append(Q @ W[..., -rank:])
    return torch.cat(out)


def _initial_poles(g, d_state, max_radius):
    """ESPRIT / Ho-Kalman poles of g (C, N): see the module docstring, step 1."""
    C, N = g.shape
    dtype, device = g.dtype, g.device
    # A square Hankel matrix (Ho-Kalman): the shift invariance must hold over a long window for the poles
    # to extrapolate over the whole filter; windows of a few times the rank fit the window but not the
    # filter (measured: rel. error 0.50 with 48 columns vs 0.11 with L/2 on a smooth filter, d_state 16).
    cols = N // 2
    rank = min(2 * d_state, cols - 1, N - cols)
    if rank < 1:
        return _default_poles(C, d_state, dtype, device)
    V = _hankel_subspace(g, cols, rank)  # (C, cols, rank): spans {p^j}, dominant directions last
    # A real filter's realization of order r has pairs of conjugate poles (one complex mode each, through
    # Re()) and real poles (a whole mode each), so r = 2 * d_state can need more than d_state modes.
    # Candidates: the realizations of several orders r <= 2 * d_state, each cut or padded to d_state
    # modes; per channel, the one whose least-squares fit is best wins.
    ranks = sorted({max(1, round(rank * f)) for f in (0.5, 0.625, 0.75, 0.875, 1.0)})
    best_p, best_err = None, None
    g_norm = g.norm(dim=1).clamp_min(1e-300)
    for r in ranks:
        Vr = V[..., -r:]
        shift = torch.linalg.lstsq(Vr[:, :-1], Vr[:, 1:]).solution if device.type == 'cpu' else \
            torch.linalg.pinv(Vr[:, :-1]) @ Vr[:, 1:]
        p = _select_modes(g, torch.linalg.eigvals(shift), d_state, max_radius)
        err = _rel_errors(g, g_norm, p, _solve_residues(g, p))
        if best_p is None:
            best_p, best_err = p, err
        else:
            better = err < best_err
            best_p, best_err = torch.where(better[:, None], p, best_p), torch.minimum(err, best_err)
    return best_p


def _select_modes(g, ev, d_state, max_radius):
    """d_state modes from the eigenvalues ev (C, r) of a real realization: one pole of each conjugate pair
    and every real pole, radius clamped; beyond d_state, those with the most energy in a least-squares
    fit (of these modes alone) are kept; slots left over get fallback poles."""
    C, r = ev.shape
    dtype, device = g.dtype, g.device
    mode = ev.imag >= 0  # the lower twin of a pair is no mode of its own
    ev = _clamp_radius(torch.where(mode, ev, torch.zeros_like(ev)), max_radius)  # 0: only touches g[0]
    if r > d_state:
        R = _solve_residues(g, ev)
        mag2 = ev.abs() ** 2
        energy = R.abs() ** 2 * (1 - mag2 ** g.shape[1]) / (1 - mag2).clamp_min(1e-12)
        idx = torch.where(mode, energy, torch.full_like(energy, -1.0)).argsort(dim=1, descending=True)
        ev, mode = ev.gather(1, idx[:, :d_state]), mode.gather(1, idx[:, :d_state])
    elif r < d_state:
        ev = torch.cat([ev, ev.new_zeros(C, d_state - r)], dim=1)
        mode = torch.cat([mode, mode.new_zeros(C, d_state - r)], dim=1)
    return torch.where(mode, ev, _default_poles(C, d_state, dtype, device))


def _clamp_radius(p, max_radius):
    return torch.polar(p.abs().clamp(max=max_radius), p.angle())


def _rel_errors(g, h_norm, p, R):
    return (g - _modal_response(p, R, g.shape[1])).norm(dim=1) / h_norm


def _gram_and_projection(mag_log, theta, g):
    """For the modes p = exp(mag_log + i theta) (C, d) and targets g (C, N): the Gram matrix A^T A (C, 2d, 2d)
    of the real least-squares design A[n] = [Re p^n, -Im p^n], n < N, and A^T g (C, 2d).

    The Gram matrix in closed form, by geometric sums: with a = p_k^n, b = p_j^n, Re a Re b = Re(ab + a b*) / 2,
    Im a Im b = Re(a b* - ab) / 2, Re a Im b = Im(ab - a b*) / 2, and sum_n q^n = (1 - q^N) / (1 - q) for
    q = p_k p_j or p_k p_j* (|q| <= MAX_RADIUS^2 < 1). That is O(C d^2) instead of the O(C d^2 N) of forming
    A^T A from A; only A^T g needs the powers p^n, O(C d N)."""
    N = g.shape[-1]
    logp = torch.complex(mag_log, theta)
    p, pN = torch.exp(logp), torch.exp(N * logp)

    def geometric(b, bN):  # sum_n (p_k b_j)^n, (C, d, d)
        return (1 - pN.unsqueeze(2) * bN.unsqueeze(1)) / (1 - p.unsqueeze(2) * b.unsqueeze(1))
    s_pp, s_pc = geometric(p, pN), geometric(p.conj(), pN.conj())
    re_re, im_im, re_im = (s_pp.real + s_pc.real) / 2, (s_pc.real - s_pp.real) / 2, (s_pp.imag - s_pc.imag) / 2
    gram = torch.cat([torch.cat([re_re, -re_im], 2), torch.cat([-re_im.transpose(1, 2), im_im], 2)], 1)
    proj = torch.einsum('cdn,cn->cd', _powers(p, N), g.to(p.dtype))  # sum_n g_n p^n
    return gram, torch.cat([proj.real, -proj.imag], 1)


def _refine(g, h_norm, p, iters, lr, max_radius):
    """Variable projection (Golub & Pereyra 1973): Adam on the poles alone (log-decay and angle), the
    residues being the least-squares solution for the current poles, differentiated through the solve;
    objective sum_c ||g_c - fit_c||^2 / ||h_c||^2. Channels are independent, so chunks of channels are
    optimised one after another (the same result as all at once)."""
    C, N = g.shape
    d = p.shape[1]
    min_decay = -math.log(max_radius)
    out = []
    step = max(1, CHUNK_ELEMENTS // (8 * d * N))
    for s in range(0, C, step):
        gc = g[s:s + step] / h_norm[s:s + step, None]
        gc_sq = gc.pow(2).sum(1)
        decay = (-p[s:s + step].abs().clamp_min(1e-30).log() - min_decay).clamp(1e-6, 30.0)
        a = decay.expm1().log().requires_grad_()  # softplus^-1: decay = min_decay + softplus(a) > min_decay
        theta = p[s:s + step].angle().clone().requires_grad_()
        opt = torch.optim.Adam([a, theta], lr=lr)
        for it in range(iters):
            for group in opt.param_groups:  # cosine decay to 0
                group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * it / iters))
            gram, proj = _gram_and_projection(-(min_decay + F.softplus(a)), theta, gc)
            x = _ridge_solve(gram, proj)
            # ||gc - A x||^2 without A: ||gc||^2 - 2 x.A^T gc + x.A^T A x
            loss = (gc_sq - 2 * (x * proj).sum(1) + (x * (gram @ x.unsqueeze(-1)).squeeze(-1)).sum(1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(torch.polar(torch.exp(-(min_decay + F.softplus(a))), theta))
    return torch.cat(out)


def fit_filter(h, d_state=16, iters=300, lr=1e-2, max_radius=MAX_RADIUS):
    """Fit h (C, L) with the modal form: returns (poles, residues) complex128 (C, d_state) such that
    h[:, t] ~= Re(sum_k residues * poles^(t-1)) for t >= 1 (h[:, 0] stays exact), and each channel's
    relative L2 error ||h - fit|| / ||h|| (C,) float64. Runs in float64 on h's device."""
    if d_state < 1:
        raise ValueError(f"d_state must be >= 1, got {d_state}")
    h = h.detach().double()
    g = h[:, 1:]
    h_norm = h.norm(dim=1).clamp_min(1e-300)
    p = _initial_poles(g, d_state, max_radius)
    R = _solve_residues(g, p)
    err = _rel_errors(g, h_norm, p, R)
    if iters > 0 and g.shape[1] > 0:
        with torch.enable_grad():
            p2 = _clamp_radius(_refine(g, h_norm, p, iters, lr, max_radius), max_radius)
        R2 = _solve_residues(g, p2)
        err2 = _rel_errors(g, h_norm, p2, R2)
        better = err2 < err
        p, R = torch.where(better[:, None], p2, p), torch.where(better[:, None], R2, R)
        err = torch.minimum(err, err2)
    return p, R, err


def hyena_operators(model):
    """(layer index, HyenaOperator) for every Hyena layer of a GPT."""
    return [(i, b.mixer) for i, b in enumerate(model.transformer.h) if isinstance(b.mixer, HyenaOperator)]


@torch.no_grad()
def _filter_taps(op, length):
    return op.filter(length).detach()


def fit_model(model, d_state=16, iters=300, length=None, lr=1e-2, device=None, verbose=False):
    """Fit every Hyena layer's long filters (first `length` taps, default block_size) with d_state modes
    per channel and attach them (op.modal = ModalFilter), so that cached decoding (model.new_cache +
    model(..., cache=...), model.generate(use_cache=True)) runs recurrently. Fitting runs in float64 on
    `device` (default: the model's). Returns {layer index: pooled relative L2 fit error}."""
    length = int(length or model.config.block_size)
    if length < 2:
        raise ValueError(f"fit length must be >= 2, got {length}")
    errors = {}
    for layer, op in hyena_operators(model):
        h = _filter_taps(op, length)
        dev = torch.device(device) if device is not None else h.device
        poles, residues, err = fit_filter(h.to(dev), d_state, iters, lr)
        h_norm2 = h.double().to(dev).norm(dim=1) ** 2
        errors[layer] = math.sqrt((err ** 2 * h_norm2).sum().item() / max(h_norm2.sum().item(), 1e-300))
        op.modal = ModalFilter.from_fit(poles, residues, h[:, 0], err).to(h.device)
        if verbose:
            print(f"layer {layer}: filter fit error {errors[layer]:.3e} (worst channel {err.max().item():.3e})",
                  flush=True)
    return errors


def attach_empty(model, d_state):
    """Give every Hyena layer an unfitted ModalFilter of the right shape (to load a state dict into)."""
    for _, op in hyena_operators(model):
        op.modal = ModalFilter(op.filter.channels, d_state).to(op.filter.bias.device)


def load_model(ckpt_path, device='cpu'):
    """Rebuild a recurrent checkpoint written by this script: the GPT of its model_args, with every Hyena
    layer's ModalFilter, weights loaded, in eval mode on `device`. Decode with model.new_cache /
    model.generate(use_cache=True) as usual; they run recurrently. (training.model_from_checkpoint, which
    sample.py uses, rebuilds recurrent checkpoints the same way.)"""
    from training import fail, load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(ckpt_path, map_location='cpu')
    if not isinstance(ckpt.get('modal'), dict) or 'd_state' not in ckpt['modal']:
        fail(f"checkpoint {ckpt_path} is not a recurrent checkpoint (no 'modal' entry); make one with "
             f"`python recurrent.py --ckpt={ckpt_path} --out=...`")
    return model_from_checkpoint(ckpt).to(device).eval()


# ---- evaluation ---------------------------------------------------------------------------------------------

def val_sequences(path, n_seqs, seq_len, vocab_size):
    """n_seqs windows of seq_len + 1 tokens, evenly spaced over a uint16 .bin file: (n_seqs, seq_len + 1)."""
    from training import fail
    if not os.path.exists(path):
        fail(f"{path} not found: prepare the dataset first (python data/<dataset>/prepare.py) or set data_dir")
    data = np.memmap(path, dtype=np.uint16, mode='r')
    if len(data) < seq_len + 1:
        fail(f"{path} holds {len(data)} tokens, fewer than eval_len + 1 = {seq_len + 1}; lower eval_len")
    starts = np.linspace(0, len(data) - seq_len - 1, n_seqs).astype(np.int64)
    rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    del data
    if rows.max() >= vocab_size:
        fail(f"{path} holds token id {rows.max()} >= the model's vocab_size {vocab_size}: wrong dataset?")
    return torch.from_numpy(rows)


@torch.no_grad()
def perplexities(model, rows, batch_size=8):
    """Mean per-token cross-entropy of rows (S, T + 1) -> (convolutional ppl, decoded ppl), where the
    second feeds the tokens one at a time through model.new_cache (recurrent once the model is fitted)."""
    model.eval()
    device = next(model.parameters()).device
    full, steps, count = 0.0, 0.0, 0
    for s in range(0, rows.shape[0], batch_size):
        x, y = rows[s:s + batch_size, :-1].to(device), rows[s:s + batch_size, 1:].to(device)
        _, loss = model(x, y)
        full += loss.item() * y.numel()
        cache = model.new_cache(x.shape[1])
        logits = torch.cat([model(x[:, t:t + 1], cache=cache)[0] for t in range(x.shape[1])], dim=1)
        steps += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction='sum').item()
        count += y.numel()
    return math.exp(full / count), math.exp(steps / count)


# ---- script -------------------------------------------------------------------------------------------------

ckpt = 'out-distill/ckpt.pt'  # a convolutional student (or hybrid) checkpoint
out = ''  # where the recurrent checkpoint goes; '' = <ckpt folder>/ckpt_recurrent.pt
d_state = 16  # complex modes per channel (StripedHyena's state_size); 8 to 64
iters = 300  # variable-projection (Adam) steps after the Hankel/least-squares fit; 0 = none
lr = 1e-2  # Adam learning rate of the refinement
length = 0  # filter taps to fit; 0 = block_size
dataset = 'pystdlib'
data_dir = ''  # '' = data/<dataset>
eval_seqs = 8  # val sequences for the perplexity comparison; 0 = skip it
eval_len = 0  # tokens per val sequence; 0 = min(block_size, 1024)
eval_batch = 8
device = 'auto'
seed = 1337


def main():
    from configurator import configure
    from training import check_ranges, fail, load_checkpoint, model_from_checkpoint, resolve_device, save_checkpoint
    import time
    config = configure(globals())
    check_ranges(config, {'> 0': ('d_state', 'lr', 'eval_batch'),
                          '>= 0': ('seed', 'iters', 'length', 'eval_seqs', 'eval_len')})
    torch.manual_seed(seed)
    dev = resolve_device(device)
    src = load_checkpoint(ckpt, if_missing="pass --ckpt=<a distilled student's ckpt.pt>")
    if 'modal' in src:
        fail(f"{ckpt} is already a recurrent checkpoint; pass the convolutional student's checkpoint")
    model = model_from_checkpoint(src).to(dev).eval()
    if not hyena_operators(model):
        fail(f"{ckpt} has no Hyena layers (hyena_layers is empty): nothing to fit")
    fit_len = length or model.config.block_size
    if fit_len < 2:
        fail(f"length={length}: fit at least 2 taps (0: block_size)")
    # everything that could stop the run is checked before the fit, not after minutes of it
    out_path = out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), 'ckpt_recurrent.pt')
    if os.path.abspath(out_path) == os.path.abspath(ckpt) or os.path.isdir(out_path):
        fail(f"out={out_path!r} is {'the source checkpoint' if os.path.isfile(out_path) else 'a folder'}; "
             f"pass a new file name, e.g. --out=ckpt_recurrent.pt")
    if eval_seqs > 0:
        seq_len = eval_len or min(model.config.block_size, 1024)
        if model.config.pos_emb and seq_len > model.config.block_size:
            fail(f"eval_len={seq_len} is longer than the model's {model.config.block_size} learned positions; "
                 f"lower --eval_len")
        path = os.path.join(data_dir or os.path.join('data', dataset), 'val.bin')
        rows = val_sequences(path, eval_seqs, seq_len, model.config.vocab_size)
    print(f"fitting {len(hyena_operators(model))} Hyena layers of {ckpt}: d_state {d_state}, {fit_len} taps, "
          f"{iters} refinement steps, on {dev}")
    t0 = time.time()
    errors = fit_model(model, d_state=d_state, iters=iters, length=fit_len, lr=lr, verbose=True)
    print(f"fitted in {time.time() - t0:.1f}s; mean layer fit error {sum(errors.values()) / len(errors):.3e}")
    saved = {k: v for k, v in src.items() if k not in ('model', 'optimizer')}
    saved['model'] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved['modal'] = dict(d_state=d_state, length=fit_len, iters=iters, source=os.path.abspath(ckpt),
                          fit_errors={int(k): float(v) for k, v in errors.items()})
    saved['recurrent_config'] = config
    save_checkpoint(saved, out_path)
    print(f"saved the recurrent checkpoint to {out_path}")
    if eval_seqs > 0:
        t0 = time.time()
        conv, rec = perplexities(model, rows, eval_batch)
        print(f"val ppl on {eval_seqs} x {seq_len} tokens of {path}: convolutional {conv:.4f}, "
              f"recurrent (d_state {d_state}) {rec:.4f} ({100 * (rec / conv - 1):+.3f}%) "
              f"[{time.time() - t0:.1f}s]")


if __name__ == '__main__':
    main()
