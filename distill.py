"""
Scavenging Hyena (Ralambomihanta et al., arXiv:2401.17574): distil a GPT teacher into a student whose
attention layers are replaced, layer by layer, by Hyena operators; then train the same student
architecture from scratch on the same tokens, the paper's baseline, and write a report comparing them.

    python distill.py config/distill_pystdlib_cpu.py                   # the embedded demo, CPU
    python distill.py config/distill_pystdlib_gpu.py                   # one GPU
    torchrun --standalone --nproc_per_node=8 distill.py config/distill_gpt2.py   # GPT-2 124M, 8 GPUs
    python distill.py config/distill_pystdlib_cpu.py --init_from=resume          # continue a stopped run

Stages, each with its own iterations and learning rate (0 iterations skips a stage):
  align    the paper's progressive knowledge transfer: per replaced layer, the MSE between the Hyena
           operator's output and the teacher attention's output on the same input, normalised by the
           target's mean square (so it reads as a relative error, comparable across layers).
           align_mode='progressive': layers are replaced one at a time, in order; layer i trains on the
           inputs that the student's already distilled layers 0..i-1 produce (align_iters split evenly, the
           last layer taking the remainder).
           align_mode='parallel': all layers at once, each on the teacher's own inputs.
  kd       end to end on the logits: alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE(labels)
           (Hinton et al. 2015); the teacher frozen, eval mode, no grad.
  scratch  the same student architecture from random init, CE only, on the same tokens (by default as
           many as align + kd used, and the very same batches).
A replaced layer starts from its attention (seed_from_attention: in_proj <- c_attn, out_proj <- c_proj, an
identity short conv); match_output_scale=True then scales each out_proj row to the least-squares fit of the
attention's output on the phase's first batch.
The teacher is a train_teacher.py checkpoint, a GPT-2 name or a local Hugging Face GPT-2 folder.
Writes out_dir/ckpt.pt (the student; sample.py loads it), log.jsonl and report.{md,json,png}.
SIGTERM / SIGINT: saves ckpt.pt mid-stage and exits; --init_from=resume continues with the same losses.
"""
import dataclasses
import json
import math
import os
import time

import torch

import training as T
from configurator import configure
from model import GPT, GPTConfig, make_mixer, peak_flops

# -----------------------------------------------------------------------------
out_dir = 'out-distill'
teacher = 'out-teacher/ckpt.pt'  # train_teacher.py checkpoint, 'gpt2'..'gpt2-xl', or a local HF GPT-2 folder
init_from = 'teacher'  # 'teacher': start a distillation; 'resume': continue out_dir/ckpt.pt
dataset = 'pystdlib'
data_dir = ''  # default: data/<dataset> next to this script
batch_size = 12  # per rank and micro-step
block_size = 0  # 0: the teacher's block_size
gradient_accumulation_steps = 1  # global: divided among DDP ranks
# the student
hyena_layers = None  # which attention layers become Hyena: None (all), 'all', a list [0, 2] or '0,2'
seed_from_attention = True  # in_proj <- c_attn (q, k, v -> x0, x1, v), out_proj <- c_proj, short conv = identity
match_output_scale = False  # then scale each out_proj row to the least-squares fit of the attention's output
#   (lowers the first align errors; on the CPU demo the final student was no better, see README)
hyena_order = 2
hyena_filter_order = 64
hyena_emb_dim = 33
hyena_filter_freq = 14.0
hyena_short_filter_order = 3
filter_lr_scale = 1.0  # Hyena filter parameters train at lr * filter_lr_scale, without weight decay
# stage align
align_iters = 100  # 0 skips; progressive: align_iters // len(hyena_layers) per layer, the last takes the rest
align_lr = 1e-3
align_mode = 'progressive'  # 'progressive' or 'parallel'
# stage kd
kd_iters = 500
kd_lr = 6e-4
kd_alpha = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy on the labels
kd_temperature = 1.0
kd_freeze_copied = False  # True: only the Hyena operators train, every weight copied from the teacher is frozen
# stage scratch (the baseline)
scratch_iters = -1  # -1: as many as align + kd (the same student token budget); 0 skips
scratch_lr = 6e-4
# optimizer and schedule (per stage, and per layer in progressive align: linear warmup over at most half of it,
# cosine to lr * min_lr_ratio)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 20
min_lr_ratio = 0.1
skip_nonfinite = False  # on a NaN/inf loss: False stops the run, True skips that step
# evaluation and logs
eval_interval = 100  # per stage; also writes a checkpoint
eval_iters = 20
# system
device = 'auto'
dtype = 'auto'
compile = True
compile_mode = 'default'  # torch.compile's mode; 'reduce-overhead' replays CUDA graphs (fewer launches)
fftconv_impl = 'fast'  # Hyena long conv: 'fast' (cuFFT), 'plain' (the reference), 'triton' (fused kernels, CUDA)
triton_dot = 'tf32'  # operand precision of the Triton kernels' matmuls: 'tf32', 'bf16' or 'ieee'
short_conv = 'auto'  # Hyena short convs + gates: 'auto' (torch), 'fused' (Triton kernels, CUDA, order 2)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())
T.check_ranges(config, {
    '> 0': ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'hyena_filter_order',
            'hyena_short_filter_order', 'hyena_filter_freq', 'kd_temperature'),
    '>= 0': ('seed', 'block_size', 'align_iters', 'kd_iters', 'align_lr', 'kd_lr', 'scratch_lr', 'weight_decay',
             'grad_clip', 'warmup_iters', 'filter_lr_scale'),
    '>= -1': ('scratch_iters',),
    'in [0, 1)': ('beta1', 'beta2'),
    'in [0, 1]': ('kd_alpha', 'min_lr_ratio')})
