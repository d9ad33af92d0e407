"""
Train a GPT teacher (or, with hyena_layers, a Hyena / hybrid model from scratch: the paper's baseline for
the same budget) with nanoGPT's train.py semantics. Helpers live in training.py.

    python train_teacher.py config/train_teacher_pystdlib_cpu.py             # CPU, 5-8 minutes, 2 cores
    python train_teacher.py config/train_teacher_pystdlib_gpu.py             # one GPU
    torchrun --standalone --nproc_per_node=8 train_teacher.py config/train_gpt2.py      # 8 GPUs, one node
    # several nodes (run on each; --node_rank=1 on the second), out_dir on a shared filesystem:
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST0 --master_port=29500 \\
        train_teacher.py config/train_gpt2.py
    python train_teacher.py config/train_teacher_pystdlib_cpu.py --init_from=resume   # continue a run
    python train_teacher.py config/train_teacher_pystdlib_cpu.py --hyena_layers=all   # Hyena baseline

Config: the module-level keys below, then config files, then --key=value (configurator.py).
Writes out_dir/ckpt.pt (atomically; rebuild the model with GPT(GPTConfig(**ckpt['model_args']))) and
out_dir/log.jsonl (one record per log_interval iterations and per eval).
SIGTERM / SIGINT: saves ckpt.pt and exits with status 143 / 130; --init_from=resume continues exactly.
"""
import dataclasses
import math
import os
import time

import torch

import training as T
from configurator import configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out-teacher'
eval_interval = 250  # evaluate (and checkpoint) every this many iterations, and at the end
log_interval = 10  # write a train record to log.jsonl every this many iterations
eval_iters = 100  # batches per split per evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # else only when val loss improves (preemption always saves)
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2*' or a local Hugging Face GPT-2 folder
# data
dataset = 'pystdlib'
data_dir = ''  # default: data/<dataset> next to this script
gradient_accumulation_steps = 1  # global: divided among DDP ranks
batch_size = 12  # per rank and micro-step
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
pos_emb = True
hyena_layers = None  # '' / None: a pure GPT; 'all'; a list [0, 2] or a string '0,2': those layers mix with Hyena
hyena_order = 2
hyena_filter_order = 64
hyena_emb_dim = 33
hyena_filter_freq = 14.0
hyena_short_filter_order = 3
# optimizer
learning_rate = 6e-4
max_iters = 5000  # iterations 0 .. max_iters - 1
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
filter_lr_scale = 1.0  # Hyena filter parameters train at learning_rate * filter_lr_scale
skip_nonfinite = False  # on a NaN/inf loss: False stops the run, True skips that step and goes on
# learning rate schedule
decay_lr = True
warmup_iters = 200
lr_decay_iters = 5000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 on CUDA when supported), 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile; falls back to eager with a message where it cannot build
compile_mode = 'default'  # torch.compile's mode; 'reduce-overhead' replays CUDA graphs (fewer launches)
fftconv_impl = 'fast'  # Hyena long conv: 'fast' (cuFFT), 'plain' (the reference), 'triton' (fused kernels, CUDA)
triton_dot = 'tf32'  # operand precision of the Triton kernels' matmuls: 'tf32', 'bf16' or 'ieee'
short_conv = 'auto'  # Hyena short convs + gates: 'auto' (torch), 'fused' (Triton kernels, CUDA, order 2)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())
T.check_ranges(config, {
    '> 0': ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size', 'block_size',
            'n_head', 'n_embd', 'vocab_size', 'hyena_filter_order', 'hyena_short_filter_order', 'hyena_filter_freq'),
    '>= 0': ('seed', 'n_layer', 'max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr',
             'weight_decay', 'grad_clip', 'filter_lr_scale'),
    'in [0, 1)': ('dropout', 'beta1', 'beta2')})
T.speed_settings(compile_mode, fftconv_impl, triton_dot, short_conv)
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout', 'pos_emb',
              'hyena_layers', 'hyena_order', 'hyena_filter_order', 'hyena_emb_dim', 'hyena_filter_freq',
              'hyena_short_filter_order')

# ---- processes, devices, precision
dist = T.setup_distributed(device)
accum = T.per_rank(gradient_accumulation_steps, dist.world_size)
master = dist.master
prec = T.setup_precision(dist.device, dtype)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if master:
    T.make_out_dir(out_dir)
