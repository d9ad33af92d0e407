"""
Training machinery shared by train_teacher.py and distill.py: nanoGPT's train.py, factored into small
helpers with its known bugs avoided. A training script reads top to bottom:

    dist = setup_distributed(device)                        # torchrun env -> rank, device, seed offset
    accum = per_rank(gradient_accumulation_steps, dist.world_size)
    prec = setup_precision(dist.device, dtype)              # autocast context + GradScaler
    data = TokenData(data_dir, block_size, batch_size, dist.device, vocab_size, seed=seed, rank=dist.rank)
    model, compiled = wrap_model(model, dist, compile, data.get_batch('train', 0), prec.ctx)  # compile, DDP
    stop = StopFlag()                                       # SIGTERM / SIGINT -> save and exit
    for iter_num ...:
        set_lr(optimizer, get_lr(iter_num, ...))
        seed_step(seed, dist.rank, iter_num)                # dropout RNG: a function of the iteration
        X, Y = data.get_batch('train', iter_num * accum + micro_step)
        guard.step(loss, grad_norm)                         # optimizer step unless NaN/inf on any rank
        save_checkpoint(ckpt, path)                         # atomic: tmp file + fsync + os.replace

Decisions, in one place:
- A mistake the user can fix is one line on stderr and exit status 1: `fail(message)` raises SystemExit.
- Batches are a pure function of (seed, rank, split, stream, index): each draw seeds its own numpy
  generator from that tuple, so there is no generator state to save; a resumed run, given the same
  iteration number, draws exactly the batches an uninterrupted run draws, and each DDP rank draws its own.
  Eval batches come from a separate stream with fixed indices: every eval sees the same batches, and
  evaluating never disturbs training's draws. Likewise `seed_step` reseeds torch (dropout) every
  iteration from (seed, rank, iteration), which is why checkpoints need no RNG states.
- The .bin files are re-opened (np.memmap) for every batch: a long-lived memmap grows resident memory.
- SIGTERM or SIGINT: the loop finishes the current iteration, saves a checkpoint, and exits with status
  128 + signal number (143 for SIGTERM, 130 for SIGINT, the shell's convention), not 0, so a job script
  (`train && next_step`) or scheduler sees the run as unfinished; `init_from=resume` continues it.
  A second Ctrl-C aborts at once (the atomic write keeps the previous checkpoint intact).
- compile_mode (torch.compile's mode; 'reduce-overhead' replays CUDA graphs, which saves the launch time of
  a step made of many small kernels, as the Hyena student's is): the loops mark each micro-step's start and
  keep gradients allocated (`cuda_graphs`, `clear_grads`).
- DDP: only rank 0 (`dist.master`) writes files. On resume every rank loads the same ckpt.pt (for
  several nodes, out_dir must be on a shared filesystem) and `agree_across_ranks` checks that all read
  the same iteration. Stop requests and non-finite checks are all-reduced, so all ranks stop together.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fftconv_triton
import hyena

TRAIN_STREAM, EVAL_STREAM = 0, 1
_SPLIT_IDS = {'train': 0, 'val': 1}
FULL_SCAN_TOKENS = 1 << 29  # files up to 512M tokens (1 GiB) are scanned whole for ids >= vocab_size
SAMPLE_CHUNKS = 64  # larger files: this many evenly spaced chunks, plus a check of every batch


def fail(message):
    """Stop with a one-line error on stderr (exit status 1, no traceback)."""
    raise SystemExit(message)


# ---- devices, processes, precision ---------------------------------------------------------------------

def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. Any other name is checked: a device that does
    not exist (cuda on a machine without GPUs, cuda:7 on a 1-GPU machine, mps off Apple) is a one-line
    error. Returns the device string."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        fail(f"device '{device}' is not a device name; use auto, cpu, cuda or cuda:N")
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(f"device '{device}' does not exist: no CUDA GPU is visible on this machine; use --device=cpu")
        if dev.index is not None and dev.index >= count:
            fail(f"device '{device}' does not exist: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif dev.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        fail(f"device '{device}' does not exist: MPS is not available here; use --device=cpu")
    return device


@dataclass
class DistInfo:
    """Where this process sits: ddp (launched by torchrun), rank (global), local_rank (on this node),
    world_size, device (this process's device), master (rank 0: logs and writes files) and seed_offset
    (added to seeds so that ranks differ)."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    master: bool
    seed_offset: int


def setup_distributed(device='auto'):
    """Single process, or DDP when torchrun set RANK/LOCAL_RANK/WORLD_SIZE. Under DDP on CUDA each
    process takes cuda:LOCAL_RANK (NCCL); on CPU processes talk through gloo (useful for tests).
    Returns a DistInfo; call finish(dist) at the end."""
    device = resolve_device(device)
    if int(os.environ.get('RANK', -1)) == -1:
        return DistInfo(False, 0, 0, 1, device, True, 0)
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = resolve_device(f'cuda:{local_rank}')  # one GPU per process: cuda:LOCAL_RANK
        torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend='nccl', device_id=torch.device(device))
    else:
        torch.distributed.init_process_group(backend='gloo')
    return DistInfo(True, rank, local_rank, world_size, device, rank == 0, rank)


