"""Issue 7: runs survive kills and bad input, and nothing is lost.

Faults are injected into real subprocess runs by a wrapper that monkeypatches before running the script
(conftest.run_patched): the scripts carry no test hooks."""
import gc
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fftconv_triton
import hyena
import training as T
from conftest import (REFERENCE, REPO, TINY_VOCAB, assert_one_line_error, losses, patched_command, popen_patched,
                      read_log, run_patched, run_script, train_args, _env)

TORCHRUN_2 = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']  # 2 CPU ranks

SLOW_BATCHES = """
import time, training
_get_batch = training.TokenData.get_batch
def get_batch(self, *args, **kwargs):
    time.sleep(0.02)
    return _get_batch(self, *args, **kwargs)
training.TokenData.get_batch = get_batch
"""

NAN_AT_ITER_15 = """
import model
_forward = model.GPT.forward
calls = [0]
def forward(self, idx, targets=None, **kwargs):
    logits, loss = _forward(self, idx, targets, **kwargs)
    if self.training and targets is not None:
        calls[0] += 1
        if calls[0] == 16:  # one micro-step per iteration: the 16th training forward is iteration 15
            loss = loss * float('nan')
    return logits, loss
model.GPT.forward = forward
"""

FUSED_ADAMW = """
import torch
_AdamW = torch.optim.AdamW
def AdamW(params, **kwargs):  # fused as on CUDA (it runs on the CPU too): the step is gated on the device
    return _AdamW(params, **dict(kwargs, fused=True))
torch.optim.AdamW = AdamW
"""
OPTIMIZER_PATCHES = {'foreach': '', 'fused': FUSED_ADAMW}  # the host skips the step / the device does

CRASH_DURING_SECOND_SAVE = """
import io, os, torch
_save = torch.save
saves = [0]
def save(obj, f, *args, **kwargs):
    saves[0] += 1
    if saves[0] < 2:
        return _save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written, then the process dies
    f.flush()
    os._exit(137)
torch.save = save
"""


SIGTERM_RANK_1_AT_ITER_20 = """
import os, signal, training
_get_batch = training.TokenData.get_batch
def get_batch(self, split, index, *args, **kwargs):
    if split == 'train' and self.rank == 1 and index == 20:  # one micro-step per rank: iteration 20's batch
        os.kill(os.getpid(), signal.SIGTERM)
    return _get_batch(self, split, index, *args, **kwargs)
training.TokenData.get_batch = get_batch
"""


