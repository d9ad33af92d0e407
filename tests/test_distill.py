"""distill.py: align, kd and the scratch baseline on a tiny teacher and a toy corpus (CPU)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import training as T  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

VOCAB = 256  # GPT-2 ids below 256 are single characters, so sample.py can prompt the toy models


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A toy corpus (random 'words' of ids < VOCAB) and a teacher trained on it for a few steps."""
    root = tmp_path_factory.mktemp('distill')
    rng = np.random.default_rng(0)
    words = [rng.integers(0, VOCAB, size=rng.integers(2, 6)) for _ in range(40)]
    for split, n in (('train', 60_000), ('val', 6_000)):
        ids = np.concatenate([words[i] for i in rng.integers(0, 40, size=n // 3)])[:n]
        ids.astype(np.uint16).tofile(root / f'{split}.bin')
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    data = np.fromfile(root / 'train.bin', dtype=np.uint16).astype(np.int64)
    for _ in range(60):
        starts = rng.integers(0, len(data) - 33, size=16)
        batch = torch.from_numpy(np.stack([data[s:s + 33] for s in starts]))
        _, loss = teacher(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = root / 'teacher.pt'
    torch.save({'model': teacher.state_dict(), 'model_args': dataclasses.asdict(teacher.config),
                'tokens_seen': 60 * 16 * 32}, ckpt)
    return root, ckpt


def distill(setup, out_dir, *args, wait=True):
    root, teacher = setup
    cmd = [sys.executable, os.path.join(ROOT, 'distill.py'), f'--data_dir={root}', f'--teacher={teacher}',
           f'--out_dir={out_dir}', '--batch_size=8', '--compile=False', '--eval_iters=2', '--warmup_iters=2',
           '--dataset=toy', *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def log_records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_losses(records, stage):
    return [(r['iter'], r['loss']) for r in records if r.get('stage') == stage and 'loss' in r]


@pytest.fixture(scope='module')
def full_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp('full')
    distill(setup, out, '--align_iters=30', '--kd_iters=30', '--scratch_iters=-1', '--eval_interval=10',
            '--align_lr=3e-3', '--kd_lr=3e-3', '--scratch_lr=3e-3')
    return out


def test_align_relative_error_falls_for_each_layer(full_run):
    records = [r for r in log_records(full_run) if 'layer_rel_err' in r]
    for layer in ('0', '1'):
        errs = [r['layer_rel_err'][layer] for r in records if layer in r['layer_rel_err']]
        assert len(errs) == 15
        assert np.mean(errs[-3:]) < 0.8 * np.mean(errs[:3])


def test_kd_loss_falls(full_run):
    losses = [loss for _, loss in train_losses(log_records(full_run), 'kd')]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_report_compares_distilled_and_scratch_on_the_same_budget(full_run):
    with open(full_run / 'report.json') as f:
        report = json.load(f)
    teacher, distilled, scratch = report['rows']
    assert distilled['tokens'] == scratch['tokens'] == 60 * 8 * 32
    assert distilled['params'] == scratch['params']
    assert distilled['val_loss'] < scratch['val_loss']  # the paper's claim, even at this toy scale
    assert (full_run / 'report.md').read_text().count('|') > 20
    assert (full_run / 'report.png').exists()


def test_scratch_baseline_has_the_student_architecture(full_run):
    ckpt = torch.load(full_run / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['hyena_layers'] == [0, 1]
    assert ckpt['scratch_model'].keys() == ckpt['model'].keys()
    assert all(ckpt['scratch_model'][k].shape == v.shape for k, v in ckpt['model'].items())


def test_a_scratch_only_run_trains_the_hyena_student_not_the_teacher(setup, tmp_path):
    distill(setup, tmp_path, '--align_iters=0', '--kd_iters=0', '--scratch_iters=2')
    scratch = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['scratch_model']
    assert any('.mixer.in_proj.' in k for k in scratch) and not any('.mixer.c_attn.' in k for k in scratch)


def test_student_checkpoint_loads_in_sample(full_run):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--init_from={full_run / "ckpt.pt"}',
                             '--start=a', '--num_samples=1', '--max_new_tokens=8', '--device=cpu'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    sample = result.stdout.split('\n', 1)[1].split('---------------')[0]  # after the 'sampling from' line
    assert sample.startswith('a') and len(sample.strip()) > 1


def test_progressive_align_trains_one_layer_at_a_time(setup, tmp_path):
    """Layer 0's phase of a two-layer run equals a one-layer run; then layer 1 trains with layer 0 frozen."""
    both, first = tmp_path / 'both', tmp_path / 'first'
    distill(setup, both, '--align_iters=12', '--kd_iters=0', '--scratch_iters=0', '--hyena_layers=[0,1]')
    distill(setup, first, '--align_iters=6', '--kd_iters=0', '--scratch_iters=0', '--hyena_layers=[0]')
    a = torch.load(both / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(first / 'ckpt.pt', weights_only=True)['model']
    teacher = torch.load(setup[1], weights_only=True)['model']
    layer0 = [k for k in a if k.startswith('transformer.h.0.mixer.')]
    assert layer0 and all(torch.equal(a[k], b[k]) for k in layer0)  # untouched while layer 1 trained
    for k in a:  # align changes the replaced mixers only
        if '.mixer.' not in k:
            assert torch.equal(a[k], teacher[k]), k
    records = [r for r in log_records(both) if 'layer_rel_err' in r]
    assert [list(r['layer_rel_err']) for r in records] == [['0']] * 6 + [['1']] * 6


def test_progressive_align_warms_up_and_decays_within_each_layers_phase(setup, tmp_path):
    # the warmup (20) is longer than a layer's phase (5): it is cut to half the phase, so each phase decays
    distill(setup, tmp_path, '--align_iters=10', '--kd_iters=0', '--scratch_iters=0', '--warmup_iters=20',
            '--align_lr=1e-3')
    records = [r for r in log_records(tmp_path) if 'layer_rel_err' in r]
    for layer in ('0', '1'):
        lrs = [r['lr'] for r in records if layer in r['layer_rel_err']]
        assert len(lrs) == 5 and lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3] > lrs[4]  # 2 warmup steps, then decay
        assert lrs[2] == pytest.approx(1e-3)


def test_progressive_align_with_fewer_iterations_than_layers_is_a_clear_error(setup, tmp_path):
    root, teacher = setup
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'distill.py'), f'--data_dir={root}',
                             f'--teacher={teacher}', f'--out_dir={tmp_path}', '--align_iters=1', '--compile=False'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'align_iters=1 leaves some of the 2 layers no progressive align iteration' in result.stderr


def test_parallel_align_trains_all_layers_together(setup, tmp_path):
    distill(setup, tmp_path, '--align_iters=4', '--kd_iters=0', '--scratch_iters=0', '--align_mode=parallel')
    records = [r for r in log_records(tmp_path) if 'layer_rel_err' in r]
    assert [sorted(r['layer_rel_err']) for r in records] == [['0', '1']] * 4


@pytest.mark.parametrize('mode', ['parallel', 'progressive'])
def test_matched_output_scale_starts_align_closer_to_the_attention(setup, tmp_path, mode):
    # the first logged align error is measured on the batch the scales were fitted on, before any step
    first = {}
    for match in (True, False):
        out = tmp_path / f'{mode}-{match}'
        distill(setup, out, '--align_iters=2', '--kd_iters=0', '--scratch_iters=0', f'--align_mode={mode}',
                f'--match_output_scale={match}')
        first[match] = [r['layer_rel_err'] for r in log_records(out) if 'layer_rel_err' in r][0]
    assert set(first[True]) == set(first[False]) == ({'0', '1'} if mode == 'parallel' else {'0'})
    for layer, err in first[True].items():
        assert err < first[False][layer]


@pytest.mark.parametrize('stage,args', [
    ('kd', ['--align_iters=10', '--kd_iters=200', '--scratch_iters=0']),
    ('align', ['--align_iters=400', '--kd_iters=0', '--scratch_iters=0']),  # in the second layer's phase
    ('scratch', ['--align_iters=0', '--kd_iters=0', '--scratch_iters=200'])])
def test_resume_mid_stage_reproduces_the_uninterrupted_losses(setup, tmp_path, stage, args):
    args = [*args, '--eval_interval=1000']
    first = 205 if stage == 'align' else 5  # the step after which to stop it
    reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
    proc = distill(setup, resumed, *args, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:  # stop it in the middle of the stage
        if os.path.exists(resumed / 'log.jsonl') and len(train_losses(log_records(resumed), stage)) >= first:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert 'Traceback' not in stderr
    ckpt = torch.load(resumed / 'ckpt.pt', weights_only=True)
    total = 400 if stage == 'align' else 200
    assert ckpt['stage'] == stage and first <= ckpt['stage_iter'] < total
    stopped_at = ckpt['stage_iter']
    distill(setup, resumed, *args, '--init_from=resume')
    distill(setup, reference, *args)
    expected = dict(train_losses(log_records(reference), stage))
    got = train_losses(log_records(resumed), stage)
    after = [(it, loss) for it, loss in got if it > stopped_at]
    assert len(after) == total - stopped_at
    assert all(loss == expected[it] for it, loss in after)


def test_resume_with_a_different_teacher_is_a_clear_error(setup, full_run, tmp_path):
    other = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16))
    torch.save({'model': other.state_dict(), 'model_args': dataclasses.asdict(other.config)}, tmp_path / 'other.pt')
    before = (full_run / 'ckpt.pt').read_bytes()
    cmd = [sys.executable, os.path.join(ROOT, 'distill.py'), f'--data_dir={setup[0]}', f'--teacher={tmp_path / "other.pt"}',
           f'--out_dir={full_run}', '--init_from=resume', '--compile=False']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'differ in n_embd (16 vs 32)' in result.stderr
    assert (full_run / 'ckpt.pt').read_bytes() == before  # nothing lost


@pytest.mark.parametrize('case', ['teacher checkpoint', 'other block_size'])
def test_resume_from_a_checkpoint_this_run_cannot_continue_is_a_clear_error(setup, full_run, tmp_path, case):
    out, extra = full_run, ['--block_size=16']
    if case == 'teacher checkpoint':
        out, extra = tmp_path, []
        (tmp_path / 'ckpt.pt').write_bytes(setup[1].read_bytes())
    before = (out / 'ckpt.pt').read_bytes()
    cmd = [sys.executable, os.path.join(ROOT, 'distill.py'), f'--data_dir={setup[0]}', f'--teacher={setup[1]}',
           f'--out_dir={out}', '--init_from=resume', '--compile=False', *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert ('is not a distill.py checkpoint' if case == 'teacher checkpoint' else
            'was distilled at block_size 32, this run asks 16: resume with --block_size=32') in result.stderr
    assert (out / 'ckpt.pt').read_bytes() == before  # nothing lost


def test_kd_loss_is_alpha_t2_kl_from_the_teacher_plus_the_weighted_cross_entropy():
    torch.manual_seed(0)
    student, teacher, ce = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.tensor(1.7)
    temperature, alpha = 2.0, 0.3
    p_t = torch.softmax(teacher / temperature, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean()  # KL(teacher || student)
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    assert torch.allclose(T.kd_loss(student, teacher, ce, alpha, temperature), expected)
    assert T.kd_loss(teacher, teacher, ce, 1.0, temperature).abs() < 1e-6  # the teacher's own logits: no loss


def test_a_replaced_layer_starts_as_its_attentions_q_k_v_with_an_identity_short_conv(setup, tmp_path):
    distill(setup, tmp_path, '--align_iters=0', '--kd_iters=1', '--kd_lr=0', '--scratch_iters=0')  # lr 0: as seeded
    student = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']
    teacher = torch.load(setup[1], weights_only=True)['model']
    for i in (0, 1):
        mixer = f'transformer.h.{i}.mixer.'
        assert torch.equal(student[mixer + 'in_proj.weight'], teacher[mixer + 'c_attn.weight'])  # x0, x1, v = q, k, v
        assert torch.equal(student[mixer + 'out_proj.weight'], teacher[mixer + 'c_proj.weight'])
        short = student[mixer + 'short_filter.weight']
        assert short[..., -1].eq(1).all() and short[..., :-1].eq(0).all()  # the current position only
        assert student[mixer + 'short_filter.bias'].eq(0).all()


@pytest.mark.parametrize('freeze', [True, False])
def test_kd_freeze_copied_trains_the_hyena_operators_alone(setup, tmp_path, freeze):
    distill(setup, tmp_path, '--align_iters=0', '--kd_iters=2', '--scratch_iters=0', f'--kd_freeze_copied={freeze}')
    student = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']
    teacher = torch.load(setup[1], weights_only=True)['model']
    copied = [k for k in teacher if '.mixer.' not in k]
    assert all(torch.equal(student[k], teacher[k]) for k in copied) == freeze
    mixer = 'transformer.h.0.mixer.'
    assert not torch.equal(student[mixer + 'in_proj.weight'], teacher[mixer + 'c_attn.weight'])  # the operator trains
