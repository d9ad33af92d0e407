"""
Speed benchmarks: the teacher (GPT-2 124M shape) against the all-Hyena student, at the mixer, the
long convolution, the training step (and the kernels it spends its time in), the distillation step and
generation (issue 5; issue 6 item 3).
Every section runs in its own try/except: a failure becomes an 'error: ...' cell, never a crash.
Results: markdown tables on stdout and in out_dir/bench.md, everything in out_dir/bench.json
(rewritten after each section, so a run cut short still leaves what it measured).

    python bench.py                                   # all sections on the GPU (15-20 min on one H200)
    python bench.py --sections="['mixer','fftconv']"  # a subset: env check mixer fftconv kernels model profile
                                                      # distill generate
    python bench.py --sections="['env','kernels']" --kernel_sweep=True  # each Triton kernel; the gates' tiles swept
    python bench.py --quick=True --device=cpu         # CPU smoke run on tiny shapes (what the tests run)
    python bench.py --compile=False                   # eager training steps (compiling is the default on CUDA)

Variants are strings, so one call compares them all:
  mixer_variants / fftconv_variants: 'attention' or 'hyena' followed by options joined with '-':
    plain | fast | triton    fftconv implementation (hyena.FFTCONV_IMPL); 'plain' also means cuDNN short conv
    pow2 | smooth            FFT sizes (hyena.FFT_SIZE)
    tf32 | bf16 | ieee       operand precision of the Triton kernel's matmuls (fftconv_triton.TRITON_DOT)
    conv1d | shift | fused   short conv (hyena.SHORT_CONV; default: shift when compiled, conv1d in eager; fused:
                             short convs and gates in Triton kernels, gates_triton.py, CUDA)
    compile                  torch.compile(dynamic=False) the module (CUDA only)
    graphs                   CUDA graphs: torch.compile's mode='reduce-overhead' (implies compile; with model and
                             distill variants the compiled blocks or model replay as CUDA graphs)
    e.g. 'hyena-triton-bf16-compile'. fftconv_variants take the same options without the leading kind.
  model_variants: 'teacher' or 'student' with the same options, e.g. 'student-triton'; distill_variants: 'student'
  with them (its teacher compiled the same way); profile_variants: any of the four kinds. bench.py checks every
  list before it runs a section.
"""
import contextlib
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

import fftconv_triton
import gates_triton
import hyena
import training
from model import GPT, CausalSelfAttention, GPTConfig, cache_bytes

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out-bench'
device = 'cuda' if torch.cuda.is_available() else 'cpu'
sections = ['env', 'check', 'mixer', 'fftconv', 'kernels', 'model', 'profile', 'distill', 'generate']
quick = False  # tiny shapes for a CPU smoke run (keys given on the command line still win)
seed = 1337
cpu_threads = 0  # torch.set_num_threads on CPU (0: leave torch's default); quick runs use 1
max_minutes = 30.0  # sections that would start after this are skipped (and say so)
# timing: triton.testing.do_bench (median) on CUDA where it imports, else CUDA events / host clock, median
warmup_ms = 25
rep_ms = 100
# shapes shared by every section
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
# speed knobs of hyena.py that are not per-variant
triton_max_n = 4096  # fftconv_triton.TRITON_MAX_N: largest FFT size of the one-kernel path (four-step beyond)
triton_inner_n = 0  # fftconv_triton.TRITON_INNER_N: row FFT size of the four-step path (0: auto)
triton_num_warps = 0  # fftconv_triton.TRITON_NUM_WARPS (0: by path, 4 one-kernel, 2 four-step)
triton_rows = 0  # fftconv_triton.TRITON_ROWS (0: auto)
# check: CUDA correctness of every fast path against an fp64 reference, compiled against eager under bf16
check_lengths = [1000, 2048, 16384]
check_batch = 4
check_channels = 64
check_impls = ['fast', 'fast-pow2', 'triton', 'triton-bf16', 'triton-ieee']
check_op_length = 2048
check_op_variants = ['hyena-fast', 'hyena-fast-compile', 'hyena-triton', 'hyena-triton-compile']
# mixer: fwd+bwd of one sequence mixer under bf16 autocast, B * L = mixer_tokens
mixer_lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
mixer_tokens = 65536
mixer_variants = ['attention', 'hyena-plain', 'hyena-fast', 'hyena-fast-compile', 'hyena-triton', 'hyena-triton-bf16',
                  'hyena-triton-compile', 'hyena-triton-bf16-compile', 'hyena-triton-bf16-fused-compile']
# fftconv: the long convolution alone on (B, n_embd, L) bf16, against its memory-bandwidth floor
fftconv_lengths = [1024, 1536, 2048, 3072, 4096, 6144, 8192, 16384, 65536]
fftconv_tokens = 65536
fftconv_variants = ['plain', 'fast', 'fast-pow2', 'triton', 'triton-bf16']
copy_mb = 1024  # size of the device-to-device copy that measures the bandwidth ceiling
# kernels: each Triton kernel of the fused bf16 student's operator alone, at the training step's shapes for
# kernel_block (batch model_tokens // kernel_block, n_embd channels; one-kernel path, L <= triton_max_n / 2), timed
# as CUDA-graph replays of kernel_reps back-to-back calls (GPU time, L2 warm: do_bench reads small launches high,
# its host-side launch included); kernel_sweep: also time every gate-kernel tile below (gates_triton.TILES' choice;
# ~400 tiles, minutes of compiling)
kernel_block = 1024
kernel_reps = 20
kernel_sweep = False
kernel_sweep_t = [8, 16, 32, 64]  # time steps per tile
kernel_sweep_c = [32, 64, 128, 256]  # channels per tile
kernel_sweep_warps = [1, 2, 4, 8]
kernel_sweep_sums = [1, 2, 4]  # backward kernels: time tiles per program
# model: a training step (fwd + bwd + fused AdamW), bf16 autocast
model_blocks = [1024, 4096, 16384]
model_tokens = 16384  # tokens per micro-step: batch = model_tokens // block_size
model_accum = [1, 4]  # micro-steps per optimizer step (gradient accumulation; the GPU configs use 4 or 40)
model_share_taps = True  # students: the filters' taps once per optimizer step (training.SharedTaps), as the loops do
model_variants = ['teacher', 'student', 'student-triton', 'student-triton-bf16', 'student-triton-bf16-fused',
                  'teacher-graphs', 'student-triton-bf16-graphs', 'student-triton-bf16-fused-graphs']
#                 (student / teacher: against the last teacher row)
model_warmup = 3
model_iters = 10
# profile: the kernels a training step spends its time in (torch.profiler), per variant
profile_block = 1024
profile_variants = ['teacher', 'student', 'student-triton-bf16', 'student-triton-bf16-fused', 'attention',
                    'hyena-fast', 'hyena-triton-bf16-compile', 'hyena-triton-bf16-fused-compile']