# ---- 1. preemption ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])  # a scheduler's preemption, Ctrl-C
def test_a_stop_signal_saves_a_checkpoint_exits_128_plus_it_and_resume_matches_the_uninterrupted_run(
        signum, tiny_data, reference_run, tmp_path):
    proc = popen_patched(tmp_path, SLOW_BATCHES, 'train_teacher.py', *train_args(tiny_data, tmp_path, **REFERENCE))
    log = os.path.join(tmp_path, 'log.jsonl')
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until training is under way
        if os.path.exists(log) and any(r.get('iter', 0) >= 12 and 'loss' in r for r in read_log(tmp_path)):
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert 'Traceback' not in stderr and signal.Signals(signum).name in stdout + stderr
    stopped_at = T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num']
    assert 12 < stopped_at < REFERENCE['max_iters']
    resumed = run_script('train_teacher.py', *train_args(tiny_data, tmp_path, **REFERENCE), '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path) == losses(reference_run)


@pytest.mark.parametrize('optimizer', OPTIMIZER_PATCHES)
@pytest.mark.parametrize('script', ['train_teacher.py', 'distill.py'])
def test_sigterm_on_one_ddp_rank_stops_every_rank_at_the_same_iteration_with_one_checkpoint(script, optimizer,
                                                                                           tiny_data, reference_run,
                                                                                           tmp_path):
    # only rank 1 gets the signal (while it fetches the batch of iteration 20, one micro-step per rank); rank 0 must
    # learn of it and stop at the same iteration, or one rank would wait forever in the next collective. With the
    # fused optimizer the ranks agree through the verdicts read a step late
    if script == 'train_teacher.py':
        args = train_args(tiny_data, tmp_path, **dict(REFERENCE, eval_interval=100))
    else:  # the reference run's model as the teacher, kd only
        args = [f'--data_dir={tiny_data}', f"--teacher={os.path.join(reference_run, 'ckpt.pt')}",
                f'--out_dir={tmp_path}', '--device=cpu', '--compile=False', '--batch_size=8',
                '--gradient_accumulation_steps=2', '--align_iters=0', '--kd_iters=40', '--scratch_iters=0',
                '--eval_interval=100', '--eval_iters=2']
    cmd = patched_command(tmp_path, SIGTERM_RANK_1_AT_ITER_20 + OPTIMIZER_PATCHES[optimizer], script, *args)
    proc = subprocess.run(TORCHRUN_2 + cmd[1:], capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    # the workers exit with 143, which torchrun reports as a failure (with a traceback of its own); none of them
    # raised. Only rank 0 writes checkpoints: its stop at the signal's iteration is the agreement
    assert proc.returncode != 0 and 'exitcode  : 143' in proc.stderr, proc.stderr
    assert f'{script}", line' not in proc.stderr
    ckpt = T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    stopped_at = ckpt['iter_num'] if script == 'train_teacher.py' else ckpt['stage_iter']
    assert 19 <= stopped_at <= 22
    assert max(r['iter'] for r in read_log(tmp_path) if 'loss' in r) == stopped_at - (script == 'train_teacher.py')
    assert 'by SIGTERM' in proc.stdout and f'{stopped_at}; resume with --init_from=resume' in proc.stdout


FINISH_UNDER_DDP = """
import sys, torch, training as T
torch.distributed.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)
dist = T.DistInfo(True, 0, 0, 1, 'cpu', True, 0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.ones(2, 4)).sum().backward()  # the reducer's all-reduce ran on gloo's workers
print('saved', end='')  # unflushed
T.finish(dist, 143)
print('unreachable')
"""


def test_finish_under_ddp_leaves_with_the_exit_code_and_flushed_output(tmp_path):
    proc = subprocess.run([sys.executable, '-c', FINISH_UNDER_DDP, str(tmp_path / 'rendezvous')], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 143 and proc.stdout == 'saved', proc.stderr
    assert 'terminate called' not in proc.stderr


def test_finish_without_ddp_returns_or_raises_the_exit_code():
    dist = T.DistInfo(False, 0, 0, 1, 'cpu', True, 0)
    assert T.finish(dist) is None
    with pytest.raises(SystemExit) as stopped:
        T.finish(dist, 143)
    assert stopped.value.code == 143


def one_parameter_adamw(fused):
    p = torch.nn.Parameter(torch.ones(3))
    return p, torch.optim.AdamW([p], lr=0.1, fused=fused)


NO_SCALER = torch.amp.GradScaler('cuda', enabled=False)  # what setup_precision gives for bf16, fp32 and the CPU


def test_under_ddp_a_step_has_one_collective_which_also_agrees_on_stop_signals(monkeypatch, tmp_path):
    # the step's non-finite check carries the stop flag, so stop.requested() makes no collective (no host sync)
    # of its own but the first; a signal one rank got is every rank's after the next check
    reduced = []
    all_reduce = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, 'all_reduce', lambda t, *a, **k: (reduced.append(t.numel()),
                                                                             all_reduce(t, *a, **k))[1])
    torch.distributed.init_process_group('gloo', init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    stop = T.StopFlag(signals=())
    try:
        dist = T.DistInfo(True, 0, 0, 1, 'cpu', True, 0)
        p, optimizer = one_parameter_adamw(fused=False)
        guard = T.GuardedStep(optimizer, NO_SCALER, dist, stop)
        assert stop.requested(dist) is False
        for _ in range(3):
            p.grad = torch.ones(3)
            guard.step(torch.tensor(1.0))
            assert [nonfinite for _, _, nonfinite in guard.results()] == [False]
            assert stop.requested(dist) is False
        stop.signum = signal.SIGTERM  # what the handler does
        guard.step(torch.tensor(1.0))
        guard.results()
        assert stop.requested(dist) is True
        assert len(reduced) == 1 + 4
    finally:
        time.sleep(0.1)  # gloo's workers drop their last work before the group goes (as in the bucket-view test)
        torch.distributed.destroy_process_group()


def test_a_fused_optimizer_skips_nonfinite_steps_on_the_device_and_the_host_reads_them_a_step_late():
    p, optimizer = one_parameter_adamw(fused=True)  # fused AdamW also runs on the CPU
    guard = T.GuardedStep(optimizer, NO_SCALER)
    losses_and_norms = [(1.0, 1.0), (float('nan'), 1.0), (2.0, float('inf')), (3.0, 1.0)]
    moved, reported = [], []
    for i, (loss, norm) in enumerate(losses_and_norms):
        before = p.detach().clone()
        p.grad = torch.ones(3)
        guard.step(torch.tensor(loss), torch.tensor(norm), iter=i)
        moved.append(not torch.equal(p, before))
        reported.append(guard.results())
    reported.append(guard.results(wait=True))
    assert moved == [True, False, False, True]
    assert optimizer.state[p]['step'] == 2  # the skipped steps did not count
    assert [[(info['iter'], nonfinite) for info, _, nonfinite in steps] for steps in reported] == \
        [[], [(0, False)], [(1, True)], [(2, True)], [(3, False)]]
    assert reported[1][0][1] == 1.0 and math.isnan(reported[2][0][1])


# ---- 2. atomic checkpoints ----------------------------------------------------------------------------------

def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path):
    proc = run_patched(tmp_path, CRASH_DURING_SECOND_SAVE, 'train_teacher.py',
                       *train_args(tiny_data, tmp_path, max_iters=30, eval_interval=10))
    assert proc.returncode == 137
    ckpt = T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))  # intact: the first save, at iter 10
    assert ckpt['iter_num'] == 10