T.speed_settings(compile_mode, fftconv_impl, triton_dot, short_conv)
if align_mode not in ('progressive', 'parallel'):
    T.fail(f"align_mode='{align_mode}' is not 'progressive' or 'parallel'")

dist = T.setup_distributed(device)
master = dist.master
accum = T.per_rank(gradient_accumulation_steps, dist.world_size)
prec = T.setup_precision(dist.device, dtype)
device_type = 'cuda' if dist.device.startswith('cuda') else 'cpu'
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if master:
    T.make_out_dir(out_dir)

# ---- the teacher: frozen, eval mode
if teacher.endswith('.pt'):
    teacher_ckpt = T.load_checkpoint(teacher, if_missing='train a teacher first with train_teacher.py, or pass '
                                      '--teacher=<its ckpt.pt, a GPT-2 name or a local Hugging Face folder>')
    teacher_model = T.model_from_checkpoint(teacher_ckpt)
    teacher_tokens = teacher_ckpt.get('tokens_seen')
    del teacher_ckpt
else:
    teacher_model, teacher_tokens = GPT.from_pretrained(teacher), None
if teacher_model.config.hyena_layers:
    T.fail(f"teacher {teacher} already has Hyena layers {teacher_model.config.hyena_layers}; distil from a GPT")
teacher_model.to(dist.device).eval().requires_grad_(False)
block_size = block_size or teacher_model.config.block_size
if block_size > teacher_model.config.block_size:
    T.fail(f"block_size {block_size} exceeds the teacher's {teacher_model.config.block_size}; lower --block_size")
layers = T.parse_layers('all' if hyena_layers is None else hyena_layers, teacher_model.config.n_layer)
if not layers:
    T.fail("hyena_layers selects no layer: nothing to distil; use 'all' or a list of layer indices")
if align_mode == 'progressive' and 0 < align_iters < len(layers):
    T.fail(f"align_iters={align_iters} leaves some of the {len(layers)} layers no progressive align iteration; "
           f"raise it to {len(layers)} or more, or pass --align_mode=parallel")

data = T.TokenData(data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset),
                   block_size, batch_size, dist.device, vocab_size=teacher_model.config.vocab_size,
                   seed=seed, rank=dist.rank, dataset=dataset)
tokens_per_iter = accum * dist.world_size * batch_size * block_size
stage_iters = {'align': align_iters, 'kd': kd_iters,
               'scratch': align_iters + kd_iters if scratch_iters < 0 else scratch_iters}
STAGES = [s for s in ('align', 'kd', 'scratch') if stage_iters[s] > 0]
if not STAGES:
    T.fail("every stage has 0 iterations: set align_iters, kd_iters or scratch_iters")


def stage_rank(name):
    return STAGES.index(name) if name in STAGES else len(STAGES)  # 'done' comes after every stage


