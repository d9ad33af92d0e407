"""model.py: one GPT for teacher, student and hybrids."""
import pytest
import torch

from hyena import HyenaOperator, filter_parameters
from model import GPT, GPTConfig, CausalSelfAttention

TINY = dict(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=16)


def test_forward_shapes_and_loss():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 64, (2, 32))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 32, 64) and loss.shape == ()
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # near uniform at init
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 64) and loss is None


def test_full_logits_without_targets_skip_the_loss():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 64, (2, 32))
    logits, loss = model(idx, full_logits=True)
    assert loss is None and torch.equal(logits, model(idx, idx)[0])


def test_hyena_layers_choose_the_mixer_per_layer():
    model = GPT(GPTConfig(**TINY, hyena_layers=[1]))
    kinds = [type(b.mixer) for b in model.transformer.h]
    assert kinds == [CausalSelfAttention, HyenaOperator, CausalSelfAttention]


def test_hyena_layers_out_of_range_is_an_error():
    with pytest.raises(ValueError, match='out of range'):
        GPTConfig(**TINY, hyena_layers=[3])


def test_n_head_that_does_not_divide_n_embd_is_an_error():
    with pytest.raises(ValueError, match='n_embd=16 is not divisible by n_head=3'):
        GPTConfig(**dict(TINY, n_head=3))


def test_model_rebuilds_from_its_config():
    model = GPT(GPTConfig(**TINY, hyena_layers=[0, 2]))
    import dataclasses
    clone = GPT(GPTConfig(**dataclasses.asdict(model.config)))
    clone.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (1, 32))
    assert torch.equal(model(idx, idx)[0], clone(idx, idx)[0])


def test_longer_than_block_size_is_a_clear_error():
    with pytest.raises(ValueError, match='block_size'):
        GPT(GPTConfig(**TINY))(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize('hyena_layers', [[], [0, 1, 2], [1]])
def test_cached_forward_matches_full_forward(hyena_layers):
    model = GPT(GPTConfig(**TINY, hyena_layers=hyena_layers)).eval()
    idx = torch.randint(0, 64, (2, 32))
    full, _ = model(idx, idx)
    cache = model.new_cache(32)
    steps = [model(idx[:, :20], cache=cache)[0][:, -1]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0][:, -1] for t in range(20, 32)]
    assert (torch.stack(steps, 1) - full[:, 19:]).abs().max() < 1e-5


@pytest.mark.parametrize('hyena_layers', [[], [0, 1, 2]])
def test_generate_with_and_without_cache_equal(hyena_layers):
    model = GPT(GPTConfig(**TINY, hyena_layers=hyena_layers)).eval()
    idx = torch.randint(0, 64, (2, 5))
    torch.manual_seed(0)
    cached = model.generate(idx, 40, use_cache=True)  # 45 tokens: passes block_size, rebuilds the cache
    torch.manual_seed(0)
    plain = model.generate(idx, 40, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached[:, :32], plain[:, :32])  # identical while the context fits the window


def test_generate_at_temperature_zero_takes_the_most_likely_token():
    model = GPT(GPTConfig(**TINY, hyena_layers=[1])).eval()
    idx = torch.randint(0, 64, (2, 5))
    greedy = idx
    for _ in range(6):
        greedy = torch.cat([greedy, model(greedy)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, 6, temperature=0), greedy)
    assert torch.equal(model.generate(idx, 6, temperature=0, use_cache=False), greedy)


def test_generate_with_top_k_samples_only_among_the_k_most_likely_tokens():
    model = GPT(GPTConfig(**TINY, hyena_layers=[1])).eval()
    torch.manual_seed(0)
    out = model.generate(torch.randint(0, 64, (8, 4)), 20, temperature=2.0, top_k=3, use_cache=False)
    logits = model(out[:, :-1], full_logits=True)[0][:, 3:]  # the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[:, 4:, None]).any(-1).all()


def test_forward_with_both_a_cache_and_taps_is_an_error():
    # a cached call computes no taps: the Hyena layers would skip the cache and the next step see one token
    model = GPT(GPTConfig(**TINY, hyena_layers=[1]))
    with pytest.raises(ValueError, match='cache or taps, not both'):
        model(torch.zeros(1, 8, dtype=torch.long), cache=model.new_cache(32), taps=model.filter_taps(8))


