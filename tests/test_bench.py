"""bench.py (CPU smoke run: every table complete, never a timing) and the fast paths it compares in hyena.py
(each against the plain reference / an fp64 direct convolution)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import fftconv_triton  # noqa: E402
import hyena  # noqa: E402
from hyena import HyenaOperator, fft_size, fftconv, short_conv  # noqa: E402


# ---- bench.py smoke run ---------------------------------------------------------------------------------------
QUICK = dict(mixer_lengths=[64, 128], fftconv_lengths=[64, 96], check_lengths=[64, 100], model_blocks=[32, 64],
             gen_contexts=[16, 32])
EXPECTED_ROWS = {
    'env': None,
    'check': 5 * 2 * 2,  # impls x lengths x dtypes
    'check (operator)': 4,
    'mixer': 2,
    'fftconv': 2 * 5,
    'kernels': 8,  # n/a on CPU: test_bench_kernels_section_in_the_interpreter runs them
    'model': 2 * 2 * 8,  # blocks x accums x variants
    'profile': 4 * 3 + 4,  # top-3 kernels of teacher, student, attention, hyena-fast; the Triton ones: n/a on CPU
    'distill': 5,
    'generate': 4 * 2,
}


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, 'bench.py', '--quick=True', '--device=cpu', f'--out_dir={out}'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / 'bench.json') as f:
        results = json.load(f)
    return results, proc.stdout, (out / 'bench.md').read_text()


def test_bench_smoke_every_table_is_complete(smoke):
    results, stdout, md = smoke
    sections = results['sections']
    assert list(sections) == list(EXPECTED_ROWS)
    for name, sec in sections.items():
        assert not sec.get('error'), (name, sec.get('error'))
        assert sec['columns'] and sec['rows'], name
        if EXPECTED_ROWS[name] is not None:
            assert len(sec['rows']) == EXPECTED_ROWS[name], (name, len(sec['rows']))
        for row in sec['rows']:
            assert set(sec['columns']) <= set(row), (name, set(sec['columns']) - set(row))
            for col in sec['columns']:
                v = row[col]
                if isinstance(v, str):
                    assert v.strip(), (name, col)
                    if v.startswith('error'):
                        pytest.fail(f'{name}: {col} = {v}')
                else:
                    assert isinstance(v, (int, float)) and math.isfinite(v), (name, col, v)
        assert f'## {name}' in md and f'## {name}' in stdout


def test_bench_smoke_rows_cover_the_configured_shapes(smoke):
    results, _, _ = smoke
    s = results['sections']
    assert [r['L'] for r in s['mixer']['rows']] == QUICK['mixer_lengths']
    assert sorted({r['L'] for r in s['fftconv']['rows']}) == QUICK['fftconv_lengths']
    assert sorted({r['block'] for r in s['model']['rows']}) == QUICK['model_blocks']
    assert sorted({r['accum'] for r in s['model']['rows']}) == [1, 2]  # bench.py's quick model_accum
    assert sorted({r['context'] for r in s['generate']['rows']}) == QUICK['gen_contexts']
    assert {r['model'] for r in s['generate']['rows']} == {'teacher', 'student', 'recurrent', 'recurrent-eager'}
    # the fast paths that run on CPU pass their correctness check
    for row in s['check']['rows']:
        if row['impl'].startswith('fast'):
            assert row['pass'] == 'yes', row
    for row in s['mixer']['rows']:  # eager variants measured on CPU (times are numbers, never asserted on)
        for v in ('attention', 'hyena-plain', 'hyena-fast'):
            assert isinstance(row[f'ms {v}'], float)


def test_bench_kernels_section_in_the_interpreter(tmp_path):
    """The kernels section times every Triton kernel of the fused student and, with kernel_sweep, every gate tile,
    whose outputs match TILES' (run by Triton's interpreter on CPU: the numbers are host times, never asserted)."""
    pytest.importorskip('triton')
    proc = subprocess.run([sys.executable, 'bench.py', '--quick=True', '--device=cpu', "--sections=['kernels']",
                           '--kernel_sweep=True', f'--out_dir={tmp_path}'], cwd=REPO,
                          env=dict(os.environ, TRITON_INTERPRET='1'), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / 'bench.json') as f:
        sections = json.load(f)['sections']
    assert [r['kernel'] for r in sections['kernels']['rows']] == [
        'spectrum', 'conv', 'conv backward', 'gate_in', 'gate_out', 'gate_in_bwd', 'gate_out_bwd', 'input_grad']
    for row in sections['kernels']['rows']:
        assert all(isinstance(row[c], float) and row[c] > 0 for c in ('us', 'MB moved', 'GB/s', 'x floor')), row
    sweep = sections['kernels (tile sweep)']['rows']
    assert [r['kernel'] for r in sweep] == ['gate_in', 'gate_out', 'gate_in_bwd', 'gate_out_bwd', 'input_grad']
    for row in sweep:
        assert row['tiles timed'] >= 2 and isinstance(row['fastest us'], float), row
        assert row['max rel diff'] < 1e-5, row  # fp32 in the interpreter: only the partial sums' order differs


def test_bench_rejects_an_unknown_compile_scope_in_one_line():
    proc = subprocess.run([sys.executable, 'bench.py', '--device=cpu', '--compile_scope=layers'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert "compile_scope='layers' is not one of model, blocks" in proc.stderr


@pytest.mark.parametrize('override,message', [
    ("--model_variants=['student-trition']", "model_variants: variant 'student-trition': unknown option 'trition'"),
    ("--distill_variants=['teacher']", "distill_variants: variant 'teacher' must start with student")])
def test_bench_rejects_a_bad_variant_in_one_line_before_any_section(override, message):
    proc = subprocess.run([sys.executable, 'bench.py', '--device=cpu', override], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr and '## ' not in proc.stdout
    assert message in proc.stderr


def test_parse_variant():
    import bench
    opts = bench.parse_variant('hyena-triton-bf16-pow2-compile')
    assert (opts['kind'], opts['impl'], opts['dot'], opts['fft'], opts['compile']) == \
        ('hyena', 'triton', 'bf16', 'pow2', True)
    assert bench.parse_variant('hyena-plain')['short'] == 'conv1d'
    graphs = bench.parse_variant('student-graphs')
    assert graphs['graphs'] and graphs['compile'] and bench.compile_mode(graphs) == 'reduce-overhead'
    with pytest.raises(ValueError):
        bench.parse_variant('hyena-warp9')


# ---- the fast paths in hyena.py against the reference ---------------------------------------------------------
def direct_conv64(u, k, D):
    """O(L^2) causal convolution in float64, differentiable (the yardstick)."""
    u, k = u.double(), k.double()
    L = u.shape[-1]
    cols = [u * (D.double().unsqueeze(-1) if D is not None else 0)]
    y = cols[0]
    for s in range(k.shape[-1]):
        y = y + nn.functional.pad(u[..., :L - s] * k[..., s:s + 1], (s, 0))
    return y


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads_of(fn, u, k, D, g):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (u, k, D)]
    y = fn(*leaves)
    y.backward(g.to(y.dtype))
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize('shape,Lk,with_D', [((2, 3, 1), 1, True), ((2, 3, 7), 3, True), ((3, 4, 100), 100, False),
                                             ((2, 5, 257), 130, True), ((4, 37), 37, True), ((2, 2, 3, 50), 50, True)])
def test_fast_fftconv_values_and_gradients_match_fp64(shape, Lk, with_D):
    C = shape[-2]
    u, k, g = torch.randn(shape), torch.randn(C, Lk), torch.randn(shape)
    D = torch.randn(C) if with_D else None
    ref = grads_of(direct_conv64, u.double(), k.double(), D.double() if with_D else None, g.double())
    fast = grads_of(lambda *a: fftconv(*a, impl='fast'), u, k, D, g)
    for a, b in zip(fast, ref):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize('shape,Lk', [((2, 3, 7), 3), ((2, 2, 3, 50), 50)])
def test_compiled_fast_fftconv_values_and_gradients_match_fp64(shape, Lk):
    # torch 2.11 compiled the fast path's gradients to zeros for fp32 inputs (its forward returned a no-op .to())
    C = shape[-2]
    u, k, D, g = torch.randn(shape), torch.randn(C, Lk), torch.randn(C), torch.randn(shape)
    ref = grads_of(direct_conv64, u.double(), k.double(), D.double(), g.double())
    compiled = torch.compile(lambda *a: fftconv(*a, impl='fast'), fullgraph=True, dynamic=False)
    for a, b in zip(grads_of(compiled, u, k, D, g), ref):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-5


def test_fast_fftconv_dtypes_and_autocast():
    u, k, D = torch.randn(2, 3, 100), torch.randn(3, 100), torch.randn(3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = fftconv(u.bfloat16().requires_grad_(), k.requires_grad_(), D, impl='fast')
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert k.grad.dtype == torch.float32
    assert rel(y, fftconv(u, k, D, impl='plain')) < 2e-2


def test_fft_size_modes():
    assert fft_size(2049, mode='pow2') == 4096 and fft_size(2049) < 4096
    for n in (1, 2, 3, 1000, 2047):
        assert fft_size(n, 'pow2') >= n and fft_size(n, 'pow2') & (fft_size(n, 'pow2') - 1) == 0
    assert fft_size(2047, 'pow2') == fft_size(2047, 'smooth') == 2048
    with pytest.raises(ValueError):
        fft_size(10, 'prime')


def test_fftconv_rejects_unknown_impl():
    with pytest.raises(ValueError):
        fftconv(torch.randn(1, 2, 8), torch.randn(2, 8), impl='magic')


@pytest.mark.parametrize('K', [1, 3, 4])
def test_short_conv_shift_equals_conv1d(K, monkeypatch):
    conv = nn.Conv1d(12, 12, K, groups=12, padding=K - 1)
    z = torch.randn(2, 9, 12)
    monkeypatch.setattr(hyena, 'SHORT_CONV', 'conv1d')
    ref = short_conv(z, conv)
    monkeypatch.setattr(hyena, 'SHORT_CONV', 'shift')
    out = short_conv(z, conv)
    assert out.shape == ref.shape == (2, 12, 9)
    assert rel(out, ref) < 1e-6


@pytest.mark.parametrize('order', [2, 3])
def test_operator_fast_settings_match_the_plain_operator(order, monkeypatch):
    torch.manual_seed(0)
    op = HyenaOperator(16, l_max=50, order=order)
    x, gy = torch.randn(2, 50, 16), torch.randn(2, 50, 16)

    def run(impl, short):
        monkeypatch.setattr(hyena, 'FFTCONV_IMPL', impl)
        monkeypatch.setattr(hyena, 'SHORT_CONV', short)
        op.zero_grad()
        xx = x.clone().requires_grad_()
        op(xx).backward(gy)
        return [xx.grad] + [p.grad.clone() for p in op.parameters()]
    ref = run('plain', 'conv1d')
    for short in ('conv1d', 'shift', 'fused'):  # 'fused' here: its fallback (CPU without Triton's interpreter)
        for a, b in zip(run('fast', short), ref):
            assert rel(a, b) < 1e-5


TRITON_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, REPO)
    import fftconv_triton
    import hyena
    from hyena import fftconv, HyenaOperator
    assert fftconv_triton._TRITON_INTERPRET and fftconv_triton.triton is not None
    torch.manual_seed(0)
    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    def grads(impl, u, k, D, g):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (u, k, D)]
        y = fftconv(*leaves, impl=impl)
        y.backward(g)
        return [y] + [t.grad for t in leaves if t is not None]
    fftconv_triton.TRITON_DOT = 'ieee'
    fftconv_triton._TRITON_POISON = True  # every output element must be written
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten, tree_map
    class FakeStrides(TorchDispatchMode):
        """Asserts that every hyena op's outputs have the shapes and strides of its fake kernel's, as inductor does
        on the GPU (the aot_eager compiles below do not)."""
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func.namespace == 'hyena':
                fake = func(*tree_map(lambda a: a.to('meta') if torch.is_tensor(a) else a, args), **kwargs)
                for a, b in zip(tree_flatten(out)[0], tree_flatten(fake)[0]):
                    assert (a.shape, a.stride()) == (b.shape, b.stride()), (func, a.shape, a.stride(), b.stride())
            return out
    def check(cases):
        """Worst fp32 error over the cases; bf16 cases must be within 1e-2 (their outputs carry bf16 rounding)."""
        worst = 0.0
        for (B, C, L, Lk, withD, dtype, rows) in cases:
            fftconv_triton.TRITON_ROWS = rows
            u, k, g = torch.randn(B, C, L).to(dtype), torch.randn(C, Lk), torch.randn(B, C, L).to(dtype)
            D = torch.randn(C) if withD else None
            assert fftconv_triton.applies(u, k, D)
            ref = grads('plain', u.double(), k.double(), D.double() if withD else None, g.double())
            with FakeStrides():
                out = grads('triton', u, k, D, g)
            for a, b in zip(out, ref):
                assert torch.isfinite(a).all()
                if dtype == torch.float32:
                    worst = max(worst, rel(a, b))
                else:
                    assert rel(a, b) < 1e-2, (L, rel(a, b))
            assert out[0].dtype == out[1].dtype == dtype
        return worst
    # rows go through the FFT in pairs: odd batches and odd rows per program leave a row without a partner
    worst = check([(3, 2, 1, 1, True, torch.float32, 2), (3, 2, 100, 37, False, torch.float32, 2),
                   (5, 2, 300, 300, True, torch.float32, 3), (1, 2, 40, 20, True, torch.float32, 0),
                   (2, 3, 700, 700, True, torch.bfloat16, 0)])
    # past TRITON_MAX_N the four-step path (outer DFT matmuls around the row kernels); small sizes so the
    # interpreter sees it: every length here is four-step, with H = 1, 2 and 4 outer frequency pairs
    fftconv_triton.TRITON_MAX_N, fftconv_triton.TRITON_INNER_N = 256, 256
    worst = max(worst, check([(2, 3, 100, 100, True, torch.float32, 0), (1, 2, 300, 77, False, torch.float32, 0),
                              (3, 2, 1000, 1000, True, torch.float32, 2), (2, 2, 257, 200, True, torch.bfloat16, 0)]))
    assert worst < 1e-5, worst
    # torch.compile traces the four-step autograd Function (a constant cache filled inside it broke that) and the
    # fused gates' Functions in one graph
    hyena.FFTCONV_IMPL, hyena.SHORT_CONV = 'triton', 'fused'
    explained = torch._dynamo.explain(HyenaOperator(16, l_max=512))(torch.randn(2, 512, 16))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # the ops' fake kernels carry AOT autograd through both paths: a whole-graph compile, forward and backward,
    # gives the eager values and gradients; last, the four-step path with fp32 intermediates ('tf32'), whose
    # gradients torch 2.11 compiled wrong while its Function ended in a no-op y.to(u.dtype)
    for L, dot in ((100, 'ieee'), (300, 'ieee'), (300, 'tf32')):  # one kernel, four-step (TRITON_MAX_N is 256 here)
        fftconv_triton.TRITON_DOT = dot
        leaves = [torch.randn(2, 4, L, requires_grad=True), torch.randn(4, L, requires_grad=True),
                  torch.randn(4, requires_grad=True)]
        eager = fftconv(*leaves)
        compiled = torch.compile(lambda u, k, D: fftconv(u, k, D), backend='aot_eager', fullgraph=True)(*leaves)
        assert torch.equal(eager, compiled)
        for a, b in zip(torch.autograd.grad(eager.square().sum(), leaves),
                        torch.autograd.grad(compiled.square().sum(), leaves)):
            assert torch.equal(a, b)
    fftconv_triton.TRITON_DOT = 'ieee'
    fftconv_triton.TRITON_MAX_N, fftconv_triton.TRITON_INNER_N, fftconv_triton.TRITON_ROWS = 4096, 0, 0
    hyena.FFTCONV_IMPL = 'plain'
    op = HyenaOperator(16, l_max=64)
    x = torch.randn(2, 64, 16, requires_grad=True)
    op(x).square().sum().backward()
    ref = [x.grad.clone()] + [p.grad.clone() for p in op.parameters()]
    hyena.FFTCONV_IMPL = 'triton'
    op.zero_grad(); x.grad = None
    op(x).square().sum().backward()
    out = [x.grad] + [p.grad for p in op.parameters()]
    assert max(rel(a, b) for a, b in zip(out, ref)) < 1e-5
    hyena.SHORT_CONV = 'shift'  # above: 'fused', the short convs and gates in Triton kernels too
    op.zero_grad(); x.grad = None
    op(x).square().sum().backward()
    assert max(rel(a, b) for a, b in zip([x.grad] + [p.grad for p in op.parameters()], out)) < 1e-5
    def outputs_and_grads(fn, op, x, g, bf16=False):
        """fn(x) (fn: op, or op compiled) and the gradients of <fn(x), g> for x and op's parameters."""
        op.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            y = fn(xx)
        y.float().backward(g)
        return [y, xx.grad] + [p.grad.clone() for p in op.parameters()]
    # the fused gates (SHORT_CONV 'fused', hyena.GatedConv) against the torch path: partial tiles in time and
    # channels, K = 1 and 4, bf16 activations under autocast (the gates' outputs then round to bf16, hence 2e-2),
    # the cuFFT path's functions and both Triton paths (T = 300 takes the four-step one at TRITON_MAX_N = 256)
    fftconv_triton.TRITON_MAX_N = 256
    for (B, T, D, K, bf16, impl) in [(2, 37, 70, 3, False, 'fast'), (1, 5, 16, 1, False, 'fast'),
                                     (3, 70, 24, 4, False, 'fast'), (2, 40, 80, 3, True, 'fast'),
                                     (2, 37, 70, 3, False, 'triton'), (1, 300, 24, 3, False, 'triton')]:
        hyena.FFTCONV_IMPL = impl
        op = HyenaOperator(D, l_max=T, short_filter_order=K)
        x, g = torch.randn(B, T, D), torch.randn(B, T, D)
        hyena.SHORT_CONV = 'fused'
        with FakeStrides():
            fused = outputs_and_grads(op, op, x, g, bf16)
        hyena.SHORT_CONV = 'conv1d'
        errors = [rel(a, b) for a, b in zip(fused, outputs_and_grads(op, op, x, g, bf16))]
        assert max(errors) < (2e-2 if bf16 else 1e-5), (B, T, D, K, impl, errors)
    # the backward kernels write one row of partial sums per program, K + 1 wide (the taps' and the bias's): 5 * 3
    # time tiles of 16 steps at gate_in_bwd's 4 tiles a program are 4 programs (each channel block its own columns)
    import gates_triton
    B, T, D, K = 5, 37, 70, 3
    args = (torch.randn(B, D, T), torch.randn(B, T, D), torch.randn(B, T, D), torch.randn(D, K), torch.randn(D),
            torch.randn(D, K), torch.randn(D))
    gs, sums = gates_triton._gate_in_bwd_impl(*args, gates_triton.TILES['gate_in_bwd'])
    assert gs.shape == (B, T, 2 * D) and sums.shape == (4, K + 1, 2 * D)
    # hyena.GatedConv compiled whole (forward and backward through AOT autograd) gives eager's values and gradients
    hyena.SHORT_CONV = 'fused'
    for impl, T in (('fast', 40), ('triton', 40), ('triton', 300)):
        hyena.FFTCONV_IMPL = impl
        op = HyenaOperator(16, l_max=T)
        x, g = torch.randn(2, T, 16), torch.randn(2, T, 16)
        eager = outputs_and_grads(op, op, x, g)
        torch._dynamo.reset()
        compiled = outputs_and_grads(torch.compile(op, backend='aot_eager', fullgraph=True), op, x, g)
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager)), (impl, T)
    # GatedConv computes in_proj from its parameters, so an in_proj of another type (a LoRA wrapper, say) takes the
    # torch path, which calls it
    class Logged(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)
    calls, fused = [], op(x)
    wrapped = Logged(16, 48)
    wrapped.load_state_dict(op.in_proj.state_dict())
    op.in_proj = wrapped
    assert rel(op(x), fused) < 1e-5 and len(calls) == 1
    fftconv_triton.TRITON_MAX_N = 4096
    print('TRITON_OK', worst)
''')


def test_triton_fftconv_in_the_interpreter_matches_the_reference():
    """The Triton kernels (forward, grad u, grad k / grad D; one-kernel and four-step paths) run on CPU through
    Triton's interpreter."""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', f'REPO = {REPO!r}\n' + TRITON_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and 'TRITON_OK' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_triton_path_falls_back_where_it_does_not_apply():
    # CPU tensors without the interpreter, or no triton at all: impl 'triton' is the 'fast' path
    u, k, D = torch.randn(2, 3, 50), torch.randn(3, 50), torch.randn(3)
    if not fftconv_triton._TRITON_INTERPRET:
        assert not fftconv_triton.applies(u, k, D)
    assert rel(fftconv(u, k, D, impl='triton'), fftconv(u, k, D, impl='plain')) < 1e-5
    assert fftconv_triton._mfft_plan(1) == (512, 32, 16)
    N, N1, N2 = fftconv_triton._mfft_plan(1024)
    assert (N, N1, N2) == (2048, 64, 32) and N >= 2 * 1024