def finish(dist, exit_code=0):
    """End the run: without DDP, return (or raise SystemExit(exit_code) when it is nonzero). Under DDP, destroy the
    process group and leave at once, without the interpreter's finalization (stdout and stderr flushed; every
    checkpoint and report is written and closed before this). Finalization frees the DDP reducer, which still holds
    the gloo group, and the group's worker threads may still hold work whose tensors need the GIL then: one CI run
    in three aborted a rank that way after a clean stop ("terminate called without an active exception", SIGABRT;
    torch's own account of it: pytorch/pytorch pull request 179291)."""
    if dist.ddp and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    if exit_code:
        raise SystemExit(exit_code)


def make_out_dir(out_dir):
    """out_dir made if missing; a one-line error where it cannot be (a file of that name, no permission)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"out_dir={out_dir!r} cannot be made a folder ({e.strerror}); pass another --out_dir")


def per_rank(total, world_size, name='gradient_accumulation_steps'):
    """Split a global count (e.g. gradient_accumulation_steps) over the ranks; it must be a positive
    multiple of world_size, else a one-line error naming the key."""
    if total < world_size or total % world_size:
        multiples = ', '.join(str(world_size * k) for k in range(1, 4))
        fail(f"{name}={total} is not divisible by the world size {world_size}: pick a multiple of "
             f"{world_size} ({multiples}, ...)")
    return total // world_size


def barrier(dist):
    """Wait for every rank (no-op without DDP)."""
    if dist.ddp:
        torch.distributed.barrier()


def _all_reduce(values, dist, op):
    """All-reduce a list of numbers across the DDP ranks (float64 on this rank's device); returns a list."""
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def agree_across_ranks(value, dist, what='iter_num'):
    """Check that every rank holds the same number (e.g. the iteration read from the checkpoint);
    a one-line error otherwise (ranks read different files: out_dir not on a shared filesystem?)."""
    if not dist.ddp:
        return value
    lo = _all_reduce([value], dist, torch.distributed.ReduceOp.MIN)[0]
    hi = _all_reduce([value], dist, torch.distributed.ReduceOp.MAX)[0]
    if lo != hi:
        fail(f"ranks disagree on {what} ({lo} vs {hi}): every rank must read the same checkpoint; with "
             f"several nodes put out_dir on a shared filesystem")
    return value


@dataclass
class Precision:
    """dtype actually used ('float32' | 'bfloat16' | 'float16'), ctx (autocast or nullcontext, wrap
    forward passes in it) and scaler (a GradScaler, enabled only for float16)."""
    dtype: str
    ctx: object
    scaler: object


def setup_precision(device, dtype='auto'):
    """Autocast for the device: on CUDA bfloat16 when the GPU supports it ('auto'), float16 with a
    GradScaler only when asked for, float32 otherwise; TF32 matmuls are enabled. On CPU (and MPS) the
    model runs in float32 under nullcontext (a lower dtype asked for is noted and ignored)."""
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        fail(f"dtype '{dtype}' is not supported; use auto, float32, bfloat16 or float16")
    if not device.startswith('cuda'):
        if dtype not in ('auto', 'float32'):
            print(f"note: dtype {dtype} applies on CUDA only; {device} runs in float32")
        return Precision('float32', nullcontext(), torch.amp.GradScaler('cuda', enabled=False))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if dtype == 'auto':
        dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float32'
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
        fail(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16 or float32")
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type='cuda', dtype=ptdtype)
    return Precision(dtype, ctx, torch.amp.GradScaler('cuda', enabled=(dtype == 'float16')))


RANGES = {'> 0': lambda v: v > 0, '>= 0': lambda v: v >= 0, '>= -1': lambda v: v >= -1,
          'in [0, 1)': lambda v: 0 <= v < 1, 'in [0, 1]': lambda v: 0 <= v <= 1}


def check_ranges(config, ranges):
    """Values of the right type (configurator checks types) but out of range, as one-line errors naming the key,
    before anything runs: ranges maps a rule of RANGES to the keys it applies to (None, "unset", passes). Then the
    model keys config has (n_head, hyena_emb_dim, ...) go through GPTConfig's own checks, which name the key,
    where the modules built from them later would fail with a traceback."""
    from model import GPTConfig
    for rule, keys in ranges.items():
        for key in keys:
            if config[key] is not None and not RANGES[rule](config[key]):
                fail(f"{key}={config[key]!r} is out of range: it must be {rule}")
    shape = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config and f.name != 'hyena_layers'}
    try:
        GPTConfig(**shape)
    except ValueError as e:
        fail(str(e))


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's


