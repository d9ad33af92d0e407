"""hyena.py: the FFT long convolution, the implicit filter and the operator."""
import pytest
import torch

import gates_triton
from hyena import HyenaFilter, HyenaOperator, fft_size, fftconv, filter_bank
from model import GPT, GPTConfig


def direct_causal_conv(u, k, D):
    """O(L^2) reference in float64."""
    u, k = u.double(), k.double()
    L = u.shape[-1]
    y = D.double()[:, None] * u
    for s in range(k.shape[-1]):
        y[..., s:] += k[:, s, None] * u[..., :L - s]
    return y


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('L', [1, 2, 7, 64, 1000, 1537])
def test_fftconv_equals_direct_convolution(L):
    u, k, D = torch.randn(2, 3, L), torch.randn(3, L), torch.randn(3)
    assert rel_err(fftconv(u, k, D), direct_causal_conv(u, k, D)) < 1e-5


@pytest.mark.parametrize('L,Lk', [(7, 3), (64, 1), (1537, 500)])
def test_fftconv_with_a_shorter_filter(L, Lk):
    u, k, D = torch.randn(2, 3, L), torch.randn(3, Lk), torch.randn(3)
    assert rel_err(fftconv(u, k, D), direct_causal_conv(u, k, D)) < 1e-5


def test_fftconv_keeps_dtype_and_runs_under_bf16_autocast():
    u, k = torch.randn(2, 3, 100), torch.randn(3, 100)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = fftconv(u.bfloat16(), k)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, fftconv(u, k)) < 2e-2


def test_fft_size_is_even_smooth_and_large_enough():
    for n in [1, 2, 3, 127, 1000, 2049, 3001, 65537]:
        m = fft_size(n)
        assert m >= n and m % 2 == 0
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1
    assert fft_size(2049) < 4096  # less padding than the next power of two


def test_filter_prefix_property():
    f = HyenaFilter(8, l_max=64)
    assert torch.allclose(f(100), f(200)[:, :100], atol=1e-6)


def test_filter_bank_gives_each_filters_taps_and_gradients():
    filters = [HyenaFilter(8, l_max=64) for _ in range(3)]
    g = torch.randn(3, 8, 50)

    def taps_and_grads(fn):
        for f in filters:
            f.zero_grad()
        taps = fn()
        (torch.stack(taps) * g).sum().backward()
        return taps + [p.grad for f in filters for p in f.mlp.parameters()]
    banked = taps_and_grads(lambda: filter_bank(filters, 50))
    alone = taps_and_grads(lambda: [f(50) for f in filters])
    # the batched matmuls sum in another order: an element where terms cancel can differ by more than rtol allows
    # (1 seed in 15 failed allclose(rtol=1e-4, atol=1e-6)); the error of each whole tensor stays ~2e-7
    assert max(rel_err(a, b) for a, b in zip(banked, alone)) < 1e-5


def test_filter_bank_takes_filters_of_different_shapes_one_by_one():
    filters = [HyenaFilter(8, l_max=64), HyenaFilter(16, l_max=64), HyenaFilter(8, l_max=32)]
    assert [tuple(h.shape) for h in filter_bank(filters, 40)] == [(8, 40), (16, 40), (8, 40)]
    assert torch.equal(filter_bank(filters, 40)[2], filters[2](40))


def test_filter_bank_calls_a_filter_whose_forward_was_replaced():
    filters = [HyenaFilter(8, l_max=64) for _ in range(2)]
    filters[1].forward = lambda L: torch.ones(8, L)  # as tests/test_recurrent.py swaps in modal filters
    assert torch.equal(filter_bank(filters, 10)[1], torch.ones(8, 10))


def test_model_with_its_filters_in_one_batch_equals_one_filter_per_layer(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=3, n_head=2, n_embd=16, hyena_layers=[0, 2]))
    idx = torch.randint(0, 50, (2, 33))

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return [loss] + [p.grad.clone() for p in model.parameters()]
    assert set(model.filter_taps(32)) == {0, 2}
    batched = loss_and_grads()
    monkeypatch.setattr(model, 'filter_taps', lambda T: {})  # each Hyena layer computes its own filter
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(batched, loss_and_grads()))


def test_filter_features_are_not_degenerate():
    z, _ = HyenaFilter(8, l_max=64).features(64, 'cpu')
    assert z.std(dim=0)[1:].min() > 0.1  # every sin/cos band varies along the sequence


@pytest.mark.parametrize('kwargs', [dict(order=1), dict(short_filter_order=0)])
def test_operator_rejects_an_order_below_2_or_no_short_filter(kwargs):
    with pytest.raises(ValueError, match='order must be >= 2 and short_filter_order >= 1'):
        HyenaOperator(8, l_max=16, **kwargs)