# the scratch baseline draws the very batches the distilled student saw: batch index = stage offset + iteration
batch_offset = {'align': 0, 'kd': align_iters, 'scratch': 0}
HYENA_ARGS = dict(hyena_order=hyena_order, hyena_filter_order=hyena_filter_order, hyena_emb_dim=hyena_emb_dim,
                  hyena_filter_freq=hyena_filter_freq, hyena_short_filter_order=hyena_short_filter_order)


def replace_with_hyena(student, i):
    """Swap block i's attention for a Hyena operator; seed its projections from that attention."""
    cfg = student.config
    attn = student.transformer.h[i].mixer
    cfg.hyena_layers = sorted(set(cfg.hyena_layers) | {i})
    with torch.random.fork_rng(devices=[]):  # the same init on every rank, resumed or not
        torch.manual_seed(seed + 1000 * (i + 1))
        op = make_mixer(cfg, i)
    if seed_from_attention:
        D, N = cfg.n_embd, cfg.hyena_order
        with torch.no_grad():  # streams x0, x1 .. x_{N-1}, v  <-  q, k, (fresh), v
            for dst, src in ((0, 0), (1, 1), (N, 2)):
                op.in_proj.weight[dst * D:(dst + 1) * D] = attn.c_attn.weight[src * D:(src + 1) * D]
                if cfg.bias:
                    op.in_proj.bias[dst * D:(dst + 1) * D] = attn.c_attn.bias[src * D:(src + 1) * D]
            op.out_proj.load_state_dict(attn.c_proj.state_dict())
            op.short_filter.weight.zero_()
            op.short_filter.weight[..., -1] = 1.0  # the current position only: x0, x1, v start as q, k, v
            op.short_filter.bias.zero_()
    student.transformer.h[i].mixer = op.to(attn.c_attn.weight.device)


def new_student():
    """A copy of the teacher (attention everywhere) carrying the Hyena settings; layers get replaced later."""
    args = dataclasses.asdict(teacher_model.config) | HYENA_ARGS | dict(block_size=block_size)
    student = GPT(GPTConfig(**args))
    state = teacher_model.state_dict()
    if block_size < teacher_model.config.block_size and 'transformer.wpe.weight' in state:
        state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:block_size]
    student.load_state_dict(state)
    return student.to(dist.device)


def new_scratch():
    """The baseline: the student's architecture, every layer of `layers` Hyena, from the same random init on
    every rank."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**dataclasses.asdict(student.config) | dict(hyena_layers=layers))).to(dist.device)


def check_resumable(ckpt, student):
    """One-line errors for a checkpoint this run cannot continue: not a distill.py one, another teacher's
    student, another block_size, or stopped in a stage this run's settings skip."""
    if 'stage' not in ckpt:
        T.fail(f"{ckpt_path} is not a distill.py checkpoint (a teacher's?); pass it as --teacher and start with "
               f"--init_from=teacher, or point --out_dir at a distill run")
    t, s = teacher_model.config, student.config
    for key in ('vocab_size', 'n_embd', 'n_layer'):
        if getattr(t, key) != getattr(s, key):
            T.fail(f"teacher {teacher} and student {ckpt_path} differ in {key} ({getattr(t, key)} vs "
                   f"{getattr(s, key)}): resume with the teacher this student was distilled from")
    if s.block_size != block_size:
        T.fail(f"student {ckpt_path} was distilled at block_size {s.block_size}, this run asks {block_size}: "
               f"resume with --block_size={s.block_size}")
    if ckpt['stage'] not in STAGES and ckpt['stage'] != 'done':
        T.fail(f"{ckpt_path} stopped in stage {ckpt['stage']}, which this run skips ({ckpt['stage']}_iters=0): "
               f"resume with the iterations the run started with")


# ---- state: fresh or resumed
history, throughput = [], {}  # eval records (for the report), tokens/s per stage
stage, stage_it, opt_state, opt_key, scratch_state, last_saved = STAGES[0], 0, None, None, None, None
if init_from == 'resume':
    ckpt = T.load_checkpoint(ckpt_path, if_missing='nothing to resume in --out_dir; start with --init_from=teacher')
    student = T.model_from_checkpoint(ckpt).to(dist.device)
    check_resumable(ckpt, student)
    stage, stage_it, opt_state, opt_key = ckpt['stage'], ckpt['stage_iter'], ckpt['optimizer'], ckpt['opt_key']
    history, throughput, scratch_state = ckpt['history'], ckpt['throughput'], ckpt.get('scratch_model')
    T.agree_across_ranks(stage_rank(stage) * 10 ** 9 + stage_it, dist)
    last_saved = (stage, stage_it)
    del ckpt
