"""CUDA behaviour (skipped without a GPU): run on the GPU machine with `python -m pytest tests/test_cuda.py`."""
import pytest
import torch

import hyena
from hyena import HyenaOperator, fftconv, fftconv_reference
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exact_fp32_matmuls(monkeypatch):
    """No tf32 in cuBLAS's matmuls or the Triton kernels' dots, so that two runs of one computation that round
    differently (compiled and eager, or two code paths) agree to fp32."""
    import fftconv_triton
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(fftconv_triton, 'TRITON_DOT', 'ieee')


@pytest.mark.parametrize('impl', ['plain', 'fast', 'triton'])
@pytest.mark.parametrize('L', [7, 1000, 1024, 1537, 4096, 16384])
def test_fftconv_on_cuda_matches_float64_reference(impl, L):
    u, k, D = torch.randn(2, 64, L, device='cuda'), torch.randn(64, L, device='cuda') / L ** 0.5, torch.randn(64, device='cuda')
    expected = fftconv_reference(u.double().cpu(), k.double().cpu(), D.double().cpu())
    y = fftconv(u, k, D, impl=impl)
    tol = 5e-3 if impl == 'triton' else 1e-5  # the Triton kernel's matmuls run in tf32 (~1.3e-3 measured)
    assert rel_err(y.cpu(), expected) < tol


@pytest.mark.parametrize('impl', ['fast', 'triton'])
@pytest.mark.parametrize('L', [1024, 8192])  # triton: the one-kernel path, then the four-step one
def test_fftconv_gradients_on_cuda_match_reference(impl, L):
    u = torch.randn(2, 32, L, device='cuda', requires_grad=True)
    k = (torch.randn(32, L, device='cuda') / L ** 0.5).requires_grad_()
    D = torch.randn(32, device='cuda', requires_grad=True)
    g = torch.randn(2, 32, L, device='cuda')
    grads = torch.autograd.grad((fftconv(u, k, D, impl=impl) * g).sum(), (u, k, D))
    expected = torch.autograd.grad((fftconv_reference(u, k, D) * g).sum(), (u, k, D))
    for a, b in zip(grads, expected):
        assert rel_err(a, b) < (5e-3 if impl == 'triton' else 1e-5)


@pytest.mark.parametrize('L', [1024, 4096])
def test_compiled_operator_is_as_close_to_fp32_as_eager_under_bf16(L):
    # compiled and eager round to bf16 at different places (fused kernels keep fp32 in between), so each is
    # held to the fp32 result rather than to the other (they differ by ~6e-3, 1.2e-2 seen once at L = 4096)
    torch.manual_seed(0)
    op = HyenaOperator(256, l_max=L).cuda()
    x = torch.randn(4, L, 256, device='cuda')
    reference = op(x)
    reference.square().mean().backward()
    reference_grads = {name: p.grad.clone() for name, p in op.named_parameters()}
    op.zero_grad(set_to_none=True)
    compiled = torch.compile(op, dynamic=False)  # as training.compile_model (the [4096] case would recompile dynamic)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        eager_y = op(x)
        compiled_y = compiled(x)
        compiled_y.float().square().mean().backward()
    assert eager_y.dtype == compiled_y.dtype == torch.bfloat16
    assert rel_err(eager_y.float(), reference) < 2e-2
    assert rel_err(compiled_y.float(), reference) < 2e-2
    errors = {name: rel_err(p.grad, reference_grads[name]) for name, p in op.named_parameters()}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda e: -e[1])[:3]