def check_compile_mode(compile_mode):
    if compile_mode not in COMPILE_MODES:
        fail(f"compile_mode='{compile_mode}' is not one of {', '.join(COMPILE_MODES)}")


def speed_settings(compile_mode, impl, dot, short):
    """The config keys compile_mode, fftconv_impl, triton_dot and short_conv checked, and the last three applied:
    the Hyena long convolution's hyena.FFTCONV_IMPL ('plain', 'fast', 'triton'), fftconv_triton.TRITON_DOT ('tf32',
    'bf16', 'ieee') and the short convs' hyena.SHORT_CONV ('auto', 'conv1d', 'shift', 'fused') for this run."""
    check_compile_mode(compile_mode)
    for key, value, allowed in (('fftconv_impl', impl, hyena.FFTCONV_IMPLS),
                                ('triton_dot', dot, fftconv_triton.TRITON_DOTS), ('short_conv', short, hyena.SHORT_CONVS)):
        if value not in allowed:
            fail(f"{key}='{value}' is not one of {', '.join(allowed)}")
    hyena.FFTCONV_IMPL, fftconv_triton.TRITON_DOT, hyena.SHORT_CONV = impl, dot, short


def cuda_graphs(compile_mode, compiled, device):
    """Whether a compiled model replays CUDA graphs (compile modes 'reduce-overhead' and 'max-autotune' on CUDA).
    A training loop then calls torch.compiler.cudagraph_mark_step_begin() before each micro-step's forward (the
    graphs' outputs of the one before may be overwritten from there on) and clears gradients with clear_grads."""
    return compiled and device.startswith('cuda') and compile_mode in ('reduce-overhead', 'max-autotune')


def clear_grads(optimizer, graphs):
    """Gradients cleared for the next iteration (and before the first). Under CUDA graphs they stay allocated,
    zeroed: autograd adopts the first gradient of a parameter whose .grad is None as is, here a buffer of the
    backward graph, which the next micro-step's replay overwrites (pytorch/pytorch#169545: accumulated
    gradients silently wrong); into an existing .grad it adds in place. (A trainable parameter that gets no
    gradient in a step then has a zero one, which AdamW steps and decays; here every trainable one gets one.)"""
    if not graphs:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group['params']:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    # one foreach kernel per dtype (fused AdamW's zero_grad) instead of a zero_() launch per parameter: the
    # host launches the next iteration sooner (~200 launches for GPT-2 small: ~3 ms of host time per step under
    # the profiler, while the GPU waited for the next iteration's first kernel; BENCHMARKS.md, "Ninth session")
    optimizer.zero_grad(set_to_none=False)