def test_save_checkpoint_failing_midway_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = os.path.join(tmp_path, 'ckpt.pt')
    T.save_checkpoint({'model': {}, 'model_args': {}, 'iter_num': 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a zip')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        T.save_checkpoint({'model': {}, 'model_args': {}, 'iter_num': 2}, path)
    assert T.load_checkpoint(path)['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_truncated_checkpoint_is_a_one_line_error_naming_the_file(tiny_data, reference_run, tmp_path):
    data = open(os.path.join(reference_run, 'ckpt.pt'), 'rb').read()
    with open(os.path.join(tmp_path, 'ckpt.pt'), 'wb') as f:
        f.write(data[: len(data) // 2])
    proc = run_script('train_teacher.py', *train_args(tiny_data, tmp_path, max_iters=5), '--init_from=resume')
    assert_one_line_error(proc, f"checkpoint {tmp_path}/ckpt.pt is unreadable")


def test_missing_corrupt_or_foreign_checkpoint_files_are_one_line_errors(tmp_path):
    garbage = os.path.join(tmp_path, 'garbage.pt')
    with open(garbage, 'wb') as f:
        f.write(os.urandom(1000))
    with pytest.raises(SystemExit, match=f"checkpoint {garbage} is unreadable"):
        T.load_checkpoint(garbage)
    with pytest.raises(SystemExit, match=f"checkpoint {tmp_path}/nope.pt not found"):
        T.load_checkpoint(os.path.join(tmp_path, 'nope.pt'))
    foreign = os.path.join(tmp_path, 'foreign.pt')
    torch.save({'weights': torch.zeros(2)}, foreign)
    with pytest.raises(SystemExit, match=f"checkpoint {foreign} is not a checkpoint of this repo"):
        T.load_checkpoint(foreign)


# ---- 3. non-finite losses -----------------------------------------------------------------------------------

@pytest.mark.parametrize('optimizer', OPTIMIZER_PATCHES)
def test_nonfinite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(optimizer, tiny_data, tmp_path):
    proc = run_patched(tmp_path, NAN_AT_ITER_15 + OPTIMIZER_PATCHES[optimizer], 'train_teacher.py',
                       *train_args(tiny_data, tmp_path, max_iters=30, eval_interval=10))
    assert_one_line_error(proc, 'non-finite loss (nan) at iter 15', 'last good checkpoint', '(iter 10) is kept')
    assert T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num'] == 10


@pytest.mark.parametrize('optimizer', OPTIMIZER_PATCHES)
def test_skip_nonfinite_skips_the_step_and_continues(optimizer, tiny_data, tmp_path):
    proc = run_patched(tmp_path, NAN_AT_ITER_15 + OPTIMIZER_PATCHES[optimizer], 'train_teacher.py',
                       *train_args(tiny_data, tmp_path, max_iters=30, eval_interval=10), '--skip_nonfinite=True')
    assert proc.returncode == 0, proc.stderr
    log = read_log(tmp_path)
    assert [r['iter'] for r in log if r.get('skipped')] == [15]
    assert np.isfinite(log[-1]['val_loss'])
    assert T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num'] == 30


def test_distill_stops_at_a_nonfinite_loss_the_device_skipped(tiny_data, reference_run, tmp_path):
    proc = run_patched(tmp_path, NAN_AT_ITER_15 + FUSED_ADAMW, 'distill.py', f'--data_dir={tiny_data}',
                       f"--teacher={os.path.join(reference_run, 'ckpt.pt')}", f'--out_dir={tmp_path}', '--device=cpu',
                       '--compile=False', '--batch_size=4', '--align_iters=0', '--kd_iters=30', '--scratch_iters=0',
                       '--eval_interval=10', '--eval_iters=1')
    assert_one_line_error(proc, 'non-finite loss in stage kd at iteration 15', 'last good checkpoint', "('kd', 10)")
    ckpt = T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    assert ckpt['stage_iter'] == 10
    assert max(r['iter'] for r in read_log(tmp_path) if 'loss' in r) == 15  # every step before it was logged


# ---- 4. input validation: one line, no traceback ------------------------------------------------------------

def test_missing_dataset_names_the_prepare_script(tmp_path):
    proc = run_script('train_teacher.py', *train_args(tmp_path / 'nowhere', tmp_path / 'out'), '--dataset=nosuch')
    assert_one_line_error(proc, "dataset 'nosuch' not found", 'python data/nosuch/prepare.py',
                          'data/textfiles/prepare.py')


@pytest.mark.parametrize('script,args,fix', [
    ('distill.py', ['--teacher={tmp}/ckpt.pt', '--out_dir={tmp}/out'], 'train a teacher first with train_teacher.py'),
    ('train_teacher.py', ['--init_from=resume', '--out_dir={tmp}'], 'nothing to resume in --out_dir'),
    ('sample.py', ['--init_from={tmp}/ckpt.pt'], 'pass --init_from='),
    ('recurrent.py', ['--ckpt={tmp}/ckpt.pt'], "pass --ckpt=<a distilled student's ckpt.pt>")])
def test_missing_checkpoint_is_a_one_line_error_saying_what_to_pass(script, args, fix, tmp_path):
    proc = run_script(script, *(arg.format(tmp=tmp_path) for arg in args))
    assert_one_line_error(proc, f'checkpoint {tmp_path}/ckpt.pt not found', fix)


@pytest.mark.parametrize('script,override,message', [
    ('train_teacher.py', '--batch_size=0', 'batch_size=0 is out of range: it must be > 0'),
    ('train_teacher.py', '--eval_iters=0', 'eval_iters=0 is out of range: it must be > 0'),
    ('train_teacher.py', '--dropout=1.5', 'dropout=1.5 is out of range: it must be in [0, 1)'),
    ('train_teacher.py', '--n_head=5', 'n_embd=768 is not divisible by n_head=5'),
    ('train_teacher.py', '--hyena_emb_dim=32', 'hyena_emb_dim=32 must be odd and >= 3'),
    ('distill.py', '--kd_alpha=1.5', 'kd_alpha=1.5 is out of range: it must be in [0, 1]'),
    ('distill.py', '--scratch_iters=-2', 'scratch_iters=-2 is out of range: it must be >= -1'),
    ('train_teacher.py', '--seed=-1', 'seed=-1 is out of range: it must be >= 0'),
    ('sample.py', '--temperature=-1', 'temperature=-1.0 is out of range: it must be >= 0'),
    ('recurrent.py', '--d_state=0', 'd_state=0 is out of range: it must be > 0')])
def test_out_of_range_setting_is_a_one_line_error_before_anything_runs(script, override, message, tmp_path):
    out = [] if script == 'recurrent.py' else [f'--out_dir={tmp_path}']
    assert_one_line_error(run_script(script, override, *out), message)


def test_out_dir_that_is_a_file_is_a_one_line_error(tiny_data, tmp_path):
    (tmp_path / 'taken').write_text('')
    proc = run_script('train_teacher.py', *train_args(tiny_data, tmp_path / 'taken'))
    assert_one_line_error(proc, f"out_dir='{tmp_path / 'taken'}' cannot be made a folder", 'pass another --out_dir')


def test_resuming_a_students_checkpoint_in_train_teacher_is_a_one_line_error(tmp_path):
    torch.save({'model': {}, 'model_args': {}, 'stage': 'kd', 'stage_iter': 3}, tmp_path / 'ckpt.pt')
    proc = run_script('train_teacher.py', f'--out_dir={tmp_path}', '--init_from=resume')
    assert_one_line_error(proc, 'is not a train_teacher.py checkpoint', 'distill.py --init_from=resume')


def test_a_prompt_file_that_is_not_utf8_is_a_one_line_error(reference_run, tmp_path):
    (tmp_path / 'prompt.txt').write_bytes(b'\xff\xfedef ')
    proc = run_script('sample.py', f"--init_from={os.path.join(reference_run, 'ckpt.pt')}",
                      f"--start=FILE:{tmp_path / 'prompt.txt'}")
    assert_one_line_error(proc, 'the prompt file is not UTF-8 text')


def test_nonexistent_device_is_a_one_line_error(tiny_data, tmp_path):
    proc = run_script('train_teacher.py', *train_args(tiny_data, tmp_path), '--device=cuda:7')
    assert_one_line_error(proc, "device 'cuda:7' does not exist")


def test_hyena_layers_out_of_range_is_a_one_line_error(tiny_data, tmp_path):
    proc = run_script('train_teacher.py', *train_args(tiny_data, tmp_path), '--hyena_layers=[0,5]')
    assert_one_line_error(proc, 'hyena_layers: layer 5 is out of range for n_layer=2')


def test_unknown_config_key_is_a_one_line_error_listing_valid_keys(tmp_path):
    proc = run_script('train_teacher.py', '--learning_rte=1e-3')
    assert_one_line_error(proc, "unknown key 'learning_rte'", 'learning_rate')


@pytest.mark.parametrize('script', ['train_teacher.py', 'distill.py'])
@pytest.mark.parametrize('override,message', [('--compile_mode=fastest', "compile_mode='fastest' is not one of"),
                                              ('--fftconv_impl=cufft', "fftconv_impl='cufft' is not"),
                                              ('--triton_dot=fp8', "triton_dot='fp8' is not"),
                                              ('--short_conv=fast', "short_conv='fast' is not")])
def test_unknown_speed_setting_is_a_one_line_error(script, override, message):
    assert_one_line_error(run_script(script, override), message)


def test_fftconv_settings_reach_hyena(monkeypatch):
    monkeypatch.setattr(hyena, 'FFTCONV_IMPL', hyena.FFTCONV_IMPL)
    monkeypatch.setattr(fftconv_triton, 'TRITON_DOT', fftconv_triton.TRITON_DOT)
    monkeypatch.setattr(hyena, 'SHORT_CONV', hyena.SHORT_CONV)
    T.speed_settings('default', 'triton', 'bf16', 'fused')
    assert (hyena.FFTCONV_IMPL, fftconv_triton.TRITON_DOT, hyena.SHORT_CONV) == ('triton', 'bf16', 'fused')


def test_under_cuda_graphs_gradients_stay_allocated_and_accumulate_in_place():
    # a .grad adopted from a CUDA graph's output buffer would be overwritten by the next micro-step's replay
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    T.clear_grads(optimizer, graphs=True)
    buffers = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in buffers)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    model(x).sum().backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers))
    assert torch.allclose(model.bias.grad, torch.full((2,), 8.0))  # 4 rows, twice
    T.clear_grads(optimizer, graphs=True)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), buffers))
    T.clear_grads(optimizer, graphs=False)
    assert all(p.grad is None for p in model.parameters())
    assert not T.cuda_graphs('reduce-overhead', True, 'cpu') and not T.cuda_graphs('reduce-overhead', False, 'cuda')
    assert T.cuda_graphs('reduce-overhead', True, 'cuda:0') and not T.cuda_graphs('default', True, 'cuda')