@pytest.mark.parametrize('impl, L', [('fast', 1024), ('triton', 1024), ('triton', 8192)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_compiled_fftconv_gradients_match_eager(impl, L, dtype):
    # torch 2.11 compiled the fast path's gradients (fp32 inputs) and the four-step path's (L = 8192 here; fp32 and
    # bf16) wrong while their forward ended in a no-op y.to(u.dtype) (seen on the H200; see fftconv_triton.in_dtype_of)
    torch.manual_seed(0)
    u = torch.randn(4, 64, L, device='cuda', dtype=dtype, requires_grad=True)
    k = (torch.randn(64, L, device='cuda') / L ** 0.5).requires_grad_()
    D = torch.randn(64, device='cuda', requires_grad=True)
    g = torch.randn(4, 64, L, device='cuda')

    def grads(fn):
        return torch.autograd.grad((fn(u, k, D).float() * g).sum(), (u, k, D))
    eager = grads(lambda *a: fftconv(*a, impl=impl))
    compiled = grads(torch.compile(lambda *a: fftconv(*a, impl=impl), dynamic=False))
    for name, a, b in zip('ukD', compiled, eager):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-2), name


@pytest.mark.parametrize('impl', ['fast', 'triton'])
def test_fused_gates_give_the_torch_paths_values_and_gradients(impl, monkeypatch):
    # T = 1000: the last time tile of each row is partial (tiles of 16 and 64 steps); 96 channels: a partial block
    # for the 128-wide tiles (gates_triton.TILES); K = 4
    exact_fp32_matmuls(monkeypatch)  # the two runs' convolutions agree
    torch.manual_seed(0)
    op = HyenaOperator(96, l_max=1000, short_filter_order=4).cuda()
    x, g = torch.randn(5, 1000, 96, device='cuda'), torch.randn(5, 1000, 96, device='cuda')
    monkeypatch.setattr(hyena, 'FFTCONV_IMPL', impl)

    def run(short):
        monkeypatch.setattr(hyena, 'SHORT_CONV', short)
        op.zero_grad()
        xx = x.clone().requires_grad_()
        y = op(xx)
        y.backward(g)
        return [y, xx.grad] + [p.grad.clone() for p in op.parameters()]
    for a, b in zip(run('fused'), run('conv1d')):
        assert rel_err(a, b) < 1e-5


def test_compiled_fused_gates_under_bf16_are_as_close_to_fp32_as_the_torch_path(monkeypatch):
    torch.manual_seed(0)
    op = HyenaOperator(256, l_max=2048).cuda()
    x = torch.randn(4, 2048, 256, device='cuda')
    reference = op(x)
    reference.square().mean().backward()
    reference_grads = {name: p.grad.clone() for name, p in op.named_parameters()}
    monkeypatch.setattr(hyena, 'SHORT_CONV', 'fused')
    op.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = torch.compile(op, dynamic=False)(x)
        y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), reference) < 2e-2
    errors = {name: rel_err(p.grad, reference_grads[name]) for name, p in op.named_parameters()}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda e: -e[1])[:3]


def test_operator_bf16_close_to_fp32_on_cuda():
    op = HyenaOperator(256, l_max=2048).cuda()
    x = torch.randn(2, 2048, 256, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = op(x)
    assert rel_err(y.float(), op(x)) < 2e-2


def test_cached_decoding_matches_full_forward_on_cuda():
    model = GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=128, hyena_layers=[0])).cuda().eval()
    idx = torch.randint(0, 512, (2, 200), device='cuda')
    with torch.no_grad():
        full, _ = model(idx, idx)
        cache = model.new_cache(200)
        steps = [model(idx[:, :100], cache=cache)[0][:, -1]]
        steps += [model(idx[:, t:t + 1], cache=cache)[0][:, -1] for t in range(100, 200)]
    assert rel_err(torch.stack(steps, 1), full[:, 99:]) < 1e-4