def wrap_model(model, dist, compile=False, example_batch=None, ctx=nullcontext(), mode='default', shared_taps=None):
    """The model a training loop calls: torch.compile'd (with `mode`, see cuda_graphs) when compile is True,
    inside DDP under torchrun. Returns (model, compiled). With example_batch (X, Y) a compiled model is built
    right away by one forward + backward (gradients cleared afterwards), so a failure to build (e.g. no C
    compiler) shows here, not mid-training, and the model falls back to eager with a printed message. With
    shared_taps (a SharedTaps) that forward takes the taps as the loop's last micro-step will, through the filter
    MLPs: under DDP the backward then reaches every parameter, as the reducer expects of a synchronizing step (the
    earlier micro-steps' detached taps left the filters without gradients, and the next step failed).

    DDP keeps the gradients as views of its all-reduce buckets (no copy into them, no second 500 MB for
    GPT-2 small), and the compiled model stays one graph: dynamo's DDP optimizer, which splits the graph at the
    buckets so that each all-reduce overlaps the rest of the backward pass, cost 7 ms per distill.py iteration
    on one H200 (269 vs 262 ms, torchrun with one process; 261 without DDP), more than an exposed all-reduce of
    124M fp32 gradients should take over NVLink once per iteration (~2 ms for 497 MB; estimated, BENCHMARKS.md,
    Several GPUs). Across nodes on a slow network the overlap may win: delete the optimize_ddp line below."""
    def ddp(m):
        if not dist.ddp:
            return m
        # broadcast_buffers=False: the models' buffers are constants built the same way on every rank (Hyena's
        # filter frequencies and decay rates); DDP would otherwise broadcast them before every forward, a
        # collective that makes every micro-step wait for the slowest rank
        return DistributedDataParallel(m, device_ids=[dist.local_rank] if dist.device.startswith('cuda') else None,
                                       gradient_as_bucket_view=True, broadcast_buffers=False)

    check_compile_mode(mode)
    if not compile:
        return ddp(model), False
    print("compiling the model with torch.compile (takes a minute the first time)...")
    try:
        if dist.ddp:
            torch._dynamo.config.optimize_ddp = False
        # static shapes: a second shape compiles a second graph instead of a dynamic-shape one, which inductor
        # (torch 2.11) failed to build for the Hyena operator ("pointer<fp32> and float64", tests/test_cuda.py)
        wrapped = ddp(torch.compile(model, dynamic=False, mode=mode))
        if example_batch is not None:
            torch.compiler.cudagraph_mark_step_begin()
            kwargs = {}
            if shared_taps is not None:
                shared_taps.begin()
                kwargs['taps'] = shared_taps.taps(shared_taps.accum - 1)
            with ctx:
                _, loss = wrapped(*example_batch, **kwargs)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return wrapped, True
    except Exception as e:  # inductor raises many types; any of them means "cannot build here"
        model.zero_grad(set_to_none=True)
        try:
            torch._dynamo.reset()
        except Exception:
            pass
        reason = (str(e).strip().splitlines() or [''])[0][:200]
        print(f"torch.compile cannot build here ({type(e).__name__}: {reason}); running eager instead")
        return ddp(model), False


class SharedTaps:
    """The Hyena filters' taps computed once per optimizer step and shared by its micro-steps. The taps are a
    function of the filter parameters alone, not of the batch, so an iteration of `accum` micro-steps needs the
    filter MLPs' forward and backward once, not `accum` times (the 12-layer student's ~35 small kernels each way,
    ~0.25 ms of a 37 ms micro-step at block 1024 on an H100 in the thirtieth session's profile; BENCHMARKS.md).

        shared = SharedTaps(raw_model, block_size, accum)
        shared.begin()                                     # each iteration, before its first micro-step
        for micro in range(accum):
            logits, loss = model(X, Y, taps=shared.taps(micro))

    Micro-steps but the last get detached copies of the taps (leaves), into which their backward passes
    accumulate the gradient. The last gets the taps themselves, through an identity whose backward adds that
    accumulated gradient: its backward pass, the one that DDP all-reduces, then carries the whole iteration's
    gradient through the filter MLPs into their parameters. With accum 1 (or no Hyena layer) taps() is None and
    the model computes its taps inside its forward, as without this class."""

    def __init__(self, model, block_size, accum):
        self.model, self.block_size, self.accum = model, block_size, accum
        self.taps_with_graph, self.leaves = {}, {}

    def begin(self):
        if self.accum < 2:
            return
        self.taps_with_graph = self.model.filter_taps(self.block_size)
        self.leaves = {i: t.detach().requires_grad_(t.requires_grad) for i, t in self.taps_with_graph.items()}
        for leaf in self.leaves.values():
            if leaf.requires_grad:  # (a frozen filter's taps are shared as they are)
                # allocated, not None: under CUDA graphs autograd would adopt the backward graph's own buffer as
                # the first gradient, which the next replay overwrites (pytorch/pytorch#169545; clear_grads)
                leaf.grad = torch.zeros_like(leaf)

    def taps(self, micro):
        if not self.leaves:
            return None
        if micro < self.accum - 1:
            return self.leaves
        return {i: _PlusGrad.apply(t, self.leaves[i]) if t.requires_grad else self.leaves[i]
                for i, t in self.taps_with_graph.items()}