elif init_from == 'teacher':
    student = new_student()
else:
    T.fail(f"init_from='{init_from}' is not 'teacher' or 'resume'")
scratch = None
if stage == 'scratch' or scratch_state is not None:
    scratch = new_scratch()
    if scratch_state is not None:
        scratch.load_state_dict(T.clean_state_dict(scratch_state))
logger = T.JsonlLogger(os.path.join(out_dir, 'log.jsonl'), enabled=master)
stop = T.StopFlag()
if master:
    print(f"teacher {teacher}: {teacher_model.get_num_params() / 1e6:.2f}M parameters; replacing layers {layers} "
          f"({align_mode} align); stages {', '.join(f'{s} {stage_iters[s]} it' for s in STAGES)}; "
          f"{tokens_per_iter:,} tokens per iteration; device {dist.device}, {prec.dtype}")


def save(stage_name, it, optimizer, key):
    """ckpt.pt holds everything needed to continue mid-stage (master writes; every rank waits)."""
    global last_saved
    if master:
        T.save_checkpoint({
            'model': student.state_dict(), 'model_args': dataclasses.asdict(student.config),
            'scratch_model': scratch.state_dict() if scratch is not None else None,
            'stage': stage_name, 'stage_iter': it, 'optimizer': optimizer.state_dict() if optimizer else None,
            'opt_key': key, 'history': history, 'throughput': throughput, 'config': config, 'kind': 'student',
        }, ckpt_path)
    last_saved = (stage_name, it)
    T.barrier(dist)


def log_steps(steps, stage_name, run_name, bar):
    """The finished steps' numbers (T.GuardedStep.results): logged; a non-finite one stops the run, or is noted and
    skipped with skip_nonfinite. Returns the last step's loss (None when there was none)."""
    lossf = None
    for info, lossf, nonfinite in steps:
        if nonfinite:
            where = f"in stage {stage_name} at iteration {info['iter'] - 1}"  # 'iter' counts it done, as the log does
            if not skip_nonfinite:
                bar.close()
                kept = f"the last good checkpoint {ckpt_path} ({last_saved}) is kept" if last_saved else "no checkpoint yet"
                T.fail(f"non-finite loss {where}: stopping; {kept}. Lower the learning rate, or pass "
                       f"--skip_nonfinite=True to skip such steps")
            bar.write(f"non-finite loss {where}: step skipped (skip_nonfinite=True)")
        bar.update(lossf, info['lr'], info['rate'], info['mfu'])
        record = dict(run=run_name, stage=stage_name, iter=info['iter'], loss=lossf, lr=info['lr'],
                      tokens_per_sec=round(info['rate']))
        if info['layer_err']:
            record['layer_rel_err'] = {str(j): round(e, 5) for j, e in info['layer_err'].items()}
        logger.log(**record)
        throughput[stage_name] = round(info['rate'])
    return lossf


@torch.no_grad()
def evaluate(model):
    return T.estimate_loss(model, data, eval_iters, prec.ctx, dist, splits=('val',))['val']


def allreduce_grads(params):
    """Average gradients over ranks (the align stage trains a few modules directly, without DDP)."""
    if dist.ddp:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)


def layer_inputs(X, stream_model, upto):
    """(j, ln_1 output of block j) for j = 0 .. upto, on stream_model's residual stream of batch X."""
    with torch.no_grad():
        x = stream_model.embed(X)
    for j, block in enumerate(stream_model.transformer.h[:upto + 1]):
        with torch.no_grad():
            inp = block.ln_1(x)
        yield j, inp
        if j < upto:
            with torch.no_grad():
                x = block(x)