def test_cuda_graph_decoding_matches_eager_recurrent_decoding():
    import recurrent
    from model import decode_graph
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=128, hyena_layers=[0, 1])).cuda().eval()
    recurrent.fit_model(model, d_state=8, iters=0)
    assert model.fixed_size_cache()
    idx = torch.randint(0, 512, (2, 160), device='cuda')
    with torch.no_grad():
        eager_cache, graph_cache = model.new_cache(160), model.new_cache(160)
        model(idx[:, :100], cache=eager_cache)
        model(idx[:, :100], cache=graph_cache)
        step = decode_graph(model, graph_cache, 2)
        for t in range(100, 160):
            expected = model(idx[:, t:t + 1], cache=eager_cache)[0]
            assert rel_err(step(idx[:, t:t + 1]), expected) < 1e-5
        torch.manual_seed(1)
        graphed = model.generate(idx[:, :100], 20, cuda_graph=True)
        torch.manual_seed(1)
        eager = model.generate(idx[:, :100], 20, cuda_graph=False)
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('impl,short', [('fast', 'auto'), ('triton', 'auto'), ('triton', 'fused')])
def test_cuda_graph_training_accumulates_the_same_gradients_as_eager(impl, short, shared, monkeypatch):
    # compile_mode='reduce-overhead' in the training loops: the micro-steps' gradients add up as in eager, also
    # with the filters' taps shared by the micro-steps (training.SharedTaps), whose last micro-step passes them
    # through an identity of its own: one graph for all three (a recompile would be an error here)
    import training as T
    monkeypatch.setattr(hyena, 'FFTCONV_IMPL', impl)
    monkeypatch.setattr(hyena, 'SHORT_CONV', short)
    # with tf32 the two runs' roundings differ, and the first layers of the filter MLPs (the end of a long chain of
    # gradients) differed by up to 1.4e-4 on an H100; a wrong accumulation is O(1)
    exact_fp32_matmuls(monkeypatch)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=128, n_layer=3, n_head=2, n_embd=64, hyena_layers=[1, 2],
                          dropout=0.0)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [torch.randint(0, 128, (2, 257), device='cuda') for _ in range(3)]

    def accumulated(run, graphs, taps):
        T.clear_grads(optimizer, graphs)
        taps.begin()
        for micro, b in enumerate(batches):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            _, loss = run(b[:, :-1], b[:, 1:], taps=taps.taps(micro))
            loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}
    expected = accumulated(model, False, T.SharedTaps(model, 256, 1))  # eager, each micro-step its own taps
    taps = T.SharedTaps(model, 256, 3 if shared else 1)
    torch._dynamo.reset()  # else compiling GPT.forward again for this parametrization counts as a recompile
    compiled = torch.compile(model, dynamic=False, mode='reduce-overhead')
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo would delete the entry)
        for run in range(3):  # warm-up, record, replay
            got = accumulated(compiled, True, taps)
            errors = {name: rel_err(got[name], expected[name]) for name in expected}
            assert max(errors.values()) < 1e-4, (run, sorted(errors.items(), key=lambda e: -e[1])[:4])


def test_guarded_step_with_fused_adamw_launches_without_a_host_sync_and_skips_nonfinite_steps():
    # the training loops' step on CUDA: gated on the device, its numbers read one step late (training.GuardedStep);
    # on the machine's last GPU, which need not be the current one (python distill.py --device=cuda:1)
    import training as T
    device = torch.device('cuda', torch.cuda.device_count() - 1)
    p = torch.nn.Parameter(torch.ones(4096, device=device))
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = T.GuardedStep(optimizer, torch.amp.GradScaler('cuda', enabled=False))
    assert guard.on_device
    losses = torch.tensor([1.0, float('nan'), 2.0], device=device)  # made here: a host-to-device copy would sync
    reported, snapshots = [], [p.detach().clone()]
    for i in range(3):
        p.grad = torch.ones_like(p)
        with torch.cuda.device(device):
            torch.cuda._sleep(50_000_000)  # a busy GPU: each step's numbers arrive well after the host queued it
        torch.cuda.set_sync_debug_mode('error')  # any implicit host sync in the step raises
        try:
            guard.step(losses[i], p.grad.norm(), iter=i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        reported.append(guard.results())
        snapshots.append(p.detach().clone())
    reported.append(guard.results(wait=True))
    assert [not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:])] == [True, False, True]
    assert [[(info['iter'], nonfinite) for info, _, nonfinite in steps] for steps in reported] == \
        [[], [(0, False)], [(1, True)], [(2, False)]]
    assert reported[1][0][1] == 1.0 and reported[3][0][1] == 2.0