torch.manual_seed(seed + dist.seed_offset)

# ---- model
iter_num, best_val_loss, tokens_seen, checkpoint = 0, 1e9, 0, None
if init_from == 'scratch':
    layers = T.parse_layers(hyena_layers, n_layer)
    model_args = {k: config[k] for k in MODEL_KEYS} | {'hyena_layers': layers}
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    checkpoint = T.load_checkpoint(ckpt_path,
                                   if_missing='nothing to resume in --out_dir; start with --init_from=scratch')
    if 'iter_num' not in checkpoint:
        T.fail(f"{ckpt_path} is not a train_teacher.py checkpoint (a distill.py student?): continue it with "
               f"distill.py --init_from=resume, or pass another --out_dir")
    model_args = checkpoint['model_args']
    changed = [k for k in MODEL_KEYS if k != 'hyena_layers' and k in model_args and model_args[k] != config[k]]
    if changed and master:
        print(f"resume: the model shape comes from {ckpt_path}; ignoring " +
              ', '.join(f"{k}={config[k]!r} (checkpoint: {model_args[k]!r})" for k in changed))
    block_size = model_args['block_size']
    model = T.model_from_checkpoint(checkpoint)
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    tokens_seen = checkpoint.get('tokens_seen', 0)
elif init_from.startswith('gpt2') or os.path.isdir(init_from):
    if hyena_layers not in (None, '', 'none', [], ()):
        T.fail("hyena_layers needs init_from='scratch' here; to turn a pretrained GPT into Hyena use distill.py")
    model = GPT.from_pretrained(init_from, dict(dropout=dropout))
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    block_size = model.config.block_size
else:
    T.fail(f"init_from='{init_from}' is not 'scratch', 'resume', a GPT-2 name (gpt2, gpt2-medium, gpt2-large, "
           f"gpt2-xl) or a folder holding a Hugging Face GPT-2 checkpoint")
model_args = dataclasses.asdict(model.config)  # plain values, exactly what GPTConfig(**model_args) takes
model.to(dist.device)
tokens_per_iter = accum * dist.world_size * batch_size * block_size
if master:
    kinds = model.config.hyena_layers
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers"
          + (f", Hyena at {kinds}" if kinds else " of attention"))
    print(f"tokens per iteration: {tokens_per_iter:,} ({dist.world_size} rank(s) x {accum} accumulation "
          f"x {batch_size} batch x {block_size} tokens); device {dist.device}, {prec.dtype}")

# ---- data (validated against the model's vocabulary)
data = T.TokenData(data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset),
                   block_size, batch_size, dist.device, vocab_size=model.config.vocab_size, seed=seed,
                   rank=dist.rank, dataset=dataset)

# ---- optimizer, compile, DDP
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2),
                                       'cuda' if dist.device.startswith('cuda') else 'cpu',
                                       filter_lr_scale=filter_lr_scale)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler'):
        prec.scaler.load_state_dict(checkpoint['scaler'])
    T.agree_across_ranks(iter_num, dist)
checkpoint = None  # free memory
raw_model = model
shared_taps = T.SharedTaps(raw_model, block_size, accum)  # a Hyena model's filters: once per iteration
model, compiled = T.wrap_model(model, dist, compile, data.get_batch('train', 0), prec.ctx, compile_mode, shared_taps)
graphs = T.cuda_graphs(compile_mode, compiled, dist.device)
T.clear_grads(optimizer, graphs)
logger = T.JsonlLogger(os.path.join(out_dir, 'log.jsonl'), enabled=master)
last_saved = None  # iteration of the last checkpoint this run wrote (or loaded)
if init_from == 'resume':
    last_saved = iter_num


def save(reason):
    """Write ckpt.pt (master only); every rank waits for it."""
    global last_saved
    if master:
        T.save_checkpoint({
            'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config, 'tokens_seen': tokens_seen,
            'scaler': prec.scaler.state_dict() if prec.scaler.is_enabled() else None, 'kind': 'teacher',
        }, ckpt_path)
        bar.write(f"iter {iter_num}: saved {ckpt_path} ({reason})")
    last_saved = iter_num
    T.barrier(dist)