def test_crop_block_size_keeps_a_hyena_models_filters():
    # the filters scale time by the block_size they were built with: a cropped config would rebuild other ones
    with pytest.raises(ValueError, match='keeps its block_size'):
        GPT(GPTConfig(**TINY, hyena_layers=[1])).crop_block_size(16)
    gpt = GPT(GPTConfig(**TINY))
    gpt.crop_block_size(16)
    assert gpt.config.block_size == 16 and gpt.transformer.wpe.weight.shape[0] == 16


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_runs_its_hyena_layers(dtype):
    model = GPT(GPTConfig(**TINY, hyena_layers=[0, 1])).eval()
    idx = torch.randint(0, 64, (2, 32))
    reference = model(idx, full_logits=True)[0]
    half = model.to(dtype)
    assert half.transformer.h[0].mixer.filter(32).dtype == torch.float32  # the taps stay fp32
    logits = half(idx, full_logits=True)[0]
    assert logits.dtype == dtype and (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_peak_flops_tells_the_h100_variants_apart(monkeypatch):
    import model as model_module
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for name, flops in (('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
                        ('NVIDIA H200', 989e12), ('NVIDIA GeForce RTX 3090', None)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None, name=name: name)
        assert model_module.peak_flops() == flops
    assert model_module.peak_flops('cpu') is None  # a CPU run on a GPU machine


@pytest.mark.parametrize('hyena_layers,scale', [([], 20.0), ([0, 1, 2], 4.0)])
def test_a_full_cache_is_rebuilt_from_the_last_half_block(hyena_layers, scale):
    # learned positions hold block_size (32) tokens: a cache that would pass them restarts from the last 16
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, hyena_layers=hyena_layers)).eval()
    with torch.no_grad():  # larger weights than at init, so that the next token depends on more than the last one
        for p in model.parameters():
            p.mul_(scale if p.dim() > 1 else 1.0)
    idx = torch.randint(0, 64, (2, 5))

    def greedy(window):  # greedy decoding that restarts its context from the last `window` tokens
        out, start = idx, 0
        for end in range(5, 45):
            if end - start > 32:
                start = end - window
            out = torch.cat([out, model(out[:, start:end])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    assert not torch.equal(greedy(16), greedy(8))  # the window shows in the tokens
    assert torch.equal(model.generate(idx, 40, temperature=0, use_cache=True), greedy(16))


def test_optimizer_groups_filter_params_without_decay():
    model = GPT(GPTConfig(**TINY, hyena_layers=[0]))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', filter_lr_scale=0.5)
    filter_ids = {id(p) for p in filter_parameters(model)}
    filter_group = [g for g in opt.param_groups if {id(p) for p in g['params']} == filter_ids]
    assert filter_ids and len(filter_group) == 1
    assert filter_group[0]['weight_decay'] == 0.0 and filter_group[0]['lr'] == pytest.approx(5e-4)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g['params'])
    assert n_opt == sum(p.numel() for p in model.parameters())


def test_mfu_is_flops_over_the_known_gpus_peak_and_none_elsewhere(monkeypatch):
    model = GPT(GPTConfig(**TINY))
    assert model.flops_per_token(32) > 6 * model.get_num_params()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H100 80GB HBM3')
    assert model.estimate_mfu(4, 0.5) == pytest.approx(model.flops_per_token(32) * 32 * 4 / 0.5 / 989e12)
    assert model.estimate_mfu(4, 0.5, device='cpu') is None  # a CPU run on a GPU machine
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Some Future GPU')
    assert model.estimate_mfu(4, 0.5) is None


def test_huggingface_gpt2_logits_match(tmp_path):
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so a mapping error cannot hide in tiny logits
        for p in hf.parameters():
            p.mul_(10 if p.dim() >= 2 else 1)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx, idx)
    assert expected.abs().max() > 1
    assert (logits - expected).abs().max() < 1e-4


def test_from_pretrained_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit, match='local folder'):
        GPT.from_pretrained('gpt2')


def test_from_pretrained_unknown_name_is_a_clear_error():
    with pytest.raises(SystemExit, match='neither a GPT-2 name'):
        GPT.from_pretrained('no-such-model')
