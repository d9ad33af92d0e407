"""train_teacher.py on a tiny synthetic dataset (CPU): it learns, checkpoints, resumes exactly, trains Hyena."""
import gc
import math
import os
import time

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
    assert set(T.clean_state_dict({'module._orig_mod.weight': 1, '_orig_mod.bias': 2})) == {'weight', 'bias'}


def test_parse_layers_reads_all_none_lists_strings_and_negative_indices():
    assert T.parse_layers('all', 4) == [0, 1, 2, 3]
    assert T.parse_layers(None, 4) == T.parse_layers('', 4) == T.parse_layers('none', 4) == []
    assert T.parse_layers('0,2', 4) == T.parse_layers([2, 0, 2], 4) == T.parse_layers('[0, 2]', 4) == [0, 2]
    assert T.parse_layers(-1, 4) == [3] and T.parse_layers([0, -1], 4) == [0, 3]


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


def tiny_student():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=3, n_head=2, n_embd=16, dropout=0.0,
                         hyena_layers=[0, 2]))  # a hybrid: attention in layer 1


def micro_batches(accum):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (2, 17), generator=g) for _ in range(accum)]


def iteration_grads(model, call, accum, shared=None):
    """Parameter gradients of one iteration: `accum` micro-steps of the mean loss, as the training loops run it."""
    model.zero_grad(set_to_none=True)
    if shared is not None:
        shared.begin()
    for micro, batch in enumerate(micro_batches(accum)):
        taps = shared.taps(micro) if shared is not None else None
        _, loss = call(batch[:, :-1], batch[:, 1:], taps=taps)
        (loss / accum).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_shared_taps_give_the_gradients_of_micro_steps_that_compute_their_own():
    model = tiny_student()
    reference = iteration_grads(model, model, 3)
    shared = iteration_grads(model, model, 3, T.SharedTaps(model, 16, 3))
    assert reference.keys() == shared.keys()
    for name in reference:
        torch.testing.assert_close(shared[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert reference['transformer.h.0.mixer.filter.bias'].abs().sum() > 0  # the filters did get gradients


def test_shared_taps_run_the_filter_mlps_once_per_iteration(monkeypatch):
    model = tiny_student()
    calls = []
    filter_taps = model.filter_taps
    monkeypatch.setattr(model, 'filter_taps', lambda T: calls.append(T) or filter_taps(T))
    iteration_grads(model, model, 4, T.SharedTaps(model, 16, 4))
    assert calls == [16]
    calls.clear()
    iteration_grads(model, model, 1, T.SharedTaps(model, 16, 1))  # one micro-step: the model computes its own
    assert calls == [16]


def test_under_ddp_shared_taps_reach_the_filters_on_the_synced_micro_step(tmp_path):
    # DDP all-reduces what the last micro-step's backward accumulates; the filters' gradients must arrive there,
    # or its reducer never finishes and the next iteration's forward raises
    from torch.nn.parallel import DistributedDataParallel
    model = tiny_student()
    reference = iteration_grads(model, model, 3)
    torch.distributed.init_process_group('gloo', init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    ddp = None
    try:
        ddp = DistributedDataParallel(model)
        shared = T.SharedTaps(model, 16, 3)

        def call(x, y, taps):
            ddp.require_backward_grad_sync = taps is not shared.leaves  # sync on the last micro-step only
            return ddp(x, y, taps=taps)
        for _ in range(2):
            grads = iteration_grads(model, call, 3, shared)
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:  # as in test_reliability's DDP tests: the reducer first, then gloo's workers, then the group
        del ddp
        gc.collect()
        time.sleep(0.1)
        torch.distributed.destroy_process_group()