@torch.no_grad()
def match_scales(fresh_layers, stream_model, X):
    """Rescale each fresh Hyena layer's out_proj rows so that on batch X every output channel c is the
    least-squares multiple of the attention's: W[c] *= <y_c, t_c - b_c> / <y_c, y_c>, with y = W z the
    operator's output before its bias b and t the attention output. An operator seeded from q, k, v computes
    q * (h * (k * v)), products whose scale has nothing to do with softmax attention's (relative errors of
    3-10 on GPT-2 shapes); per channel, the least-squares scale is no worse than 1 (the seed) or 0 (b alone),
    so align starts from below both. Sums are reduced over ranks: every rank gets the same scales."""
    student.eval()  # no dropout: the same scales after a resume (the phase sets train mode again)
    for j, inp in layer_inputs(X, stream_model, max(fresh_layers)):
        if j not in fresh_layers:
            continue
        op = student.transformer.h[j].mixer
        bias = op.out_proj.bias.float() if op.out_proj.bias is not None else 0.0
        y = op(inp).float() - bias
        target = teacher_model.transformer.h[j].mixer(inp).float() - bias
        sums = torch.stack([(y * target).sum((0, 1)), (y * y).sum((0, 1))])
        if dist.ddp:
            torch.distributed.all_reduce(sums)
        scale = torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(1e-30), torch.ones_like(sums[0]))
        op.out_proj.weight.mul_(scale.unsqueeze(1).to(op.out_proj.weight.dtype))


def align_loss(X, train_layers, stream_model):
    """Relative MSE between each trained layer's Hyena output and the teacher's attention output on the
    same input; the inputs come from stream_model's residual stream (student: progressive, teacher: parallel)."""
    losses = {}
    for j, inp in layer_inputs(X, stream_model, max(train_layers)):
        if j in train_layers:
            with torch.no_grad():
                target = teacher_model.transformer.h[j].mixer(inp).float()
            pred = student.transformer.h[j].mixer(inp).float()
            losses[j] = (pred - target).pow(2).mean() / target.pow(2).mean()
    return losses


def write_report():
    """report.json, report.md (the comparison table and the curves) and report.png (val loss against
    tokens for distilled and scratch students, the teacher as a line) in out_dir."""
    def last(run):
        vals = [h for h in history if h['run'] == run]
        return vals[-1] if vals else None

    student_tokens = (align_iters + kd_iters) * tokens_per_iter
    rows = [dict(model=f"teacher ({teacher})", params=teacher_model.get_num_params(), tokens=teacher_tokens,
                 val_loss=teacher_val, tokens_per_sec=None)]
    for run, name, stage_name in (('distilled', 'distilled student', 'kd'), ('scratch', 'scratch student', 'scratch')):
        final = last(run)
        if final is not None:
            model = student if run == 'distilled' else scratch
            mixers = 'all layers' if len(layers) == model.config.n_layer else f"layers {layers}"
            rows.append(dict(model=f"{name} ({mixers} Hyena)", params=model.get_num_params(),
                             tokens=final['tokens'] if run == 'scratch' else student_tokens,
                             val_loss=final['val_loss'], tokens_per_sec=throughput.get(stage_name)))
    for r in rows:
        r['val_ppl'] = math.exp(r['val_loss'])
    report = dict(config=config, teacher_val_loss=teacher_val, rows=rows, curves=history)
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
        json.dump(T.strict_json(report), f, indent=1)
    fmt = lambda v, spec: 'n/a' if v is None else format(v, spec)
    lines = [f"# Scavenging Hyena: distilled vs scratch ({dataset})", "",
             "| model | parameters | tokens trained | val loss | val ppl | train tokens/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.2f}M | {fmt(r['tokens'], ',')} | {r['val_loss']:.4f} | "
              f"{r['val_ppl']:.2f} | {fmt(r['tokens_per_sec'], ',')} |" for r in rows]
    lines += ["", "Val loss against tokens (the student's budget counts align and kd tokens):", "",
              "| run | stage | tokens | val loss |", "|---|---|---|---|"]
    lines += [f"| {h['run']} | {h['stage']} | {h['tokens']:,} | {h['val_loss']:.4f} |" for h in history]
    with open(os.path.join(out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: report.png skipped (pip install matplotlib)")
        return '\n'.join(lines[:len(rows) + 4])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in ('distilled', 'scratch'):
        pts = [(h['tokens'], h['val_loss']) for h in history if h['run'] == run]
        if pts:
            ax.plot(*zip(*pts), marker='o', ms=3, label=f"{run} student")
    ax.axhline(teacher_val, color='k', ls='--', label='teacher')
    ax.set_xlabel('tokens trained (student)')
    ax.set_ylabel('val loss')
    ax.set_title(f'Hyena student, distilled vs from scratch ({dataset})')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'report.png'), dpi=120)
    plt.close(fig)
    return '\n'.join(lines[:len(rows) + 4])


