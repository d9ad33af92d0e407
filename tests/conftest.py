"""
Shared test fixtures: a tiny synthetic dataset, the arguments of a tiny CPU model, and helpers that run the
repo's scripts as subprocesses (optionally with a fault injected) and read their logs.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TINY_VOCAB = 64


def synthetic_tokens(n, vocab=TINY_VOCAB, seed=0, restart_p=0.05):
    """Learnable token ids < vocab: mostly next = (5 * prev + 3) % vocab, with random restarts."""
    rng = np.random.default_rng(seed)
    restarts = rng.random(n) < restart_p
    fresh = rng.integers(0, vocab, n)
    out = np.empty(n, dtype=np.uint16)
    t = 0
    for i in range(n):
        t = fresh[i] if restarts[i] else (5 * t + 3) % vocab
        out[i] = t
    return out


def write_dataset(folder, train_tokens=20000, val_tokens=4000, vocab=TINY_VOCAB):
    """A data dir with train.bin / val.bin of uint16 ids < vocab (as data/*/prepare.py writes them)."""
    os.makedirs(folder, exist_ok=True)
    synthetic_tokens(train_tokens, vocab, seed=0).tofile(os.path.join(folder, 'train.bin'))
    synthetic_tokens(val_tokens, vocab, seed=1).tofile(os.path.join(folder, 'val.bin'))
    return str(folder)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from one random state: a test that compares within a tolerance then checks the same
    numbers on every run, and a failure reproduces (an unseeded one failed 1 run in 15 on a cancelling sum)."""
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """Path of a session-wide synthetic dataset folder (vocab TINY_VOCAB)."""
    return write_dataset(tmp_path_factory.mktemp('tiny_data'))


# A 2-layer, 32-wide model on 32-token blocks: ~10 ms an iteration on a CPU core.
TINY_MODEL = dict(vocab_size=TINY_VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=32)
TINY_TRAIN = dict(TINY_MODEL, batch_size=8, eval_iters=4, log_interval=1, compile=False, device='cpu',
                  warmup_iters=5, learning_rate=3e-3, min_lr=3e-4)


def cli(**kwargs):
    """{'max_iters': 40} -> ['--max_iters=40'] (lists and None written as Python literals)."""
    return [f'--{k}={v!r}' if isinstance(v, (list, tuple, type(None))) else f'--{k}={v}' for k, v in kwargs.items()]


def train_args(data_dir, out_dir, **overrides):
    """Arguments for a tiny train_teacher.py run on data_dir writing to out_dir."""
    return cli(**dict(TINY_TRAIN, data_dir=str(data_dir), out_dir=str(out_dir), **overrides))


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    env.setdefault('OMP_NUM_THREADS', '1')  # tiny models: threads only add overhead and contention
    return env


def run_script(script, *args, timeout=300, cwd=None):
    """Run a repo script (e.g. 'train_teacher.py') with args; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO, env=_env())


def patched_command(tmp_path, patch, script, *args):
    """Command list that runs `script` with `patch` (Python source, run first in the same process: a fault
    injected by monkeypatching) via runpy, so the script itself stays untouched."""
    wrapper = os.path.join(str(tmp_path), f'run_patched_{abs(hash(patch)) % 10 ** 8}.py')
    with open(wrapper, 'w') as f:
        f.write(textwrap.dedent(f"""\
            import runpy, sys
            sys.path.insert(0, {REPO!r})
            sys.argv = [{os.path.join(REPO, script)!r}] + sys.argv[1:]
            """) + textwrap.dedent(patch) + textwrap.dedent(f"""
            runpy.run_path({os.path.join(REPO, script)!r}, run_name='__main__')
            """))
    return [sys.executable, wrapper, *map(str, args)]


def run_patched(tmp_path, patch, script, *args, timeout=300):
    """run_script with a fault injected (see patched_command)."""
    return subprocess.run(patched_command(tmp_path, patch, script, *args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env())


def popen_patched(tmp_path, patch, script, *args):
    """Start a patched script without waiting (for signal tests)."""
    return subprocess.Popen(patched_command(tmp_path, patch, script, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())


def read_log(out_dir):
    """Records of out_dir/log.jsonl."""
    with open(os.path.join(str(out_dir), 'log.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(out_dir):
    """{('train', iter): loss, ('eval', iter): (train_loss, val_loss)} from a run's log."""
    out = {}
    for r in read_log(out_dir):
        if 'loss' in r:
            out[('train', r['iter'])] = r['loss']
        elif 'val_loss' in r:
            out[('eval', r['iter'])] = (r['train_loss'], r['val_loss'])
    return out


def assert_one_line_error(proc, *fragments):
    """The process failed with a message holding each fragment, and no Python traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# The reference run that resume/preemption tests compare against: dropout and gradient accumulation on,
# so that exact equality also covers the dropout RNG and the micro-batch draws.
REFERENCE = dict(max_iters=40, lr_decay_iters=40, eval_interval=10, gradient_accumulation_steps=2, dropout=0.1)


@pytest.fixture(scope='session')
def reference_run(tiny_data, tmp_path_factory):
    """out_dir of one uninterrupted tiny run (REFERENCE settings), shared by the tests that compare to it."""
    out = tmp_path_factory.mktemp('reference')
    proc = run_script('train_teacher.py', *train_args(tiny_data, out, **REFERENCE))
    assert proc.returncode == 0, proc.stderr
    return str(out)