#                   (training steps at profile_block, then mixers at L = profile_block)
profile_steps = 3
profile_top = 15
compile = True  # torch.compile the training/distill steps on CUDA
compile_scope = 'model'  # 'model': the whole model compiled, as train_teacher.py and distill.py compile it (the
#                          lm_head and cross-entropy fused in: the teacher's 1K step 34.9 vs 41.6 ms, 3.0 vs 12.6 GB
#                          on an H200); 'blocks': each Block compiled (identical blocks share one graph: faster;
#                          the student's batched filters, GPT.filter_taps, then run eagerly outside them)
# distill: teacher forward (no_grad) + student fwd/bwd/AdamW on alpha * T^2 * KL + (1 - alpha) * CE
distill_block = 1024
distill_tokens = 16384
distill_variants = ['student', 'student-triton', 'student-graphs', 'student-triton-bf16-graphs',
                    'student-triton-bf16-fused-graphs']
kd_temperature = 2.0
kd_alpha = 0.5
# generate: prefill a random prompt of each context, then time new tokens with model.generate(use_cache=True)
gen_contexts = [1024, 4096, 16384, 65536]
gen_new_tokens = 128
gen_batch = 8
gen_models = ['teacher', 'student', 'recurrent', 'recurrent-eager']
gen_d_state = 16
gen_fit_length = 2048  # recurrent fit: taps fitted and iterations (speed does not depend on the fit's quality)
gen_fit_iters = 0
gen_autocast = True  # bf16 autocast on CUDA
# -----------------------------------------------------------------------------------------------------------
QUICK = dict(cpu_threads=1, n_layer=2, n_head=4, n_embd=32, vocab_size=128, warmup_ms=1, rep_ms=5,
             check_lengths=[64, 100], check_batch=2, check_channels=8, check_op_length=64,
             mixer_lengths=[64, 128], mixer_tokens=256, fftconv_lengths=[64, 96], fftconv_tokens=256, copy_mb=16,
             kernel_block=64, kernel_reps=2, kernel_sweep_t=[16], kernel_sweep_c=[16, 32], kernel_sweep_warps=[1],
             kernel_sweep_sums=[1, 2], model_blocks=[32, 64], model_tokens=128, model_accum=[1, 2], model_warmup=1,
             model_iters=2,
             profile_block=32, profile_steps=1, profile_top=3,
             distill_block=32, distill_tokens=128, gen_contexts=[16, 32], gen_new_tokens=4, gen_batch=2)

from configurator import configure  # noqa: E402

if __name__ == '__main__':
    config = configure(globals())
    if quick:
        given = {a[2:].split('=', 1)[0] for a in sys.argv[1:] if a.startswith('--')}
        for key, value in QUICK.items():
            if key not in given:
                globals()[key] = value
        config.update({k: globals()[k] for k in QUICK if k not in given})

CUDA = False  # set in main()
START = time.time()


# ---- small helpers ----------------------------------------------------------------------------------------
def sync():
    if CUDA:
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(device_type='cuda' if CUDA else 'cpu', dtype=torch.bfloat16)


def fill(row, columns, value):
    """Give every column the row lacks the same cell: why it was skipped, or the error that stopped it."""
    row.update({c: value for c in columns if c not in row})


def error_cell(e):
    msg = f"{type(e).__name__}: {e}".replace('\n', ' ').replace('|', '/')
    return 'error: ' + (msg[:160] + '...' if len(msg) > 160 else msg)


def free_memory():
    import gc
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


_DO_BENCH = None


def time_once(fn):
    """Milliseconds of one fn() call: CUDA events around it on the GPU, the host clock on the CPU."""
    if not CUDA:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench_ms(fn, grad_to_none=None):
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA when it imports (warm-up and repeats in
    ms, L2 flushed between runs), else CUDA events around each run (or the host clock on CPU)."""
    global _DO_BENCH
    if CUDA and _DO_BENCH is None:
        try:
            from triton.testing import do_bench
            _DO_BENCH = do_bench
        except Exception:
            _DO_BENCH = False
    if CUDA and _DO_BENCH:
        try:
            return float(_DO_BENCH(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode='median'))
        except TypeError:  # an older do_bench without return_mode
            return float(_DO_BENCH(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5]))
    # own timing: estimate one run, then warm up for warmup_ms and time for rep_ms
    def clear():
        for t in grad_to_none or []:
            t.grad = None
    clear()
    fn()
    sync()
    t0 = time.perf_counter()
    clear()
    fn()
    sync()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        clear()
        fn()
    times = []
    for _ in range(max(3, min(1000, int(rep_ms / est)))):
        clear()
        times.append(time_once(fn))
    return statistics.median(times)


def queued_ms(fn, iters):
    """Mean ms of fn() over iters runs queued back to back with one sync at the end: the rate of the training
    loops, whose host never waits on the GPU between steps (training.GuardedStep)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / iters


def time_steps(fn, warmup, iters):
    """Median ms of fn() over iters runs after warmup runs (for steps too long for do_bench's repeats)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        times.append(time_once(fn))
    return statistics.median(times)


def peak_mb(fn, absolute=False):
    """Peak CUDA memory of fn() in MiB: above what was allocated before it, or absolute. 'n/a' on CPU."""
    if not CUDA:
        fn()
        return 'n/a (cpu)'
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - (0 if absolute else base)) / 2 ** 20


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float('inf')
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- variants ---------------------------------------------------------------------------------------------
def parse_variant(spec):
    """'hyena-triton-bf16-compile' -> dict(kind='hyena', impl='triton', dot='bf16', compile=True, ...)."""
    parts = spec.split('-')
    opts = dict(kind=parts[0], impl='fast', fft='smooth', dot='tf32', short=None, compile=False, graphs=False)
    if opts['kind'] not in ('attention', 'hyena', 'teacher', 'student', 'fftconv'):
        raise ValueError(f"variant {spec!r}: must start with attention, hyena, teacher or student")
    for p in parts[1:]:
        if p in hyena.FFTCONV_IMPLS:
            opts['impl'] = p
        elif p in ('pow2', 'smooth'):
            opts['fft'] = p
        elif p in fftconv_triton.TRITON_DOTS:
            opts['dot'] = p
        elif p in hyena.SHORT_CONVS:
            opts['short'] = p
        elif p == 'compile':
            opts['compile'] = True
        elif p == 'graphs':
            opts['compile'] = opts['graphs'] = True
        else:
            raise ValueError(f"variant {spec!r}: unknown option {p!r}")
    if opts['short'] is None:
        opts['short'] = 'conv1d' if opts['impl'] == 'plain' else 'auto'
    return opts


@contextlib.contextmanager
def hyena_settings(opts):
    new = {hyena: dict(FFTCONV_IMPL=opts['impl'], FFT_SIZE=opts['fft'], SHORT_CONV=opts['short']),
           fftconv_triton: dict(TRITON_DOT=opts['dot'], TRITON_MAX_N=triton_max_n, TRITON_INNER_N=triton_inner_n,
                                TRITON_NUM_WARPS=triton_num_warps, TRITON_ROWS=triton_rows)}
    old = {module: {k: getattr(module, k) for k in values} for module, values in new.items()}
    for module, values in new.items():
        for k, v in values.items():
            setattr(module, k, v)
    try:
        yield
    finally:
        for module, values in old.items():
            for k, v in values.items():
                setattr(module, k, v)


# the kinds each list of variants may name (fftconv_variants: options alone)
VARIANT_KINDS = dict(check_op_variants=('hyena',), mixer_variants=('attention', 'hyena'), fftconv_variants=('fftconv',),
                     model_variants=('teacher', 'student'), profile_variants=('teacher', 'student', 'attention', 'hyena'),
                     distill_variants=('student',))


def check_variants():
    """Every variant list parsed before the first section runs: a typo is a one-line error, not a section error
    after minutes of other sections."""
    for key, kinds in VARIANT_KINDS.items():
        for spec in globals()[key]:
            try:
                kind = parse_variant('fftconv-' + spec if kinds == ('fftconv',) else spec)['kind']
            except ValueError as e:
                raise SystemExit(f"bench.py: {key}: {e}; see the variants in bench.py's docstring")
            if kind not in kinds:
                raise SystemExit(f"bench.py: {key}: variant {spec!r} must start with {' or '.join(kinds)}")


def triton_unavailable(opts):
    """Why the Triton kernels would not run (fftconv would fall back to 'fast', the fused gates to the torch
    path), or None."""
    if opts['impl'] != 'triton' and opts['short'] != 'fused':
        return None
    if fftconv_triton.triton is None:
        return 'n/a: triton not installed'
    if not (CUDA or fftconv_triton._TRITON_INTERPRET):
        return 'n/a: triton needs CUDA'
    if not CUDA and opts['impl'] == 'triton' and opts['dot'] == 'bf16':
        return 'n/a: the Triton interpreter cannot do bf16 dots'
    return None


def runnable_variants(specs, columns, rows, **fields):
    """(opts, row) for each variant spec that can run here, its row (fields + variant) already in rows; a
    variant that cannot gets a row that says why in every column instead."""
    for spec in specs:
        opts = parse_variant(spec)
        row = dict(fields, variant=spec)
        rows.append(row)
        why = triton_unavailable(opts) or compile_unavailable(opts)
        if why:
            fill(row, columns, why)
            continue
        yield opts, row


def compile_unavailable(opts):
    if opts['compile'] and not CUDA:
        return 'n/a: compile on CUDA only'
    if opts['graphs'] and not compile:
        return 'n/a: graphs need compile=True'
    return None


def compile_mode(opts):
    return 'reduce-overhead' if opts['graphs'] else 'default'


def maybe_compile(module, opts):
    return torch.compile(module, dynamic=False, mode=compile_mode(opts)) if opts['compile'] else module


def new_step(opts):
    """Call at the start of each step: with CUDA graphs, the previous step's outputs may be overwritten now."""
    if opts['graphs']:
        torch.compiler.cudagraph_mark_step_begin()


