"""recurrent.py: modal fit of the long filters and constant-memory recurrent decoding."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import recurrent
from hyena import HyenaFilter
from model import GPT, GPTConfig, cache_bytes
from training import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16, hyena_layers=[0, 1])


def modal_taps(poles, residues, direct, L):
    """h[0] = direct, h[t] = Re(sum_k R_k p_k^(t-1)): a filter that is exactly modal, in float64."""
    t = torch.arange(L - 1, dtype=torch.float64)
    taps = (residues.unsqueeze(-1) * poles.unsqueeze(-1) ** t).real.sum(1)
    return torch.cat([direct.unsqueeze(1), taps], dim=1)


def random_modes(C, d, gen):
    radius = 0.5 + 0.45 * torch.rand(C, d, generator=gen, dtype=torch.float64)
    angle = 0.1 + 3.0 * torch.rand(C, d, generator=gen, dtype=torch.float64)
    residues = torch.complex(torch.randn(C, d, generator=gen, dtype=torch.float64),
                             torch.randn(C, d, generator=gen, dtype=torch.float64))
    return torch.polar(radius, angle), residues, torch.randn(C, generator=gen, dtype=torch.float64)


def decode(model, idx, prompt):
    """Logits of positions prompt-1 .. T-1: prefill `prompt` tokens, then one token per step."""
    cache = model.new_cache(idx.shape[1])
    steps = [model(idx[:, :prompt], cache=cache)[0][:, -1]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0][:, -1] for t in range(prompt, idx.shape[1])]
    return torch.stack(steps, 1)


def use_filter(op, fn):
    """Make op's long filter fn(L) (the skip term, op.filter.bias, stays)."""
    op.filter.forward = fn


@pytest.mark.parametrize('order', [2, 3])
def test_modal_filter_is_fitted_exactly_and_decodes_like_the_convolution(order):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    d = 4
    model = GPT(GPTConfig(**TINY, hyena_order=order)).eval()
    for _, op in recurrent.hyena_operators(model):
        p, R, direct = random_modes(op.filter.channels, d, gen)
        use_filter(op, lambda L, p=p, R=R, direct=direct: modal_taps(p, R, direct, L).float())
    idx = torch.randint(0, 64, (2, 32))
    full, _ = model(idx, idx)
    errors = recurrent.fit_model(model, d_state=d, iters=0)
    assert max(errors.values()) < 1e-4
    assert (decode(model, idx, 12) - full[:, 11:]).abs().max() < 1e-5 * max(1.0, full.abs().max().item())