class _PlusGrad(torch.autograd.Function):
    """x unchanged; its backward adds the gradient accumulated in `leaf` (read when the backward runs)."""

    @staticmethod
    def forward(ctx, x, leaf):
        ctx.leaf = leaf
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad + ctx.leaf.grad, None


def clean_state_dict(state_dict):
    """Strip the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes that wrapped models add."""
    out = {}
    for k, v in state_dict.items():
        while True:
            if k.startswith('_orig_mod.'):
                k = k[len('_orig_mod.'):]
            elif k.startswith('module.'):
                k = k[len('module.'):]
            else:
                break
        out[k.replace('._orig_mod.', '.')] = v
    return out


def seed_step(seed, rank, iter_num):
    """Seed torch's global RNGs (CPU and CUDA: dropout) from (seed, rank, iter_num), so that the random
    numbers of an iteration do not depend on whether the run was resumed."""
    torch.manual_seed(_mix(seed, rank, iter_num))


def _mix(*ints):
    """A well-mixed 63-bit seed from a tuple of ints."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(1, np.uint64)[0]
               >> 1)


# ---- data --------------------------------------------------------------------------------------------------

def _bin_tokens(path, block_size, vocab_size, missing_hint):
    """Validate one .bin file and return its number of tokens; one-line errors for every problem."""
    if not os.path.exists(path):
        fail(missing_hint)
    nbytes = os.path.getsize(path)
    if nbytes % 2:
        fail(f"{path} has {nbytes} bytes, an odd number: not a file of uint16 token ids (a truncated write?); "
             f"re-run the prepare script")
    n = nbytes // 2
    if n < block_size + 1:
        fail(f"{path} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}; lower --block_size "
             f"or prepare more data")
    if vocab_size is not None:
        data = np.memmap(path, dtype=np.uint16, mode='r')
        chunk = 1 << 24
        if n <= FULL_SCAN_TOKENS:
            starts = range(0, n, chunk)
        else:
            step = 1 << 20
            starts = [int(s) for s in np.linspace(0, n - step, SAMPLE_CHUNKS)]
            chunk = step
        for s in starts:
            top = int(data[s:s + chunk].max())
            if top >= vocab_size:
                fail(_vocab_message(path, top, vocab_size))
        del data
    return n


def _vocab_message(path, top, vocab_size):
    """The one-line error for an id beyond the vocabulary."""
    return (f"{path} holds token id {top} >= vocab_size {vocab_size}: the data was tokenized for a larger "
            f"vocabulary than the model's; raise vocab_size or re-run the prepare script")


class TokenData:
    """Batches of (X, Y) from data_dir/{train,val}.bin (uint16 token ids, as data/*/prepare.py writes).

    Checked at construction, with one-line errors: both files exist (else the message names
    `python data/<dataset>/prepare.py` and the bring-your-own data/textfiles/prepare.py), have an even
    number of bytes, hold at least block_size + 1 tokens, and hold no id >= vocab_size (files up to
    512M tokens are scanned whole; bigger ones in samples, and then every batch is checked too).

    get_batch(split, index, stream=TRAIN_STREAM) is a pure function of (seed, rank, split, stream,
    index): see the module docstring. Training uses index = iter_num * accum + micro_step; estimate_loss
    uses the EVAL_STREAM with indices 0..eval_iters-1."""

    def __init__(self, data_dir, block_size, batch_size, device='cpu', vocab_size=None, seed=1337, rank=0,
                 dataset=None):
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.vocab_size, self.seed, self.rank = vocab_size, seed, rank
        name = dataset or os.path.basename(os.path.normpath(data_dir))
        self.paths, self.sizes = {}, {}
        for split in ('train', 'val'):
            path = os.path.join(data_dir, f'{split}.bin')
            hint = (f"dataset '{name}' not found: {path} does not exist; prepare it first with "
                    f"`python data/{name}/prepare.py`, or make one from your own text files with "
                    f"`python data/textfiles/prepare.py --input=DIR --out_dir=data/{name}`")
            self.paths[split] = path
            self.sizes[split] = _bin_tokens(path, block_size, vocab_size, hint)
        self.check_batches = vocab_size is not None and max(self.sizes.values()) > FULL_SCAN_TOKENS

    def get_batch(self, split, index, stream=TRAIN_STREAM):
        """Batch number `index` of split ('train' | 'val') in stream (TRAIN_STREAM | EVAL_STREAM):
        (X, Y) int64 tensors of shape (batch_size, block_size) on the device; Y is X shifted by one."""
        rng = np.random.default_rng([self.seed, self.rank, _SPLIT_IDS[split], stream, int(index)])
        starts = rng.integers(0, self.sizes[split] - self.block_size, size=self.batch_size)
        data = np.memmap(self.paths[split], dtype=np.uint16, mode='r')  # re-opened per batch: no RAM growth
        rows = np.stack([data[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        del data
        if self.check_batches:
            top = int(rows.max())
            if top >= self.vocab_size:
                fail(_vocab_message(self.paths[split], top, self.vocab_size))
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self.device.startswith('cuda'):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# ---- schedule, evaluation ----------------------------------------------------------------------------------

def kd_loss(student_logits, teacher_logits, ce, alpha, temperature):
    """alpha T^2 KL(teacher || student) at temperature T + (1 - alpha) ce (Hinton et al. 2015), where ce is the
    student's cross-entropy on the labels as its forward already computed it (not a second pass over the vocab).
    distill.py's kd stage trains on it; bench.py's distill section times it."""
    s = F.log_softmax(student_logits.flatten(0, 1).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.flatten(0, 1).float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction='batchmean')
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr.
    Warmup uses (it + 1) / (warmup_iters + 1), so iteration 0 already learns. decay_lr=False: constant."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def set_lr(optimizer, lr):
    """Set every param group's lr to lr * group['lr_scale'] (Hyena filters train at their own scale)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


@torch.no_grad()
def estimate_loss(model, data, eval_iters, ctx=nullcontext(), dist=None, splits=('train', 'val')):
    """Mean loss over eval_iters fixed batches of each split (the EVAL_STREAM, same batches every call),
    in eval mode; averaged over DDP ranks when dist is given. Returns {'train': float, 'val': float}."""
    was_training = model.training
    model.eval()
    out = {}
    for split in splits:
        total = torch.zeros((), device=data.device)
        for k in range(eval_iters):
            X, Y = data.get_batch(split, k, stream=EVAL_STREAM)
            torch.compiler.cudagraph_mark_step_begin()  # a no-op unless the model replays CUDA graphs
            with ctx:
                _, loss = model(X, Y)
            total += loss.float()
        out[split] = total.item() / eval_iters
    if dist is not None and dist.ddp:
        means = _all_reduce([out[s] for s in splits], dist, torch.distributed.ReduceOp.SUM)
        out = {s: v / dist.world_size for s, v in zip(splits, means)}
    model.train(was_training)
    return out


class GuardedStep:
    """The end of a training step: the optimizer step, skipped when the loss (or the gradient norm, when given) is
    NaN or inf on any rank, and each step's loss and verdict for the host. Under DDP the verdict's all-reduce also
    carries stop's signal (a StopFlag), so that stop.requested() needs no collective, and no sync, of its own.

        guard = GuardedStep(optimizer, scaler, dist, stop)
        guard.step(loss_sum, grad_norm, iter=it, lr=lr)        # the gated optimizer step, launched
        for info, loss, nonfinite in guard.results(wait):      # the steps whose numbers have arrived, in order
            ...                                                # info: step()'s keywords; wait=True: every step

    With a fused optimizer (AdamW on CUDA) and no GradScaler the step is gated on the device (the optimizer's
    found_inf, the mechanism GradScaler uses: a skipped step leaves weights, moments and step count as they were)
    and the host reads the verdict one step late, from a copy that it did not wait for: the host never waits for
    the GPU to finish a step before it launches the next, so the GPU does not idle while the host launches the
    optimizer, logs and starts the next forward (BENCHMARKS.md, "Tenth session"). Otherwise (CPU, float16) the host
    reads the verdict at once, one sync, and skips the step itself; float16's GradScaler then backs off its scale.
    A loop calls results(wait=True) before it evaluates, saves or ends, so that every step is reported first."""

    def __init__(self, optimizer, scaler, dist=None, stop=None):
        self.optimizer, self.scaler, self.dist, self.stop = optimizer, scaler, dist, stop
        self.on_device = bool(optimizer.defaults.get('fused')) and not scaler.is_enabled()
        self.pending = []  # (info, (nonfinite, signal, loss) on the host or on its way there, CUDA event or None)

    def step(self, loss, grad_norm=None, **info):
        """Launch the optimizer step for this loss (and gradient norm); info comes back with its results."""
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float())
        signum = 0 if self.stop is None or self.stop.signum is None else self.stop.signum
        flags = torch.stack([bad.float().reshape(()), torch.full((), float(signum), device=bad.device)])
        if self.dist is not None and self.dist.ddp:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        numbers = torch.cat([flags, loss.detach().float().reshape(1)])
        if self.on_device:
            self.optimizer.found_inf = flags[0]
            self.optimizer.step()
            del self.optimizer.found_inf
            event = None
            if numbers.is_cuda:  # a copy into pinned memory, queued behind this step; results() waits for it
                stream = torch.cuda.current_stream(numbers.device)  # the tensors' GPU, which may not be the current one
                numbers, event = numbers.to('cpu', non_blocking=True), torch.cuda.Event()
                event.record(stream)
            self.pending.append((info, numbers, event))
            return
        numbers = numbers.cpu()  # the one sync
        if numbers[0]:
            if self.scaler.is_enabled():  # float16: back off the loss scale, and reset the scaler for the next step
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.pending.append((info, numbers, None))

    def results(self, wait=False):
        """[(info, loss, nonfinite)] of the steps not yet returned whose numbers are on the host, oldest first:
        with the device-gated step all but the last one launched (whose copy the host would wait for), with
        wait=True all. Reading one also gives its all-reduced signal to the StopFlag."""
        ready = self.pending if wait or not self.on_device else self.pending[:-1]
        self.pending = self.pending[len(ready):]
        out = []
        for info, numbers, event in ready:
            if event is not None:
                event.synchronize()
            nonfinite, signum, loss = numbers.tolist()
            if self.stop is not None and self.dist is not None and self.dist.ddp:
                self.stop.agree(int(signum))
            out.append((info, loss, bool(nonfinite)))
        return out


# ---- checkpoints --------------------------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """torch.save obj to path atomically: write a temp file in the same folder, fsync it, os.replace it
    over path, fsync the folder. A crash at any point leaves the previous file at path intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic


def load_checkpoint(path, map_location='cpu', required=('model', 'model_args'), if_missing='check the path'):
    """Load a checkpoint dict written by save_checkpoint (tensors, numbers, strings, lists, dicts only:
    weights_only loading). Missing, truncated, corrupt or foreign files, or a dict lacking the `required`
    keys, give a one-line error naming the file (a missing one with the caller's fix, `if_missing`). The model
    state dict comes back without `_orig_mod.`/`module.` prefixes."""
    if not os.path.exists(path):
        fail(f"checkpoint {path} not found; {if_missing}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        fail(f"checkpoint {path} is unreadable (truncated or corrupt: {reason}); restore it or start again")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        fail(f"checkpoint {path} is not a checkpoint of this repo (expected keys: {', '.join(required)})")
    if isinstance(ckpt.get('model'), dict):
        ckpt['model'] = clean_state_dict(ckpt['model'])
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild the GPT (teacher, student or hybrid) that a checkpoint describes and load its weights. A
    recurrent checkpoint (recurrent.py: Hyena filters fitted in modal form) comes back decoding recurrently."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(**ckpt['model_args']))
    if ckpt.get('modal'):
        from recurrent import attach_empty
        attach_empty(model, int(ckpt['modal']['d_state']))
    model.load_state_dict(ckpt['model'])
    return model


def parse_layers(spec, n_layer, key='hyena_layers'):
    """Which layers a key selects, as a sorted list of ints: None / '' / 'none' -> [], 'all' -> every
    layer, an int, a comma-separated string '0,2,4', or a list/tuple of ints. Negative indices count
    from the end. An index out of range is a one-line error naming the key and the valid range."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ('', 'none')):
        return []
    if isinstance(spec, str) and spec.strip().lower() == 'all':
        return list(range(n_layer))
    if isinstance(spec, bool):
        fail(f"{key}={spec!r}: expected 'all', '' or a list of layer indices")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        try:
            spec = [int(s) for s in spec.replace(' ', '').strip('[]()').split(',') if s]
        except ValueError:
            fail(f"{key}={spec!r}: expected 'all', '' or layer indices like 0,2,4")
    if not isinstance(spec, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        fail(f"{key}={spec!r}: expected 'all', '' or a list of layer indices")
    bad = [i for i in spec if not -n_layer <= i < n_layer]
    if bad:
        fail(f"{key}: layer {bad[0]} is out of range for n_layer={n_layer} (valid: 0..{n_layer - 1})")
    return sorted(set(i % n_layer for i in spec))


# ---- preemption ---------------------------------------------------------------------------------------------

class StopFlag:
    """Catch SIGTERM and SIGINT: the first sets a flag (the loop saves a checkpoint and exits with
    exit_code = 128 + signal number); a second SIGINT (Ctrl-C again) aborts at once with
    KeyboardInterrupt. Further SIGTERMs are ignored: torchrun sends one to every worker after a Ctrl-C,
    and that must not abort the checkpoint being written.
    requested(dist) is True once any rank got a signal: under DDP, once the ranks agreed on it (GuardedStep
    all-reduces the signal with its verdict), so all ranks stop at the same iteration, two steps after the
    signal at most (one where the host reads the verdict at once). Install it in the main thread; restore()
    puts the previous handlers back."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum = None
        self.agreed = None  # under DDP: the ranks' largest signal number (0: none) agreed since requested() last ran
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        """The signal handler: remember the first signal; a second SIGINT aborts."""
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this iteration "
              f"(send it again to abort at once)", file=sys.stderr, flush=True)

    def agree(self, signum):
        """Take the all-reduced (MAX) signal number of the ranks: a signal any rank got is every rank's now."""
        self.agreed = signum
        if signum and self.signum is None:
            self.signum = signum

    def requested(self, dist=None):
        """Whether to stop now (the same answer on every rank). Under DDP the agreement made since the last call
        (by GuardedStep.results), else one made here with a collective of its own (the first call, after a
        results() that returned nothing new, or in a loop without a GuardedStep): every rank calls both in the same
        order."""
        if dist is None or not dist.ddp:
            return self.signum is not None
        if self.agreed is None:
            self.agree(int(_all_reduce([self.signum or 0], dist, torch.distributed.ReduceOp.MAX)[0]))
        flag, self.agreed = self.agreed, None
        return bool(flag)

    @property
    def exit_code(self):
        """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + (self.signum or 0)

    @property
    def name(self):
        """'SIGTERM' / 'SIGINT' once a signal arrived, else ''."""
        return signal.Signals(self.signum).name if self.signum else ''

    def restore(self):
        """Put back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---- progress and logs ------------------------------------------------------------------------------------

def human(n):
    """12345 -> '12.3K', 2.5e6 -> '2.50M'."""
    for unit, size in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


class Progress:
    """A tqdm bar over iterations showing loss, lr, tokens/s and MFU ('MFU n/a' when the device's peak is
    unknown). enabled=False (non-master ranks) silences everything; show_bar=False keeps write() but
    hides the bar (e.g. eval_only). Use write() for lines that must not break the bar."""

    def __init__(self, total, initial=0, enabled=True, show_bar=True, desc='train'):
        from tqdm import tqdm
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and show_bar), desc=desc, unit='it',
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def update(self, loss, lr, tokens_per_sec, mfu=None):
        """Advance one iteration and show its numbers."""
        mfu_text = 'MFU n/a' if mfu is None else f"MFU {100 * mfu:.1f}%"
        self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {human(tokens_per_sec)} tok/s {mfu_text}",
                                 refresh=False)
        self.bar.update(1)

    def write(self, message):
        """Print a line (stdout) above the bar."""
        if self.enabled:
            self.bar.write(message, file=sys.stdout)

    def close(self):
        """Close the bar (idempotent)."""
        self.bar.close()


def strict_json(obj):
    """obj with every NaN/inf float, however deep in dicts and lists, as None: json writes null, not NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


class JsonlLogger:
    """Append one JSON object per line to path (when enabled: the master rank), flushed each time, so a
    killed run keeps its log; NaN/inf become null (strict JSON). A resumed run appends to the same file."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, **fields):
        """Append one record (a 'time' field is added)."""
        if not self.enabled:
            return
        fields.setdefault('time', round(time.time(), 3))
        with open(self.path, 'a') as f:
            f.write(json.dumps(strict_json(fields)) + '\n')