def gpt_config(kind, block_size, pos_emb=True):
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     dropout=0.0, bias=True, pos_emb=pos_emb,
                     hyena_layers=list(range(n_layer)) if kind in ('student', 'recurrent') else [])


def compile_model(model, opts):
    """The callable to train with: the model itself, or with its blocks (or all of it) compiled."""
    if not (compile and CUDA):
        return model
    if compile_scope == 'model':
        return torch.compile(model, dynamic=False, mode=compile_mode(opts))
    for block in model.transformer.h:
        block.compile(dynamic=False, mode=compile_mode(opts))
    return model


# ---- markdown and JSON ------------------------------------------------------------------------------------
def fmt(v):
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return '0'
        if abs(v) >= 1e5:
            return f'{v:,.0f}'
        return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'
    return str(v)


def md_table(columns, rows):
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        lines.append('| ' + ' | '.join(fmt(row.get(c, 'missing')) for c in columns) + ' |')
    return '\n'.join(lines)


RESULTS = {'meta': {}, 'sections': {}}


def save():
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'bench.json'), 'w') as f:
        json.dump(training.strict_json(RESULTS), f, indent=1, default=str)
    with open(os.path.join(out_dir, 'bench.md'), 'w') as f:
        f.write(render())


def render():
    out = [f"# bench.py results\n\n{RESULTS['meta'].get('summary', '')}\n"]
    for name, sec in RESULTS['sections'].items():
        out.append(f"## {name}\n")
        if sec.get('error'):
            out.append(f"section error: {sec['error']}\n")
        if sec.get('columns'):
            out.append(md_table(sec['columns'], sec['rows']) + '\n')
        for note in sec.get('notes', []):
            out.append(f"- {note}")
        out.append('')
    return '\n'.join(out)


# ---- sections ---------------------------------------------------------------------------------------------
ENV = {'copy_GBps': None}


def copy_gbps():
    """The device-to-device copy bandwidth (GB/s, read + write), the yardstick of the memory floors; measured
    once per run, by env or by the first section that needs it (an assumed figure would be another GPU's)."""
    if ENV['copy_GBps'] is None:
        src = torch.randn(copy_mb * 2 ** 20 // 4, device=device)
        dst = torch.empty_like(src)
        ms = bench_ms(lambda: dst.copy_(src))
        ENV['copy_GBps'] = 2 * src.numel() * 4 / (ms / 1e3) / 1e9
    return ENV['copy_GBps']


def section_env():
    rows, notes = [], []
    def add(what, value):
        rows.append({'what': what, 'value': value})
    add('torch', torch.__version__)
    add('python', sys.version.split()[0])
    add('device', torch.cuda.get_device_name() if CUDA else 'cpu')
    try:
        import triton
        add('triton', triton.__version__)
    except Exception:
        add('triton', 'n/a: not installed')
    add('date', datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))
    try:
        add('device-to-device copy GB/s (read + write)', copy_gbps())
    except Exception as e:
        add('device-to-device copy GB/s (read + write)', error_cell(e))
    try:
        m = 8192 if CUDA else 256
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        ms = bench_ms(lambda: a @ b)
        add(f'bf16 matmul {m}^3 TFLOP/s (random data)', 2 * m ** 3 / (ms / 1e3) / 1e12)
        del a, b
    except Exception as e:
        add('bf16 matmul TFLOP/s', error_cell(e))
    add('timer', 'triton.testing.do_bench (median)' if CUDA and _DO_BENCH else
        ('CUDA events (median)' if CUDA else 'host clock (median)'))
    free_memory()
    return ['what', 'value'], rows, notes


def reference_fftconv64(u, k, D):
    """The causal convolution in float64 by FFT: the yardstick of the check section."""
    L = u.shape[-1]  # k has at most L taps: 2L of padding keeps the convolution linear
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L] + u * D.unsqueeze(-1)