def test_recurrent_decoding_matches_the_full_forward_within_the_fit_error():
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 64, (2, 32))
    full, _ = model(idx, idx)
    err = max(recurrent.fit_model(model, d_state=4, iters=30).values())
    rec = decode(model, idx, 1)  # a 1-token prefill: every later position is decoded recurrently
    ref = full
    rel = ((rec - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()).item()
    assert 0 < rel <= err  # filters off by err; the residual stream dilutes that in the logits
    for _, op in recurrent.hyena_operators(model):  # exactly the convolution with the modal filters
        use_filter(op, op.modal.filter)
    modal_full, _ = model(idx, idx)
    assert (rec - modal_full).abs().max() < 1e-5


def test_recurrent_state_memory_is_constant_in_context_length():
    torch.manual_seed(2)
    model = GPT(GPTConfig(**dict(TINY, pos_emb=False))).eval()  # no learned positions: runs past block_size
    recurrent.fit_model(model, d_state=4, iters=0)
    idx = torch.randint(0, 64, (1, 257))
    cache = model.new_cache(16)  # max_len does not bound a recurrent cache
    model(idx[:, :1], cache=cache)
    sizes = {}
    for t in range(1, 257):
        model(idx[:, t:t + 1], cache=cache)
        if t in (16, 256):
            sizes[t] = cache_bytes(cache)
    assert sizes[16] == sizes[256] > 0


def test_decoding_with_the_position_as_a_tensor_matches_an_int_position():
    # model.decode_graph keeps the position on the device (a CUDA graph cannot read a Python int)
    torch.manual_seed(5)
    model = GPT(GPTConfig(**TINY)).eval()  # learned positions: the position picks wpe rows
    recurrent.fit_model(model, d_state=4, iters=0)
    idx = torch.randint(0, 64, (2, 20))
    expected = decode(model, idx, 8)
    cache = model.new_cache(20)
    steps = [model(idx[:, :8], cache=cache)[0][:, -1]]
    cache['length'] = torch.tensor(cache['length'])
    steps += [model(idx[:, t:t + 1], cache=cache)[0][:, -1] for t in range(8, 20)]
    assert torch.equal(torch.stack(steps, 1), expected)
    assert cache['length'].item() == 20


def test_closed_form_gram_matches_the_explicit_design():
    gen = torch.Generator().manual_seed(4)
    C, d, N = 3, 5, 300
    radius = torch.cat([torch.full((C, 1), recurrent.MAX_RADIUS, dtype=torch.float64),  # the slowest mode allowed
                        0.5 + 0.45 * torch.rand(C, d - 1, generator=gen, dtype=torch.float64)], 1)
    mag_log, theta = radius.log(), 3.0 * torch.rand(C, d, generator=gen, dtype=torch.float64)
    g = torch.randn(C, N, generator=gen, dtype=torch.float64)
    gram, proj = recurrent._gram_and_projection(mag_log, theta, g)
    powers = torch.exp(torch.complex(mag_log, theta).unsqueeze(-1) * torch.arange(N, dtype=torch.float64))
    A = torch.cat([powers.real, -powers.imag], 1).transpose(1, 2)  # (C, N, 2d): [Re p^n, -Im p^n]
    assert torch.allclose(gram, A.transpose(1, 2) @ A, rtol=1e-9, atol=1e-9)
    assert torch.allclose(proj, (A.transpose(1, 2) @ g.unsqueeze(-1)).squeeze(-1), rtol=1e-9, atol=1e-9)


def test_hankel_range_finder_spans_the_top_singular_subspace():
    # the FFT-based products with H must give what an SVD of the formed Hankel matrix gives
    gen = torch.Generator().manual_seed(6)
    p, R, _ = random_modes(3, 4, gen)
    g = modal_taps(p, R, torch.zeros(3, dtype=torch.float64), 201)[:, 1:]  # rank <= 8 per channel
    g = g + 1e-6 * torch.randn(g.shape, generator=gen, dtype=torch.float64)
    V = recurrent._hankel_subspace(g, 100, 8)
    _, _, Vh = torch.linalg.svd(g.unfold(-1, 100, 1))
    top = Vh[:, :8].transpose(1, 2)  # (C, cols, 8)
    assert torch.allclose(V.transpose(1, 2) @ V, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-9)
    assert (top - V @ (V.transpose(1, 2) @ top)).norm() < 1e-4  # same subspace


def test_fit_error_decreases_as_d_state_grows():
    torch.manual_seed(3)
    with torch.no_grad():
        h = HyenaFilter(6, l_max=128)(128)
    errors = [(recurrent.fit_filter(h, d, iters=30)[2] ** 2).mean().sqrt().item() for d in (2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_modal_buffers_stay_fp32_and_follow_the_state_dict():
    torch.manual_seed(4)
    model = GPT(GPTConfig(**TINY))
    recurrent.fit_model(model, d_state=2, iters=0)
    state = {k: v.clone() for k, v in model.state_dict().items() if '.modal.' in k}
    assert state and all(v.dtype == torch.float32 for v in state.values())
    model.to(torch.bfloat16)
    assert all(m.poles.dtype == torch.float32 for m in model.modules() if isinstance(m, recurrent.ModalFilter))
    clone = GPT(GPTConfig(**TINY))
    recurrent.attach_empty(clone, d_state=2)
    clone.load_state_dict(model.state_dict())
    assert all(torch.equal(clone.state_dict()[k], v) for k, v in state.items())


def test_script_fits_saves_and_load_model_rebuilds(tmp_path):
    torch.manual_seed(5)
    model = GPT(GPTConfig(**TINY))
    save_checkpoint({'model': model.state_dict(), 'model_args': TINY}, str(tmp_path / 'ckpt.pt'))
    data = tmp_path / 'data'
    data.mkdir()
    np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16).tofile(data / 'val.bin')
    out = tmp_path / 'ckpt_recurrent.pt'
    run = subprocess.run([sys.executable, 'recurrent.py', f'--ckpt={tmp_path / "ckpt.pt"}', f'--out={out}',
                          '--d_state=4', '--iters=20', f'--data_dir={data}', '--eval_seqs=2', '--eval_len=24',
                          '--device=cpu'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'layer 0: filter fit error' in run.stdout and 'layer 1: filter fit error' in run.stdout
    assert 'recurrent (d_state 4)' in run.stdout
    loaded = recurrent.load_model(str(out))
    ops = recurrent.hyena_operators(loaded)
    assert len(ops) == 2 and all(op.modal is not None and op.modal.d_state == 4 for _, op in ops)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt['modal']['d_state'] == 4 and set(ckpt['modal']['fit_errors']) == {0, 1}
    assert loaded.generate(torch.randint(0, 64, (1, 20)), 8, use_cache=True).shape == (1, 28)
    cache = loaded.new_cache(32)
    loaded(torch.randint(0, 64, (1, 5)), cache=cache)
    assert all(layer['history'] is None and layer['state'].shape[-1] == 4 for layer in cache['layers'])


@pytest.mark.parametrize('arg,message', [('--length=1', 'fit at least 2 taps'),
                                         ('--eval_len=64', 'longer than the model'),
                                         ('--out={ckpt}', 'is the source checkpoint'),
                                         ('--data_dir={tmp}/nowhere', 'val.bin not found')])
def test_script_stops_on_bad_input_before_the_fit(tmp_path, arg, message):
    ckpt = tmp_path / 'ckpt.pt'
    save_checkpoint({'model': GPT(GPTConfig(**TINY)).state_dict(), 'model_args': TINY}, str(ckpt))
    run = subprocess.run([sys.executable, 'recurrent.py', f'--ckpt={ckpt}', '--device=cpu', f'--data_dir={tmp_path}',
                          arg.format(ckpt=ckpt, tmp=tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and 'Traceback' not in run.stderr and message in run.stderr
    assert 'fitting' not in run.stdout and os.listdir(tmp_path) == ['ckpt.pt']  # nothing fitted, nothing written


def test_sample_generates_from_a_recurrent_checkpoint(tmp_path):
    torch.manual_seed(6)
    model = GPT(GPTConfig(**TINY))
    recurrent.fit_model(model, d_state=2, iters=0)
    path = tmp_path / 'ckpt_recurrent.pt'
    save_checkpoint({'model': model.state_dict(), 'model_args': TINY, 'modal': {'d_state': 2}}, str(path))
    run = subprocess.run([sys.executable, 'sample.py', f'--init_from={path}', '--start=A', '--num_samples=1',
                          '--max_new_tokens=6', '--device=cpu'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    sample = run.stdout.split('---------------')[0].splitlines()[-1]  # ids < 64: one printable line
    assert sample.startswith('A') and len(sample) == 7  # the prompt and 6 new tokens