def make_bin(folder, train, val=None):
    os.makedirs(folder, exist_ok=True)
    for split, arr in (('train', train), ('val', train if val is None else val)):
        np.asarray(arr, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    return str(folder)


def test_ids_beyond_the_vocabulary_are_an_error(tmp_path):
    ids = np.arange(1000) % TINY_VOCAB
    ids[500] = 50256
    folder = make_bin(tmp_path, ids)
    with pytest.raises(SystemExit, match=r"train.bin holds token id 50256 >= vocab_size 64"):
        T.TokenData(folder, block_size=32, batch_size=2, vocab_size=TINY_VOCAB)


def test_odd_byte_count_is_an_error(tmp_path):
    folder = make_bin(tmp_path, np.arange(1000) % TINY_VOCAB)
    with open(os.path.join(folder, 'val.bin'), 'ab') as f:
        f.write(b'\x00')
    with pytest.raises(SystemExit, match=r"val.bin has 2001 bytes, an odd number"):
        T.TokenData(folder, block_size=32, batch_size=2, vocab_size=TINY_VOCAB)


def test_dataset_shorter_than_a_block_is_an_error(tmp_path):
    folder = make_bin(tmp_path, np.arange(1000) % TINY_VOCAB, val=np.arange(20))
    with pytest.raises(SystemExit, match=r"val.bin holds 20 tokens, fewer than block_size \+ 1 = 33"):
        T.TokenData(folder, block_size=32, batch_size=2, vocab_size=TINY_VOCAB)


def test_accumulation_not_divisible_by_world_size_is_an_error():
    assert T.per_rank(40, 8) == 5
    with pytest.raises(SystemExit, match='gradient_accumulation_steps=6 is not divisible by the world size 4'):
        T.per_rank(6, 4)
    with pytest.raises(SystemExit, match='batch_size=2 is not divisible'):
        T.per_rank(2, 4, name='batch_size')


def test_device_names_are_validated():
    assert T.resolve_device('cpu') == 'cpu'
    with pytest.raises(SystemExit, match="device 'gpu' is not a device name"):
        T.resolve_device('gpu')


# ---- 5. DDP: one writer, one resume point -------------------------------------------------------------------

def test_ddp_ranks_resume_from_the_same_checkpoint_and_only_rank_0_writes(tiny_data, reference_run, tmp_path):
    shutil.copy(os.path.join(reference_run, 'ckpt.pt'), tmp_path)  # a single-process run's checkpoint, iter 40
    cmd = [*TORCHRUN_2, os.path.join(REPO, 'train_teacher.py'), '--init_from=resume',
           *train_args(tiny_data, tmp_path, **dict(REFERENCE, max_iters=46, lr_decay_iters=46, eval_interval=3))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'log.jsonl']  # no stray files from other ranks
    assert T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num'] == 46
    log = read_log(tmp_path)
    assert [r['iter'] for r in log if 'loss' in r] == list(range(40, 46))  # one writer: no duplicate records
    assert [r['iter'] for r in log if 'val_loss' in r] == [42, 45, 46]  # every rank resumed at iter 40


def test_compile_that_cannot_build_falls_back_to_eager_with_a_message(monkeypatch, capsys):
    def cannot_build(model, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError('InductorError: no working C compiler found')
        return call
    monkeypatch.setattr(torch, 'compile', cannot_build)
    model = torch.nn.Linear(4, 4)
    out, compiled = T.wrap_model(model, T.setup_distributed('cpu'), True, (torch.zeros(2, 4), None))
    assert out is model and compiled is False
    assert 'running eager' in capsys.readouterr().out


# torch's default, restored after the test by torch's own patch: monkeypatch's undo deletes a torch config entry,
# which later DDP constructions then fail to read
@torch._dynamo.config.patch(optimize_ddp=True)
def test_under_ddp_gradients_are_bucket_views_buffers_are_not_rebroadcast_and_the_model_is_one_graph(
        monkeypatch, tmp_path):
    # dynamo's DDP optimizer (a graph split at every gradient bucket) cost more than the overlap it buys on one node;
    # the models' buffers are constants, and a broadcast of them before every forward made each micro-step wait
    from torch.nn.parallel import DistributedDataParallel
    built_inside_ddp = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            built_inside_ddp.append(DistributedDataParallel._get_active_ddp_module() is not None)
            out = self.model(x)
            return out, out.square().mean()

    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: Compiled(model))
    torch.distributed.init_process_group('gloo', init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    out = None
    try:
        dist = T.DistInfo(True, 0, 0, 1, 'cpu', True, 0)
        model = torch.nn.Linear(4, 4)
        model.register_buffer('frequencies', torch.arange(4.0))
        out, compiled = T.wrap_model(model, dist, True, (torch.ones(2, 4), None))
        assert compiled and isinstance(out, DistributedDataParallel) and isinstance(out.module, Compiled)
        assert out.gradient_as_bucket_view and torch._dynamo.config.optimize_ddp is False
        assert not out.will_sync_module_buffers()
        assert built_inside_ddp == [True]  # the build step ran the whole DDP forward and backward
        assert model.weight.grad is None  # and left no gradients behind
    finally:
        del out
        destroy_gloo_group()


def destroy_gloo_group():
    """After the test dropped its DDP model: DDP's reducer holds the group, so it goes first, and gloo's worker
    threads get time to drop their last work before the group goes. The group's destructor joins them holding the
    GIL, and a worker that still needed the GIL to free a work's thread-local state hung the suite once (native
    stacks: the main thread in ~ProcessGroupGloo -> std::thread::join, the worker in gil_scoped_acquire under
    ~AsyncAllreduceWork)."""
    gc.collect()
    time.sleep(0.1)
    torch.distributed.destroy_process_group()


def test_under_ddp_the_compile_warmup_with_shared_taps_leaves_the_next_step_able_to_sync(monkeypatch, tmp_path):
    # the warm-up backward used to take the first micro-step's detached taps: the filter MLPs got no gradient in a
    # synchronizing backward, and DDP's reducer failed the next step ("Expected to have finished reduction")
    from model import GPT, GPTConfig
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: model)  # the warm-up, without inductor's build
    torch.distributed.init_process_group('gloo', init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    out = None
    try:
        dist = T.DistInfo(True, 0, 0, 1, 'cpu', True, 0)
        model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, hyena_layers=[0, 1]))
        x = torch.randint(0, 32, (2, 16))
        shared = T.SharedTaps(model, 16, accum=2)
        out, compiled = T.wrap_model(model, dist, True, (x, x), shared_taps=shared)
        assert compiled
        shared.begin()
        for micro in range(2):  # one training step as the loops run it
            out.require_backward_grad_sync = micro == 1
            out(x, x, taps=shared.taps(micro))[1].backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        del out
        destroy_gloo_group()