def section_check():
    """fftconv impls against an fp64 reference (outputs and the three gradients, fresh random inputs each);
    HyenaOperator variants (eager and compiled, bf16 autocast) against the fp32 eager plain operator."""
    rows, notes = [], []
    tol = {'fast': 1e-5, 'triton-tf32': 5e-3, 'triton-ieee': 1e-5, 'triton-bf16': 3e-2}
    columns = ['impl', 'L', 'dtype', 'y', 'grad u', 'grad k', 'grad D', 'tolerance', 'pass']
    for spec in check_impls:
        opts = parse_variant('fftconv-' + spec)
        for L in check_lengths:
            for dtype in (torch.float32, torch.bfloat16):
                row = {'impl': spec, 'L': L, 'dtype': str(dtype).replace('torch.', '')}
                why = triton_unavailable(opts)
                if why:
                    row.update({c: why for c in columns[3:]})
                    rows.append(row)
                    continue
                try:
                    B, C = check_batch, check_channels
                    u = torch.randn(B, C, L, device=device).to(dtype)
                    k = torch.randn(C, L, device=device) / math.sqrt(L)
                    D = torch.randn(C, device=device)
                    g = torch.randn(B, C, L, device=device).to(dtype)
                    leaves64 = [t.double().requires_grad_() for t in (u, k, D)]
                    ref = reference_fftconv64(*leaves64)
                    ref.backward(g.double())
                    leaves = [t.clone().requires_grad_() for t in (u, k, D)]
                    fftconv_triton._TRITON_POISON = True
                    with hyena_settings(opts):
                        y = hyena.fftconv(*leaves)
                        y.backward(g)
                    errs = [rel_err(y, ref)] + [rel_err(a.grad, b.grad) for a, b in zip(leaves, leaves64)]
                    # a bf16 output carries its own rounding (~2e-3): allow for it
                    t = tol['fast' if opts['impl'] == 'fast' else f"triton-{opts['dot']}"]
                    t = max(t, 1e-2) if dtype == torch.bfloat16 else t
                    row.update({'y': errs[0], 'grad u': errs[1], 'grad k': errs[2], 'grad D': errs[3],
                                'tolerance': t, 'pass': 'yes' if max(errs) < t else 'NO'})
                except Exception as e:
                    row.update({c: error_cell(e) for c in columns[3:] if c not in row})
                finally:
                    fftconv_triton._TRITON_POISON = False
                rows.append(row)
    fft_rows = rows
    rows = []
    op_columns = ['variant', 'L', 'y vs fp32 plain', 'grad x', 'grad params (max)', 'y vs eager', 'grad x vs eager',
                  'grad params vs eager (max)', 'pass']
    L = check_op_length
    torch.manual_seed(seed)
    op = hyena.HyenaOperator(n_embd, l_max=L).to(device)
    x = torch.randn(check_batch, L, n_embd, device=device)
    gy = torch.randn(check_batch, L, n_embd, device=device)

    def run(fn, opts, use_autocast):
        op.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with hyena_settings(opts), (autocast() if use_autocast else contextlib.nullcontext()):
            y = fn(xx)
        y.backward(gy.to(y.dtype))
        return [y.float(), xx.grad] + [p.grad.clone() for p in op.parameters()]

    try:
        ref = run(op, parse_variant('hyena-plain'), False)
    except Exception as e:
        ref = e
    eager = {}
    for spec in check_op_variants:
        opts = parse_variant(spec)
        row = {'variant': spec, 'L': L}
        why = triton_unavailable(opts) or compile_unavailable(opts)
        if why or isinstance(ref, Exception):
            row.update({c: why or error_cell(ref) for c in op_columns[2:]})
            rows.append(row)
            continue
        try:
            if opts['compile']:
                torch._dynamo.reset()
            out = run(maybe_compile(op, opts), opts, True)
            errs = [rel_err(a, b) for a, b in zip(out, ref)]
            row.update({'y vs fp32 plain': errs[0], 'grad x': errs[1], 'grad params (max)': max(errs[2:])})
            eager_key = spec.replace('-compile', '')
            if not opts['compile']:
                eager[eager_key] = out
            base = eager.get(eager_key)
            if base is not None and opts['compile']:
                e2 = [rel_err(a, b) for a, b in zip(out, base)]
                row.update({'y vs eager': e2[0], 'grad x vs eager': e2[1], 'grad params vs eager (max)': max(e2[2:])})
            else:
                row.update({'y vs eager': '-', 'grad x vs eager': '-', 'grad params vs eager (max)': '-'})
            worst = max(v for v in row.values() if isinstance(v, float))
            row['pass'] = 'yes' if worst < 5e-2 else 'NO'  # bf16 autocast against fp32: ~1e-2
        except Exception as e:
            row.update({c: error_cell(e) for c in op_columns[2:] if c not in row})
        rows.append(row)
    notes.append('fftconv rows: relative L2 error against an fp64 FFT reference on the same (rounded) inputs; '
                 'tolerances: fast 1e-5, triton tf32 5e-3, ieee 1e-5, bf16 3e-2 (at least 1e-2 for bf16 tensors). '
                 'Triton outputs are poisoned with NaN before each run, so an unwritten element fails.')
    notes.append(f'operator rows: HyenaOperator(d_model={n_embd}, order 2), B={check_batch}, bf16 autocast, '
                 f'against the fp32 eager plain operator and (compiled rows) the same variant in eager; pass < 5e-2.')
    del op
    free_memory()
    RESULTS['sections']['check (operator)'] = {'columns': op_columns, 'rows': rows, 'notes': []}
    return columns, fft_rows, notes


def build_mixer(opts, L):
    if opts['kind'] == 'attention':
        return CausalSelfAttention(GPTConfig(block_size=L, n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True))
    return hyena.HyenaOperator(n_embd, l_max=L, order=2)


def build_mixer_step(opts, x, g):
    """One fwd+bwd of the mixer `opts` on x (B, L, n_embd) under autocast, g the output's gradient: (step, the
    tensors whose .grad it fills). Call inside hyena_settings(opts): the compiled graph is built here."""
    module = build_mixer(opts, x.shape[1]).to(device)
    if opts['compile']:
        torch._dynamo.reset()
    fn = maybe_compile(module, opts)
    with autocast():
        gy = g.to(fn(x).dtype)
    leaves = [x] + list(module.parameters())

    def step():
        new_step(opts)
        if opts['graphs']:  # do_bench's warm-up would accumulate into the last replay's gradients, overwritten now
            for t in leaves:
                t.grad = None
        with autocast():
            y = fn(x)
        y.backward(gy)
    return step, leaves