def log_steps(steps):
    """The finished steps' numbers (T.GuardedStep.results): logged; a non-finite one stops the run, or is noted and
    skipped with skip_nonfinite."""
    for info, lossf, nonfinite in steps:
        it = info['iter']
        if nonfinite:
            what = f"non-finite loss ({lossf})" if not math.isfinite(lossf) else "non-finite gradient"
            if not skip_nonfinite:
                kept = (f"the last good checkpoint {ckpt_path} (iter {last_saved}) is kept" if last_saved is not None
                        else "no checkpoint was written yet")
                bar.close()
                T.fail(f"{what} at iter {it}: stopping; {kept}. Lower learning_rate, or pass "
                       f"--skip_nonfinite=True to skip such steps")
            bar.write(f"iter {it}: {what}; skipping this step (skip_nonfinite=True)")
            logger.log(iter=it, skipped=True, lr=info['lr'])
        bar.update(lossf, info['lr'], info['tok_rate'], info['mfu'])
        if it % log_interval == 0:
            logger.log(iter=it, loss=lossf, lr=info['lr'], dt_ms=round(1000 * info['dt'], 2),
                       tokens_per_sec=round(info['tok_rate']), mfu=info['mfu'], tokens=info['tokens'])


# ---- training loop
stop = T.StopFlag()
guard = T.GuardedStep(optimizer, prec.scaler, dist, stop)
bar = T.Progress(max_iters, initial=iter_num, enabled=master, show_bar=not eval_only)
X, Y = data.get_batch('train', iter_num * accum)
t0, local_iter, running_mfu, tok_rate = time.time(), 0, None, None
while True:
    lr = T.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
    T.set_lr(optimizer, lr)

    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        losses = T.estimate_loss(model, data, eval_iters, prec.ctx, dist)
        bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        logger.log(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], lr=lr, tokens=tokens_seen)
        if eval_only:
            break
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        if (improved or always_save_checkpoint) and iter_num > 0 and last_saved != iter_num:
            save('best val loss' if improved else 'eval')
        t0 = time.time()  # evaluation time is not training time
    if iter_num >= max_iters:
        break
    if stop.requested(dist):
        log_steps(guard.results(wait=True))  # the last step's numbers, before the checkpoint
        if last_saved != iter_num:
            save(f"{stop.name}")
        bar.close()
        if master:
            print(f"stopped by {stop.name} at iter {iter_num}; resume with --init_from=resume", flush=True)
        T.finish(dist, stop.exit_code)

    # one optimizer step over `accum` micro-batches; the batch of each micro-step is a function of its index
    T.seed_step(seed, dist.rank, iter_num)
    loss_sum = torch.zeros((), device=dist.device)
    shared_taps.begin()
    for micro_step in range(accum):
        if dist.ddp:  # sync gradients only on the last micro-step; must be set before its forward pass
            model.require_backward_grad_sync = (micro_step == accum - 1)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with prec.ctx:
            _, loss = model(X, Y, taps=shared_taps.taps(micro_step))
            loss = loss / accum  # the mean over micro-steps
        X, Y = data.get_batch('train', iter_num * accum + micro_step + 1)  # prefetch while the GPU works
        prec.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    grad_norm = None
    if grad_clip != 0.0:
        prec.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)

    # timing: from one step's launch to the next, the GPU's pace in a steady run
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    tokens_seen += tokens_per_iter
    tok_rate = tokens_per_iter / dt if tok_rate is None else 0.9 * tok_rate + 0.1 * tokens_per_iter / dt
    if local_iter >= 3:  # let the first iterations (compile, warm-up) pass
        mfu = raw_model.estimate_mfu(batch_size * accum, dt, device=dist.device)
        if mfu is not None:
            running_mfu = mfu if running_mfu is None else 0.9 * running_mfu + 0.1 * mfu
    # the step, unless the loss or gradient is NaN/inf (under fp16 its GradScaler skips inf gradients by itself);
    # its numbers arrive a step later where the GPU gates it
    guard.step(loss_sum, None if prec.scaler.is_enabled() else grad_norm, iter=iter_num, lr=lr, dt=dt,
               tok_rate=tok_rate, mfu=running_mfu, tokens=tokens_seen)
    T.clear_grads(optimizer, graphs)
    iter_num += 1
    local_iter += 1
    log_steps(guard.results(wait=iter_num % eval_interval == 0 or iter_num >= max_iters))

bar.close()
stop.restore()
if master:
    print(f"done: iter {iter_num}, best val loss {best_val_loss:.4f}, {tokens_seen:,} tokens; checkpoint {ckpt_path}")
T.finish(dist)