def phases():
    """(stage, phase_start, phase_iters, train_layers) for every phase in order: progressive align has one
    phase per layer, every other stage one phase."""
    for s in STAGES:
        if s == 'align' and align_mode == 'progressive':
            per = max(1, align_iters // len(layers))
            for n, i in enumerate(layers):
                yield s, n * per, per if n < len(layers) - 1 else align_iters - n * per, [i]
        else:
            yield s, 0, stage_iters[s], layers


teacher_val = evaluate(teacher_model)
if master:
    print(f"teacher val loss {teacher_val:.4f} (ppl {math.exp(teacher_val):.2f})")
teacher_fwd, loss_fn = teacher_model, T.kd_loss  # compiled versions replace them in the kd stage
peak = peak_flops(dist.device)

for stage_name, phase_start, phase_iters, train_layers in phases():
    phase_end = phase_start + phase_iters
    done = stage_rank(stage_name) < stage_rank(stage) or (stage_name == stage and stage_it >= phase_end)
    if done or phase_iters <= 0:
        continue
    it = max(stage_it, phase_start) if stage_name == stage else phase_start
    key = f"{stage_name}:{train_layers[0]}" if stage_name == 'align' and align_mode == 'progressive' else stage_name

    # what trains in this phase, with which loss
    fresh = [i for i in (train_layers if stage_name == 'align' else layers if stage_name == 'kd' else [])
             if i not in student.config.hyena_layers]
    for i in fresh:
        replace_with_hyena(student, i)
    # where a replaced layer's inputs come from: the student's own stream (progressive align) or the teacher's
    stream_model = student if stage_name == 'align' and align_mode == 'progressive' else teacher_model
    if fresh and match_output_scale:  # on the phase's first batch (the same one after a resume)
        with prec.ctx:
            first_batch = data.get_batch('train', (batch_offset[stage_name] + phase_start) * accum)[0]
            match_scales(fresh, stream_model, first_batch)
    if stage_name == 'align':
        student.requires_grad_(False)
        for i in train_layers:
            student.transformer.h[i].mixer.requires_grad_(True)
        raw, lr_max = student, align_lr
    elif stage_name == 'kd':
        student.requires_grad_(not kd_freeze_copied)
        for i in layers:
            student.transformer.h[i].mixer.requires_grad_(True)
        raw, lr_max = student, kd_lr
    else:
        if scratch is None:
            scratch = new_scratch()
        raw, lr_max = scratch, scratch_lr
    raw.train()
    optimizer = raw.configure_optimizers(weight_decay, lr_max, (beta1, beta2), device_type, filter_lr_scale)
    if opt_state is not None and opt_key == key and stage_name == stage:
        try:
            optimizer.load_state_dict(opt_state)
        except ValueError:  # other parameters train than when it was saved
            T.fail(f"{ckpt_path}'s optimizer state does not fit the parameters this run trains in stage {stage_name} "
                   f"(was kd_freeze_copied changed?): resume with the settings the run started with")
    opt_state = None
    alpha = kd_alpha if stage_name == 'kd' else 0.0
    run_name = 'scratch' if stage_name == 'scratch' else 'distilled'  # the report's two curves
    if stage_name != 'align':
        shared_taps = T.SharedTaps(raw, block_size, accum)  # the filters: once per iteration
        run_model, ok = T.wrap_model(raw, dist, compile, data.get_batch('train', 0), prec.ctx, compile_mode,
                                     shared_taps)
        if ok and alpha > 0:
            teacher_fwd = torch.compile(teacher_model, dynamic=False, mode=compile_mode)
            loss_fn = torch.compile(T.kd_loss, dynamic=False, mode=compile_mode)
    graphs = stage_name != 'align' and T.cuda_graphs(compile_mode, ok, dist.device)
    T.clear_grads(optimizer, graphs)
    params = [p for p in raw.parameters() if p.requires_grad]
    bar = T.Progress(phase_end, initial=it, enabled=master, desc=key)
    guard = T.GuardedStep(optimizer, prec.scaler, dist, stop)
    X, Y = data.get_batch('train', (batch_offset[stage_name] + it) * accum)
    t0, rate = time.time(), None

    while it < phase_end:
        if stop.requested(dist):
            log_steps(guard.results(wait=True), stage_name, run_name, bar)  # the last step's numbers first
            if last_saved != (stage_name, it):
                save(stage_name, it, optimizer, key)
            bar.close()
            print(f"stopped by {stop.name} in stage {stage_name} at iteration {it}; resume with --init_from=resume",
                  flush=True)
            T.finish(dist, stop.exit_code)
        # warmup over at most half the phase: a progressive align phase (one layer) can be as short as the warmup
        lr = T.get_lr(it - phase_start, lr_max, min(warmup_iters, phase_iters // 2), phase_iters, lr_max * min_lr_ratio)
        T.set_lr(optimizer, lr)
        index = batch_offset[stage_name] + it
        T.seed_step(seed, dist.rank, index)
        loss_sum, layer_err = torch.zeros((), device=dist.device), {}
        if stage_name != 'align':
            shared_taps.begin()
        for micro in range(accum):
            with prec.ctx:
                if stage_name == 'align':
                    errs = align_loss(X, train_layers, stream_model)
                    loss = sum(errs.values()) / accum
                    for j, e in errs.items():
                        layer_err[j] = layer_err.get(j, 0.0) + e.item() / accum
                else:
                    if dist.ddp:  # sync only on the last micro-step, set before its forward pass
                        run_model.require_backward_grad_sync = (micro == accum - 1)
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    logits, ce = run_model(X, Y, taps=shared_taps.taps(micro))
                    if alpha > 0:
                        with torch.no_grad():
                            teacher_logits, _ = teacher_fwd(X, full_logits=True)
                        loss = loss_fn(logits, teacher_logits, ce, alpha, kd_temperature) / accum
                    else:
                        loss = ce / accum
            # the next micro-step's batch (the next iteration's first one after the last) while the GPU works
            X, Y = data.get_batch('train', index * accum + micro + 1)
            prec.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if stage_name == 'align':
            allreduce_grads(params)
        grad_norm = None
        if grad_clip != 0.0:
            prec.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)

        it += 1
        t1 = time.time()  # timing: from one step's launch to the next, the GPU's pace in a steady run
        dt, t0 = t1 - t0, t1
        rate = tokens_per_iter / dt if rate is None else 0.9 * rate + 0.1 * tokens_per_iter / dt
        mfu = None
        if stage_name != 'align' and peak:  # student forward + backward, plus the teacher's forward in kd
            flops = raw.flops_per_token(block_size) + (teacher_model.flops_per_token(block_size) / 3 if alpha else 0)
            mfu = flops * batch_size * accum * block_size / dt / peak
        # the step, unless the loss or gradient is NaN/inf; its numbers arrive a step later where the GPU gates it
        guard.step(loss_sum, None if prec.scaler.is_enabled() else grad_norm, iter=it, lr=lr, rate=rate, mfu=mfu,
                   layer_err=layer_err)
        T.clear_grads(optimizer, graphs)
        evaluating = it % eval_interval == 0 or it == phase_end
        lossf = log_steps(guard.results(wait=evaluating), stage_name, run_name, bar)

        if evaluating:
            val = evaluate(raw)
            tokens = (batch_offset[stage_name] + it) * tokens_per_iter
            history.append(dict(run=run_name, stage=stage_name, tokens=tokens, val_loss=val))
            errs = ''.join(f", layer {j} rel. err {e:.4f}" for j, e in layer_err.items())
            bar.write(f"{key} it {it}: loss {lossf:.4f}{errs}; val loss {val:.4f} (ppl {math.exp(val):.2f}), "
                      f"teacher {teacher_val:.4f} (ppl {math.exp(teacher_val):.2f})")
            logger.log(run=run_name, stage=stage_name, iter=it, tokens=tokens, val_loss=val,
                       teacher_val_loss=teacher_val)
            save(stage_name, it, optimizer, key)
            t0 = time.time()
    bar.close()
    stage, stage_it = stage_name, it

if last_saved != ('done', 0):
    save('done', 0, None, None)
stop.restore()
if master:
    print(write_report())
    print(f"report: {os.path.join(out_dir, 'report.md')}, student checkpoint: {ckpt_path}")
T.finish(dist)