def section_mixer():
    """fwd+bwd of one mixer (whole: projections included) under bf16 autocast, B * L fixed."""
    specs = [(s, parse_variant(s)) for s in mixer_variants]
    hyena_specs = [s for s, o in specs if o['kind'] == 'hyena']
    attn = next((s for s, o in specs if o['kind'] == 'attention'), None)
    columns = ['L', 'B'] + [f'ms {s}' for s, _ in specs] + ['best hyena', 'attention / best'] + \
              [f'MB {s}' for s, _ in specs]
    rows = []
    for L in mixer_lengths:
        B = max(1, mixer_tokens // L)
        row = {'L': L, 'B': B}
        try:
            torch.manual_seed(seed)
            x = torch.randn(B, L, n_embd, device=device, requires_grad=True)
            g = torch.randn(B, L, n_embd, device=device)
        except Exception as e:
            fill(row, columns, error_cell(e))
            rows.append(row)
            continue
        for spec, opts in specs:
            why = triton_unavailable(opts) or compile_unavailable(opts)
            if why:
                row[f'ms {spec}'] = row[f'MB {spec}'] = why
                continue
            try:
                with hyena_settings(opts):
                    step, params = build_mixer_step(opts, x, g)
                    if opts['graphs']:  # the graphs' memory pool is allocated while they are recorded
                        row[f'MB {spec}'] = peak_mb(lambda: [step() for _ in range(3)])
                    row[f'ms {spec}'] = bench_ms(step, grad_to_none=params)
                    for p in params:
                        p.grad = None
                    if not opts['graphs']:
                        row[f'MB {spec}'] = peak_mb(step)
                del step, params
            except Exception as e:
                row.setdefault(f'ms {spec}', error_cell(e))
                row.setdefault(f'MB {spec}', error_cell(e))
            x.grad = None
            free_memory()
        times = {s: row[f'ms {s}'] for s in hyena_specs if isinstance(row.get(f'ms {s}'), float)}
        if times:
            best = min(times, key=times.get)
            row['best hyena'] = best
            a = row.get(f'ms {attn}') if attn else None
            row['attention / best'] = a / times[best] if isinstance(a, float) else 'n/a: no attention time'
        else:
            row['best hyena'] = row['attention / best'] = 'n/a: no hyena time'
        rows.append(row)
        del x, g
        free_memory()
    notes = [f'd_model={n_embd}, attention {n_head} heads (model.CausalSelfAttention: c_attn + SDPA + c_proj), '
             f'Hyena order 2 (in_proj, short conv, filter MLP, FFT conv, gates, out_proj); B*L={mixer_tokens}; '
             'ms: median fwd+bwd; MB: peak CUDA memory above the inputs and weights during one fwd+bwd (graphs: '
             'during the first three, while the graphs are recorded into their memory pool); '
             'attention / best > 1 means Hyena is faster.']
    return columns, rows, notes


def section_fftconv():
    """fftconv alone on (B, C, L) bf16 (as the operator hands it under autocast) against the bytes it must
    move: forward reads u and writes y (2 B each per element, bf16); forward + backward also reads the
    incoming gradient g and u again and writes grad u (2 B each). Filter and skip (C * L fp32, k, grad k)
    are counted too but are negligible."""
    bw = copy_gbps()
    notes = []
    columns = ['L', 'B', 'variant', 'fwd ms', 'fwd floor ms', 'fwd / floor', 'fwd+bwd ms', 'fwd+bwd floor ms',
               'fwd+bwd / floor', 'MB']
    rows = []
    C = n_embd
    for L in fftconv_lengths:
        B = max(1, fftconv_tokens // L)
        elems = B * C * L
        floor_f = (elems * 4 + C * L * 4 + C * 4) / (bw * 1e9) * 1e3
        floor_fb = (elems * 10 + C * L * 12 + C * 8) / (bw * 1e9) * 1e3
        for spec in fftconv_variants:
            opts = parse_variant('fftconv-' + spec)
            row = {'L': L, 'B': B, 'variant': spec, 'fwd floor ms': floor_f, 'fwd+bwd floor ms': floor_fb}
            why = triton_unavailable(opts)
            if why:
                fill(row, columns, why)
                rows.append(row)
                continue
            try:
                torch.manual_seed(seed)
                u = torch.randn(B, C, L, device=device, dtype=torch.bfloat16, requires_grad=True)
                k = (torch.randn(C, L, device=device) / math.sqrt(L)).requires_grad_()
                D = torch.randn(C, device=device, requires_grad=True)
                g = torch.randn(B, C, L, device=device, dtype=torch.bfloat16)
                with hyena_settings(opts):
                    with torch.no_grad():
                        row['fwd ms'] = bench_ms(lambda: hyena.fftconv(u, k, D))
                    row['fwd / floor'] = row['fwd ms'] / floor_f

                    def step():
                        hyena.fftconv(u, k, D).backward(g)
                    row['fwd+bwd ms'] = bench_ms(step, grad_to_none=[u, k, D])
                    row['fwd+bwd / floor'] = row['fwd+bwd ms'] / floor_fb
                    u.grad = k.grad = D.grad = None
                    row['MB'] = peak_mb(step)
                del u, k, D, g
            except Exception as e:
                fill(row, columns, error_cell(e))
            rows.append(row)
            free_memory()
    notes.append(f'C={C}, B*L={fftconv_tokens}, u and y bf16, k and D fp32; floor = bytes / {bw:.0f} GB/s '
                 '(the measured copy bandwidth); bytes: fwd 4 B per element of u (read u, write y), '
                 'fwd+bwd 10 B per element (also read g, read u, write grad u) plus the filter (C*L*4 B per '
                 'pass). MB: peak memory above inputs during one fwd+bwd.')
    notes.append("fft sizes: 'smooth' and 'pow2' agree whenever 2L is a power of two; the 1536/3072/6144 rows "
                 'are where they differ (3072 = 3 * 2^10 vs 4096, ...).')
    return columns, rows, notes


def kernel_us(fn):
    """Microseconds per fn() call: on CUDA the median replay of a CUDA graph of kernel_reps calls (GPU time with
    the L2 warm, no host launch cost), elsewhere (Triton's interpreter) bench_ms."""
    if not CUDA:
        return bench_ms(fn) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and the kernel's compile) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(kernel_reps):
            fn()
    graph.replay()
    times = [time_once(graph.replay) * 1e3 / kernel_reps for _ in range(20)]
    del graph
    return statistics.median(times)


def gate_tiles(name):
    """Every tile of the sweep for one gates_triton kernel (its entry in TILES first): (time steps, channels,
    warps) and, for the backward kernels, time tiles per program; 8 to 64 elements of a tile per thread."""
    default = gates_triton.TILES[name]
    sums = kernel_sweep_sums if len(default) == 4 else [None]
    tiles = [default]
    for t, c, w, n in itertools.product(kernel_sweep_t, kernel_sweep_c, kernel_sweep_warps, sums):
        tile = (t, c, w) if n is None else (t, c, w, n)
        if 8 <= t * c // (32 * w) <= 64 and tile not in tiles:
            tiles.append(tile)
    return tiles


def section_kernels():
    """The fused bf16 student's Triton kernels one at a time, at a training step's shapes, against the bytes each
    must move; with kernel_sweep, every gate kernel's tiles (the 'kernels (tile sweep)' table)."""
    columns = ['kernel', 'launch', 'us', 'MB moved', 'GB/s', 'x floor']
    names = ['spectrum', 'conv', 'conv backward', 'gate_in', 'gate_out', 'gate_in_bwd', 'gate_out_bwd', 'input_grad']
    B, C, L = max(1, model_tokens // kernel_block), n_embd, kernel_block
    why = triton_unavailable(parse_variant('hyena-triton-fused'))
    if why or not fftconv_triton.one_kernel(L):
        why = why or f'n/a: kernel_block={L} takes the four-step path'
        return columns, [{'kernel': n, **{c: why for c in columns[1:]}} for n in names], []
    bw = copy_gbps()
    dtype, prec = (torch.bfloat16, 'bf16') if CUDA else (torch.float32, 'ieee')  # the interpreter: fp32 dots only
    spectrum_prec = fftconv_triton.SPECTRUM_DOT[prec]
    _, N1, N2 = fftconv_triton._mfft_plan(L)
    rows_per_program, warps = fftconv_triton._mfft_launch(B, 4)
    merged_bwd = N1 * N2 <= fftconv_triton.TRITON_MERGED_BWD_MAX_N
    torch.manual_seed(seed)

    def act(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def summed(outs):  # a backward gate kernel's outputs, its partial sums (last) added up over the programs
        return (*outs[:-1], outs[-1].sum(0))
    u, y, g = act(B, C, L), act(B, C, L), act(B, C, L)  # channel-major: the conv's input and output, a gradient
    p, go, gs_q, gs_av = act(B, L, 3 * C), act(B, L, C), act(B, L, C), act(B, L, 2 * C)  # token-major
    k, d = torch.randn(C, L, device=device) / math.sqrt(L), torch.randn(C, device=device)
    kr, ki = fftconv_triton._mfft_spectrum_impl(k, N1, N2, spectrum_prec, 4)
    K = 3  # HyenaOperator's short_filter_order
    weight, bias = torch.randn(3 * C, 1, K, device=device) / 2, torch.randn(3 * C, device=device) / 10
    (q, wq, bq), (a, wa, ba), (v, wv, bv) = gates_triton.gates(p, weight, bias)
    tiles = gates_triton.TILES
    launches = {
        'spectrum': lambda: fftconv_triton._mfft_spectrum_impl(k, N1, N2, spectrum_prec, 4),
        'conv': lambda: (fftconv_triton._mfft_conv_impl(u, kr, ki, d, prec, rows_per_program, warps),),
        'conv backward': lambda: fftconv_triton._mfft_conv_bwd_impl(u, g, kr, ki, d, L, prec, rows_per_program,
                                                                    warps, merged_bwd),
        'gate_in': lambda: (gates_triton._gate_in_impl(a, v, wa, ba, wv, bv),),
        'gate_out': lambda: (gates_triton._gate_out_impl(y, q, wq, bq),),
        # the backward kernels with the sum of their partial sums, which the step pays for too (param_grads): fewer
        # time tiles per program write fewer partials, so the tile sweep must see both
        'gate_in_bwd': lambda: summed(gates_triton._gate_in_bwd_impl(g, a, v, wa, ba, wv, bv, tiles['gate_in_bwd'])),
        'gate_out_bwd': lambda: summed(gates_triton._gate_out_bwd_impl(go, y, q, wq, bq, tiles['gate_out_bwd'])),
        'input_grad': lambda: (gates_triton._short_conv_input_grad_impl(gs_q, gs_av, weight.view(-1, K)),),
    }
    # elements of (B, L, C) each kernel must read and write (filters, weights and partial sums: small)
    streams = {'spectrum': 0, 'conv': 2, 'conv backward': 3 if merged_bwd else 2, 'gate_in': 3, 'gate_out': 3,
               'gate_in_bwd': 5, 'gate_out_bwd': 5, 'input_grad': 6}
    rows = []
    for name in names:
        launch = (f'{rows_per_program} rows, {warps} warps' if name.startswith('conv') else
                  f'N = {N1} x {N2}' if name == 'spectrum' else str(tiles[name]))
        row = {'kernel': name, 'launch': launch}
        try:
            nbytes = streams[name] * B * L * C * u.element_size()
            if name == 'spectrum':  # k in, its spectrum out (fp32)
                nbytes = C * L * 4 + 2 * C * N1 * N2 * 4
            row['us'] = kernel_us(launches[name])
            row.update({'MB moved': nbytes / 1e6, 'GB/s': nbytes / row['us'] / 1e3,
                        'x floor': row['us'] / (nbytes / bw / 1e3)})
        except Exception as e:
            fill(row, columns, error_cell(e))
        rows.append(row)
    timer = f'CUDA-graph replays of {kernel_reps} back-to-back calls (median)' if CUDA else 'interpreted, host clock'
    notes = [f'B={B}, L={L}, C={C}, {str(dtype)[6:]} activations, dots {prec}; us: {timer}',
             f'floor: MB moved at {bw:.0f} GB/s (the measured copy bandwidth); conv backward '
             + ('writes grad u too (FFT size <= TRITON_MERGED_BWD_MAX_N)' if merged_bwd else 'without grad u'),
             'gate_in_bwd, gate_out_bwd: the kernel and the sum of its partial weight-gradient sums over programs']
    if kernel_sweep:
        RESULTS['sections']['kernels (tile sweep)'] = sweep_gate_tiles(launches)
    free_memory()
    return columns, rows, notes


def sweep_gate_tiles(launches):
    """Every gate kernel timed at every tile of gate_tiles, launches[name] run with gates_triton.TILES[name] set."""
    columns = ['kernel', 'tiles timed', 'TILES', 'us', 'fastest tile', 'fastest us', 'speedup', 'max rel diff']
    rows = []

    for name in ('gate_in', 'gate_out', 'gate_in_bwd', 'gate_out_bwd', 'input_grad'):
        default = gates_triton.TILES[name]
        row = {'kernel': name, 'TILES': str(default)}
        try:
            ref = [x.float() for x in launches[name]()]
            timed = []
            for tile in gate_tiles(name):
                gates_triton.TILES[name] = tile  # read when the launch is recorded into the graph
                outs = [x.float() for x in launches[name]()]
                diff = max(((x - r).abs().max() / r.abs().max()).item() for x, r in zip(outs, ref))
                timed.append((kernel_us(launches[name]), tile, diff))
            best = min(timed)
            row.update({'tiles timed': len(timed), 'us': timed[0][0], 'fastest tile': str(best[1]),
                        'fastest us': best[0], 'speedup': timed[0][0] / best[0],
                        'max rel diff': max(t[2] for t in timed)})
        except Exception as e:
            fill(row, columns, error_cell(e))
        finally:
            gates_triton.TILES[name] = default
        rows.append(row)
    notes = ['tiles: (time steps, channels, warps[, time tiles per program]), TILES\' own first; max rel diff: the '
             "largest difference of any tile's outputs from TILES' (backward: the partial sums' totals), over max |.|; "
             'backward kernels timed with the sum of their partial sums']
    return {'columns': columns, 'rows': rows, 'notes': notes}

def section_model():
    """A training step of teacher vs student: accum x fwd+bwd, then AdamW, bf16 autocast, compiled on CUDA."""
    columns = ['block', 'batch', 'accum', 'variant', 'ms/step', 'tokens/s', 'TFLOP/s', 'MFU', 'peak MB',
               'student / teacher', 'ms/step queued', 'queued student / teacher']
    rows = []
    for block, accum in itertools.product(model_blocks, model_accum):
        batch = max(1, model_tokens // block)
        teacher_tps = teacher_queued = None
        for opts, row in runnable_variants(model_variants, columns, rows, block=block, batch=batch, accum=accum):
            try:
                with hyena_settings(opts):
                    ms, queued, peak, model = train_step_timing(opts, block, batch, accum)
                tps = batch * block * accum / (ms / 1e3)
                mfu = model.estimate_mfu(batch * accum, ms / 1e3, seq_len=block)
                row.update({'ms/step': ms, 'tokens/s': tps,
                            'TFLOP/s': model.flops_per_token(block) * tps / 1e12,
                            'MFU': mfu if mfu is not None else 'n/a: unknown peak', 'peak MB': peak})
                if opts['kind'] == 'teacher':
                    teacher_tps, teacher_queued = tps, queued
                student = opts['kind'] == 'student' and teacher_tps
                row.update({'student / teacher': tps / teacher_tps if student else '-', 'ms/step queued': queued,
                            'queued student / teacher': teacher_queued / queued if student else '-'})
                del model
            except Exception as e:
                fill(row, columns, error_cell(e))
            free_memory()
    notes = [f'GPT-2 124M shape ({n_layer} layers, {n_head} heads, {n_embd} wide, vocab {vocab_size}); student: '
             f'every layer Hyena (order 2); ~{model_tokens} tokens per micro-step, accum micro-steps per step (the '
             f'filter taps once per step: {model_share_taps}); fused AdamW; compile={compile and CUDA} '
             f'({compile_scope}); ms: median of {model_iters} steps after {model_warmup} warm-up steps, each timed '
             f'alone (CUDA events, then a sync); queued: the mean of {model_iters} steps queued back to back, one sync '
             'at the end, as the training loops run them; MFU from model.estimate_mfu (flops_per_token, bf16 dense '
             'peak); peak MB: whole step incl. weights and AdamW state.']
    return columns, rows, notes


def build_train_step(opts, block, batch, accum=1):
    """(step, model): step() runs one optimizer step of a fresh teacher or student on random tokens, as the
    training loops do: accum micro-steps of fwd + bwd (the filters' taps shared by them), then AdamW."""
    torch.manual_seed(seed)
    model = GPT(gpt_config(opts['kind'], block)).to(device)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cuda' if CUDA else 'cpu')
    fn = compile_model(model, opts)
    shared = training.SharedTaps(model, block, accum if model_share_taps else 1)
    idx = torch.randint(0, vocab_size, (batch, block + 1), device=device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
        # cleared before each step, the first included: under CUDA graphs, gradients that micro-steps accumulate
        # into must be allocated (training.clear_grads); a lone micro-step's are read by opt.step before the next
        # replay can overwrite them
        training.clear_grads(opt, opts['graphs'] and accum > 1)
        shared.begin()
        for micro in range(accum):
            new_step(opts)
            with autocast():
                _, loss = fn(x, y, taps=shared.taps(micro))
            (loss / accum).backward()
        opt.step()
    return step, model


def train_step_timing(opts, block, batch, accum=1):
    step, model = build_train_step(opts, block, batch, accum)
    ms = time_steps(step, model_warmup, model_iters)
    queued = queued_ms(step, model_iters)
    peak = peak_mb(step, absolute=True)
    return ms, queued, peak, model


def section_profile():
    """Where a training step's time goes: the kernels with the most device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    columns = ['variant', 'block', 'rank', 'kernel', 'calls/step', 'ms/step', '% of step']
    rows = []
    batch = max(1, model_tokens // profile_block)
    mixer_batch = max(1, mixer_tokens // profile_block)
    for spec in profile_variants:
        opts = parse_variant(spec)
        why = triton_unavailable(opts) or compile_unavailable(opts)
        if why:
            row = {'variant': spec, 'block': profile_block, 'kernel': why}
            fill(row, columns, '-')
            rows.append(row)
            continue
        with hyena_settings(opts):
            if opts['kind'] in ('attention', 'hyena'):  # one mixer, as in the mixer section
                x = torch.randn(mixer_batch, profile_block, n_embd, device=device, requires_grad=True)
                mixer_step, held = build_mixer_step(opts, x, torch.randn_like(x))

                def step():
                    for t in held:
                        t.grad = None  # as bench_ms does: no gradient accumulation in the profile
                    mixer_step()
            else:
                step, held = build_train_step(opts, profile_block, batch)
            for _ in range(model_warmup):
                step()
            sync()
            activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
            with profile(activities=activities) as prof:
                for _ in range(profile_steps):
                    step()
                sync()
        own = (lambda e: e.self_device_time_total) if CUDA else (lambda e: e.self_cpu_time_total)
        events = [e for e in prof.key_averages() if own(e) > 0]
        total = sum(own(e) for e in events)
        for rank, e in enumerate(sorted(events, key=own, reverse=True)[:profile_top], 1):
            rows.append({'variant': spec, 'block': profile_block, 'rank': rank, 'kernel': e.key[:90].replace('|', '/'),
                         'calls/step': e.count / profile_steps, 'ms/step': own(e) / 1e3 / profile_steps,
                         '% of step': 100 * own(e) / total})
        del held, step
        free_memory()
    notes = [f'teacher / student variants: one training step as in the model section (batch {batch} x '
             f'{profile_block}); attention / hyena variants: one fwd+bwd of the mixer as in the mixer section '
             f'(batch {mixer_batch} x {profile_block}). {profile_steps} steps under torch.profiler after '
             f'{model_warmup} warm-up steps; the {profile_top} kernels with the most self '
             f'{"device" if CUDA else "CPU"} time; % of the sum over all kernels.']
    return columns, rows, notes


def section_distill():
    """kd-stage step: teacher forward (no_grad) + student fwd/bwd/AdamW on the KD loss."""
    columns = ['block', 'batch', 'variant', 'ms/step', 'tokens/s', 'peak MB']
    rows = []
    block, batch = distill_block, max(1, distill_tokens // distill_block)
    for opts, row in runnable_variants(distill_variants, columns, rows, block=block, batch=batch):
        try:
            with hyena_settings(opts):
                torch.manual_seed(seed)
                teacher = GPT(gpt_config('teacher', block)).to(device).eval()
                student = GPT(gpt_config('student', block)).to(device)
                for p in teacher.parameters():
                    p.requires_grad_(False)
                opt = student.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cuda' if CUDA else 'cpu')
                t_fn, s_fn = compile_model(teacher, opts), compile_model(student, opts)
                idx = torch.randint(0, vocab_size, (batch, block + 1), device=device)
                x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

                def step():
                    new_step(opts)
                    with autocast():
                        with torch.no_grad():
                            t_logits, _ = t_fn(x, full_logits=True)
                        s_logits, ce = s_fn(x, y)
                        loss = training.kd_loss(s_logits, t_logits, ce, kd_alpha, kd_temperature)  # distill.py's
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                ms = time_steps(step, model_warmup, model_iters)
                row.update({'ms/step': ms, 'tokens/s': batch * block / (ms / 1e3), 'peak MB': peak_mb(step, True)})
                del teacher, student, opt
        except Exception as e:
            fill(row, columns, error_cell(e))
        free_memory()
    notes = [f'teacher = GPT-2 124M shape (attention), student = all-Hyena of the same shape; loss = {kd_alpha} * '
             f'T^2 * KL + {1 - kd_alpha} * CE at T={kd_temperature} on full logits; compile={compile and CUDA} '
             f'({compile_scope}); tokens/s counts the student\'s training tokens.']
    return columns, rows, notes


def build_generator(kind, max_len):
    """(model, fit seconds or None) for a generate row: 'teacher', 'student' (cached FFT-conv Hyena) or
    'recurrent' / 'recurrent-eager' (the student fitted by recurrent.fit_model; decoded through a CUDA
    graph, or without one)."""
    torch.manual_seed(seed)
    model = GPT(gpt_config(kind.split('-')[0], max_len, pos_emb=(kind == 'teacher'))).to(device).eval()
    if kind.startswith('recurrent'):
        import recurrent
        t0 = time.time()
        recurrent.fit_model(model, d_state=gen_d_state, length=min(gen_fit_length, max_len), iters=gen_fit_iters)
        return model, time.time() - t0
    return model, None


def section_generate():
    """tokens/s and memory of model.generate(idx, n, use_cache=True) after a prompt of each context."""
    columns = ['model', 'context', 'batch', 'prefill ms', 'decode tokens/s', 'ms/token', 'cache MB', 'peak MB',
               'fit s']
    rows = []
    max_len = max(gen_contexts) + gen_new_tokens
    fitted = None  # 'recurrent' and 'recurrent-eager' decode the same fitted model
    for kind in gen_models:
        try:
            if kind.startswith('recurrent') and fitted is not None:
                model, fit = fitted
            else:
                model, fit = build_generator(kind, max_len)
                fitted = (model, fit) if kind.startswith('recurrent') else fitted
        except Exception as e:
            model, fit = None, error_cell(e)
        cuda_graph = kind != 'recurrent-eager'
        for ctx in gen_contexts:
            row = {'model': kind, 'context': ctx, 'batch': gen_batch}
            if model is None:
                fill(row, columns, fit)
                rows.append(row)
                continue
            row['fit s'] = fit if fit is not None else '-'
            try:
                torch.manual_seed(seed)
                idx = torch.randint(0, vocab_size, (gen_batch, ctx), device=device)
                ac = autocast() if gen_autocast and CUDA else contextlib.nullcontext()

                def generate(n):
                    with ac:
                        return model.generate(idx, n, use_cache=True, cuda_graph=cuda_graph)
                generate(2)  # warm-up: kernels, cuFFT plans, cuBLAS handles
                # prefill = generate(idx, 1) (the prompt pass and one sampling); each further token adds one step
                prefill_ms = time_once(lambda: generate(1))
                t_all = {}
                peak = peak_mb(lambda: t_all.setdefault('s', time_once(lambda: generate(1 + gen_new_tokens))))
                decode_ms = (t_all['s'] - prefill_ms) / gen_new_tokens
                cache = model.new_cache(ctx + 1)  # the decoding state after the prompt: what grows, or not
                with ac, torch.no_grad():
                    model(idx, cache=cache)
                row.update({'prefill ms': prefill_ms, 'decode tokens/s': gen_batch / (decode_ms / 1e3),
                            'ms/token': decode_ms, 'peak MB': peak, 'cache MB': cache_bytes(cache) / 2 ** 20})
                del cache
            except Exception as e:
                fill(row, columns, error_cell(e))
            rows.append(row)
            free_memory()
        del model
        free_memory()
    notes = [f'random weights, GPT-2 124M shape, block_size {max_len} (teacher: learned positions; students: '
             f'pos_emb=False); batch {gen_batch}; prefill ms = generate(idx, 1) (the prompt pass and one sample), '
             f'ms/token = (time of generate(idx, {1 + gen_new_tokens}) - prefill) / {gen_new_tokens}, sampling '
             f'included; tokens/s counts every sequence of the batch; peak MB: above the weights during '
             f'generate(idx, {1 + gen_new_tokens}) (the prompt pass dominates it); cache MB: the decoding state '
             f'after the prompt (KV cache, Hyena history or recurrent state; model.cache_bytes); bf16 '
             f'autocast={gen_autocast and CUDA}. teacher: KV cache; '
             f'student: cached Hyena decoding (O(L * D) per token); recurrent: recurrent.fit_model(model, '
             f'd_state={gen_d_state}, length={gen_fit_length}, iters={gen_fit_iters}) on random weights (decode '
             f'speed does not depend on the fit), decoded through one CUDA graph per step (model.decode_graph); '
             f'recurrent-eager: the same without the graph; fit s = the fit\'s time.']
    return columns, rows, notes


SECTIONS = {'env': section_env, 'check': section_check, 'mixer': section_mixer, 'fftconv': section_fftconv,
            'kernels': section_kernels, 'model': section_model, 'profile': section_profile, 'distill': section_distill,
            'generate': section_generate}


def main():
    global CUDA
    CUDA = device.startswith('cuda')
    if CUDA and not torch.cuda.is_available():
        raise SystemExit("bench.py: device='cuda' but CUDA is not available; pass --device=cpu (and --quick=True)")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench.py: unknown sections {unknown}; valid: {list(SECTIONS)}")
    if compile_scope not in ('model', 'blocks'):
        raise SystemExit(f"bench.py: compile_scope='{compile_scope}' is not one of model, blocks")
    check_variants()
    torch.manual_seed(seed)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        from torch import _dynamo
        for name, value in (('cache_size_limit', 256), ('recompile_limit', 256),
                            ('accumulated_cache_size_limit', 4096), ('accumulated_recompile_limit', 4096)):
            if hasattr(_dynamo.config, name):
                setattr(_dynamo.config, name, value)
    except Exception:
        pass
    RESULTS['meta'] = {'config': {k: v for k, v in globals().get('config', {}).items()},
                       'torch': torch.__version__, 'device': torch.cuda.get_device_name() if CUDA else 'cpu',
                       'argv': sys.argv, 'started': datetime.datetime.now(datetime.timezone.utc).isoformat()}
    RESULTS['meta']['summary'] = f"device {RESULTS['meta']['device']}, torch {torch.__version__}, " \
                                 f"{RESULTS['meta']['started'][:16]} UTC, command: python {' '.join(sys.argv)}"
    for name in sections:
        if (time.time() - START) / 60 > max_minutes:
            RESULTS['sections'][name] = {'error': f'skipped: past max_minutes={max_minutes}', 'columns': [],
                                         'rows': [], 'notes': []}
            print(f'\n## {name}\nskipped: past max_minutes={max_minutes}', flush=True)
            continue
        t0 = time.time()
        try:
            columns, rows, notes = SECTIONS[name]()
            sec = {'columns': columns, 'rows': rows, 'notes': notes}
        except Exception as e:
            traceback.print_exc()
            sec = {'error': error_cell(e), 'columns': [], 'rows': [], 'notes': []}
        sec['seconds'] = time.time() - t0
        RESULTS['sections'][name] = sec
        # a section may add tables of its own, 'name (...)': they follow it
        extras = {k: RESULTS['sections'].pop(k) for k in list(RESULTS['sections']) if k.startswith(name + ' (')}
        RESULTS['sections'].update(extras)
        save()
        print(f"\n## {name} ({sec['seconds']:.0f} s)\n", flush=True)
        if sec.get('error'):
            print('section error:', sec['error'])
        if sec['columns']:
            print(md_table(sec['columns'], sec['rows']))
        for note in sec['notes']:
            print('-', note)
        for extra_name, extra in extras.items():
            print(f'\n## {extra_name}\n')
            print(md_table(extra['columns'], extra['rows']))
            for note in extra['notes']:
                print('-', note)
        sys.stdout.flush()
    print(f"\nwrote {os.path.join(out_dir, 'bench.json')} and bench.md in {time.time() - START:.0f} s")


if __name__ == '__main__':
    main()
