"""train_teacher.py on a tiny synthetic dataset (CPU): it learns, checkpoints, resumes exactly, trains Hyena."""
import math
import os

import torch

import training as T
from conftest import REFERENCE, TINY_VOCAB, losses, read_log, run_script, train_args


def test_val_loss_falls(reference_run):
    evals = [r for r in read_log(reference_run) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[0]['val_loss'] > math.log(TINY_VOCAB) - 0.3  # starts near chance
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0


def test_checkpoint_holds_what_resume_needs_and_rebuilds_its_model(reference_run):
    ckpt = torch.load(os.path.join(reference_run, 'ckpt.pt'), weights_only=True)
    for key in ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'tokens_seen'):
        assert key in ckpt
    assert ckpt['iter_num'] == REFERENCE['max_iters']
    assert ckpt['tokens_seen'] == 40 * 2 * 8 * 32
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    model = T.model_from_checkpoint(ckpt)  # GPT(GPTConfig(**model_args)) + a strict load
    assert model.config.n_layer == 2 and model.config.vocab_size == TINY_VOCAB


def test_resume_continues_from_the_saved_iteration_with_identical_losses(tiny_data, reference_run, tmp_path):
    first = run_script('train_teacher.py', *train_args(tiny_data, tmp_path, **dict(REFERENCE, max_iters=20)))
    assert first.returncode == 0, first.stderr
    resumed = run_script('train_teacher.py', *train_args(tiny_data, tmp_path, **REFERENCE), '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    log = read_log(tmp_path)
    resumed_train = [r['iter'] for r in log if 'loss' in r][20:]
    assert resumed_train[0] == 20  # continues at the saved iteration
    reference = losses(reference_run)
    assert losses(tmp_path) == reference  # every train loss and eval, bit for bit


def test_hyena_layers_trains_a_hybrid_from_scratch(tiny_data, tmp_path):
    proc = run_script('train_teacher.py', *train_args(tiny_data, tmp_path, max_iters=4, eval_interval=4,
                                                      hyena_layers='1'))
    assert proc.returncode == 0, proc.stderr
    ckpt = T.load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    assert list(ckpt['model_args']['hyena_layers']) == [1]
    model = T.model_from_checkpoint(ckpt)
    assert type(model.transformer.h[1].mixer).__name__ == 'HyenaOperator'
    assert type(model.transformer.h[0].mixer).__name__ == 'CausalSelfAttention'


def test_init_from_a_local_hugging_face_folder(tiny_data, tmp_path):
    from safetensors.torch import save_file
    import json
    # a GPT-2 layout written by hand (what save_pretrained writes), so the test needs no transformers
    n, d, layers = 64, 32, 2
    g = torch.Generator().manual_seed(0)
    state = {'wte.weight': torch.randn(n, d, generator=g) * 0.02, 'wpe.weight': torch.randn(64, d, generator=g) * 0.02,
             'ln_f.weight': torch.ones(d), 'ln_f.bias': torch.zeros(d)}
    for i in range(layers):
        p = f'h.{i}.'
        state |= {p + 'ln_1.weight': torch.ones(d), p + 'ln_1.bias': torch.zeros(d),
                  p + 'ln_2.weight': torch.ones(d), p + 'ln_2.bias': torch.zeros(d),
                  p + 'attn.c_attn.weight': torch.randn(d, 3 * d, generator=g) * 0.02,
                  p + 'attn.c_attn.bias': torch.zeros(3 * d),
                  p + 'attn.c_proj.weight': torch.randn(d, d, generator=g) * 0.02, p + 'attn.c_proj.bias': torch.zeros(d),
                  p + 'mlp.c_fc.weight': torch.randn(d, 4 * d, generator=g) * 0.02, p + 'mlp.c_fc.bias': torch.zeros(4 * d),
                  p + 'mlp.c_proj.weight': torch.randn(4 * d, d, generator=g) * 0.02, p + 'mlp.c_proj.bias': torch.zeros(d)}
    folder = tmp_path / 'hf'
    folder.mkdir()
    save_file(state, str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps(dict(n_layer=layers, n_head=2, n_embd=d, n_positions=64,
                                                        vocab_size=n, model_type='gpt2')))
    out = tmp_path / 'out'
    args = train_args(tiny_data, out, max_iters=3, eval_interval=3, init_from=str(folder))
    proc = run_script('train_teacher.py', *[a for a in args if not a.startswith(('--vocab_size', '--n_'))])
    assert proc.returncode == 0, proc.stderr
    ckpt = T.load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['model_args']['block_size'] == 32  # cropped from 64
    assert ckpt['model_args']['bias'] is True and ckpt['iter_num'] == 3


def test_lr_warms_up_from_a_nonzero_value_then_decays_to_min_lr():
    lr = [T.get_lr(it, 1.0, warmup_iters=10, lr_decay_iters=100, min_lr=0.1) for it in range(120)]
    assert 0 < lr[0] < lr[5] < lr[9] <= 1.0
    assert lr[10] == 1.0 and all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[100] == lr[119] == 0.1
    assert T.get_lr(0, 1.0, 10, 100, 0.1, decay_lr=False) == 1.0


def test_param_groups_get_lr_times_their_scale():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{'params': [p], 'lr_scale': 1.0}, {'params': [q], 'lr_scale': 0.5}], lr=1.0)
    T.set_lr(opt, 0.2)
    assert [g['lr'] for g in opt.param_groups] == [0.2, 0.1]


def test_compiled_and_ddp_prefixes_are_stripped():
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model)  # wrapping only; nothing is built until it is called
    assert any(k.startswith('_orig_mod.') for k in compiled.state_dict())
    assert T.unwrap_model(compiled) is model
    assert set(T.clean_state_dict({'module._orig_mod.weight': 1, '_orig_mod.bias': 2})) == {'weight', 'bias'}


def test_batches_are_a_function_of_their_index(tiny_data):
    data = T.TokenData(tiny_data, block_size=32, batch_size=4, vocab_size=TINY_VOCAB, seed=1)
    x1, y1 = data.get_batch('train', 7)
    x2, _ = data.get_batch('train', 7)
    x3, _ = data.get_batch('train', 8)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    other_rank = T.TokenData(tiny_data, block_size=32, batch_size=4, vocab_size=TINY_VOCAB, seed=1, rank=1)
    assert not torch.equal(other_rank.get_batch('train', 7)[0], x1)
    eval_batch = data.get_batch('train', 7, stream=T.EVAL_STREAM)[0]
    assert not torch.equal(eval_batch, x1)  # evaluation draws from its own stream