def test_operator_shape_at_lengths_beyond_l_max():
    op = HyenaOperator(16, l_max=32)
    for L in (1, 31, 100):
        assert op(torch.randn(2, L, 16)).shape == (2, L, 16)


def assert_causal(fn, x, t):
    """Changing x from position t on leaves every output before t unchanged."""
    y = fn(x)
    x2 = x.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:]) * 10
    y2 = fn(x2)
    scale = torch.maximum(y.abs().max(), y2.abs().max())  # FFT rounding spreads in proportion to the largest value
    assert ((y[:, :t] - y2[:, :t]).abs().max() / scale) < 1e-5
    assert ((y[:, t:] - y2[:, t:]).abs().max() / scale) > 1e-3  # the later outputs did change


@pytest.mark.parametrize('order', [2, 3])
def test_operator_is_causal(order):
    torch.manual_seed(order)
    op = HyenaOperator(16, l_max=64, order=order)
    assert_causal(op, torch.randn(2, 64, 16), t=37)


def test_hyena_model_is_causal():
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=16, hyena_layers=[0, 1]))
    embed = lambda idx: model(idx, idx)[0]
    idx = torch.randint(0, 50, (2, 64))
    y = embed(idx)
    idx2 = idx.clone()
    idx2[:, 40:] = (idx2[:, 40:] + 1) % 50
    y2 = embed(idx2)
    assert (y[:, :40] - y2[:, :40]).abs().max() / y.abs().max() < 1e-5
    assert (y[:, 40:] - y2[:, 40:]).abs().max() > 0


def test_operator_gradients_are_finite():
    op = HyenaOperator(16, l_max=64)
    x = torch.randn(2, 64, 16, requires_grad=True)
    op(x).square().mean().backward()
    grads = [x.grad] + [p.grad for p in op.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_operator_bf16_autocast_close_to_fp32():
    op = HyenaOperator(32, l_max=128)
    x = torch.randn(2, 128, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_bf16 = op(x)
    assert rel_err(y_bf16.float(), op(x)) < 2e-2


def test_compiled_operator_equals_eager():
    op = HyenaOperator(16, l_max=64)
    x = torch.randn(2, 64, 16)
    compiled = torch.compile(op)
    assert rel_err(compiled(x), op(x)) < 1e-5


def test_compiled_filter_gradients_stay_fp32_under_bf16_autocast():
    # the filter MLP runs with autocast disabled; a compiled backward must not run its matmuls in the step's bf16
    f = HyenaFilter(16, l_max=64)
    g = torch.randn(16, 64)

    def grads(fn):
        f.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            taps = fn(64)
        (taps * g).sum().backward()  # outside autocast, as a training step's backward
        return [p.grad.clone() for p in f.mlp.parameters()]
    eager = grads(f)
    compiled = grads(torch.compile(f, backend='aot_eager'))
    assert max(rel_err(a, b) for a, b in zip(compiled, eager)) < 1e-5


def test_model_trained_short_runs_long():
    cfg = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=16, hyena_layers=[0, 1], pos_emb=False)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        idx = torch.randint(0, 50, (4, 65))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits, _ = model(torch.randint(0, 50, (1, 1024)), torch.randint(0, 50, (1, 1024)))
    assert logits.shape == (1, 1024, 50) and torch.isfinite(logits).all()


def test_filter_bank_gradients_arrive_in_the_parameters_layout():
    # otherwise autograd copies each into the parameter's layout, a small kernel per weight per step
    filters = [HyenaFilter(8, l_max=64) for _ in range(3)]
    mismatched = []
    for p in (p for f in filters for p in f.parameters()):
        p.register_hook(lambda g, p=p: mismatched.append(g.stride()) if g.stride() != p.stride() else None)
    sum(h.square().sum() for h in filter_bank(filters, 50)).backward()
    assert mismatched == []


@pytest.mark.parametrize('T, K', [(20, 3), (2, 4), (1, 3), (9, 1)])
def test_in_projs_bias_gradient_comes_from_the_short_convs_bias_gradient(T, K):
    # the fused path's shortcut (gates_triton.input_bias_grad) against autograd through the causal short conv,
    # also where T < K - 1 (the conv's zero padding reaches every output step)
    B, D = 3, 4
    p = torch.randn(B, T, 3 * D, requires_grad=True)
    weight, gs = torch.randn(3 * D, 1, K), torch.randn(B, T, 3 * D)
    sc = torch.nn.functional.conv1d(p.transpose(1, 2), weight, padding=K - 1, groups=3 * D)[..., :T]
    sc.backward(gs.transpose(1, 2))
    got = gates_triton.input_bias_grad(gs[..., :D], gs[..., D:], weight, gs.sum((0, 1)))
    assert torch.allclose(got, p.grad.sum((0, 1)), atol=1e-5)
