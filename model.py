"""
One GPT for teacher, student and hybrids: a GPT-2 style decoder whose blocks each hold a sequence
mixer, causal self-attention or a Hyena operator (hyena.py), chosen per layer by
GPTConfig.hyena_layers. A checkpoint's model_args record that choice, so any checkpoint rebuilds
its own model with GPT(GPTConfig(**model_args)).

Follows nanoGPT's model.py (Karpathy), plus: per-layer mixers, a KV cache (and a Hyena cache) for
generation, loading GPT-2 from the hub or from a local Hugging Face folder with no network, and
MFU against the peak of the GPU actually in use.
"""
import json
import math
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hyena import HyenaOperator, filter_bank, filter_parameters


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    pos_emb: bool = True  # learned absolute positions (GPT-2); False lets a Hyena model run past block_size
    hyena_layers: list = field(default_factory=list)  # indices of the blocks that mix with Hyena
    hyena_order: int = 2
    hyena_filter_order: int = 64  # width of the implicit filter MLP
    hyena_emb_dim: int = 33  # positional features of the filter: t plus 16 sin/cos bands
    hyena_filter_freq: float = 14.0  # sine activation frequency of the filter MLP
    hyena_short_filter_order: int = 3

    def __post_init__(self):
        """Shapes the modules cannot build are ValueErrors naming the config key (the scripts check their settings
        through here before anything runs: training.check_ranges)."""
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick an n_head that "
                             f"divides it")
        if self.hyena_order < 2:
            raise ValueError(f"hyena_order={self.hyena_order} is out of range: it must be >= 2 (2 is the paper's "
                             f"operator)")
        if self.hyena_emb_dim < 3 or self.hyena_emb_dim % 2 == 0:
            raise ValueError(f"hyena_emb_dim={self.hyena_emb_dim} must be odd and >= 3 (the filter's features: t "
                             f"plus sin/cos pairs)")
        if isinstance(self.hyena_layers, str):  # training.parse_layers reads the scripts' '0,2' and 'all'
            raise ValueError(f"hyena_layers={self.hyena_layers!r}: pass a list of layer indices, e.g. [0, 2]")
        self.hyena_layers = sorted(set(int(i) for i in self.hyena_layers))
        bad = [i for i in self.hyena_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"hyena_layers {bad} out of range: the model has layers 0..{self.n_layer - 1}")


def make_mixer(config, layer):
    if layer in config.hyena_layers:
        return HyenaOperator(config.n_embd, config.block_size, order=config.hyena_order,
                             filter_order=config.hyena_filter_order,
                             short_filter_order=config.hyena_short_filter_order, dropout=config.dropout,
                             emb_dim=config.hyena_emb_dim, filter_freq=config.hyena_filter_freq, bias=config.bias)
    return CausalSelfAttention(config)


# cuDNN attention, SDPA's first choice on Hopper GPUs in recent torch, builds an execution plan for every new
# key length: ~4 ms per layer per token when decoding with a KV cache, whose keys grow by one each step
# (measured on an H200, torch 2.11: 54 ms/token for GPT-2 small). Decoding leaves it out.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, cache=None):
        """x: (B, T, C). With a cache dict, keys and values of earlier calls are kept and reused."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, causal, backends = None, True, None
        if cache is not None:
            if 'k' in cache:
                past = cache['k'].shape[2]
                k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
                causal = False  # the new queries see the whole past; among themselves, causally:
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                backends = DECODE_SDPA_BACKENDS
            cache['k'], cache['v'] = k, v
        with sdpa_kernel(backends) if backends else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's gelu_new, so HF weights give the same logits
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mixer = make_mixer(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, taps=None):
        """taps: a Hyena mixer's long filter, computed by the model for all its layers at once (GPT.filter_taps)."""
        h = self.ln_1(x)
        x = x + (self.mixer(h, cache=cache) if taps is None else self.mixer(h, taps=taps))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith('c_proj.weight') or name.endswith('out_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embed(self, idx, start=0):
        """Token (+ position) embeddings of idx, whose first token sits at position `start`."""
        t = idx.size(1)
        x = self.transformer.wte(idx)
        if self.transformer.wpe is not None:
            # start may be a device tensor (a CUDA-graphed decoding step): then the caller checks the length
            if not torch.is_tensor(start) and start + t > self.config.block_size:
                raise ValueError(f"sequence of length {start + t} is longer than block_size "
                                 f"{self.config.block_size}, the number of learned positions")
            x = x + self.transformer.wpe(start + torch.arange(t, device=idx.device))
        return self.transformer.drop(x)

    def forward(self, idx, targets=None, cache=None, full_logits=False, taps=None):
        """idx (B, T) -> (logits, loss). With targets: full (B, T, V) logits and the mean cross-entropy
        (targets == -1 ignored). Without: logits of the last position only, (B, 1, V), or of every position
        with full_logits=True (distill.py's teacher: no cross-entropy over the vocabulary that nobody reads).
        cache: from new_cache(); the call then continues the cached sequence with idx. taps: filter_taps(T),
        when the caller computed them once for several forward passes (training.SharedTaps)."""
        if cache is not None and taps is not None:
            raise ValueError("GPT.forward: pass cache or taps, not both (a cached call computes no taps)")
        start = cache['length'] if cache is not None else 0
        x = self.embed(idx, start)
        if taps is None:
            taps = self.filter_taps(idx.size(1)) if cache is None else {}
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache=cache['layers'][i] if cache is not None else None, taps=taps.get(i))
        if cache is not None:
            cache['length'] += idx.size(1)
        x = self.transformer.ln_f(x)
        if targets is None and full_logits:
            return self.lm_head(x), None
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, -1:, :]), None

    def filter_taps(self, T):
        """{layer: its long filter's taps (channels, T)} for the Hyena layers, computed in one batch
        (hyena.filter_bank): the 12-layer student's filter MLPs then take ~35 small kernels per step instead of ~35
        per layer (0.5 ms of the 35 ms step at block 1024 on an H200, the model compiled whole; BENCHMARKS.md)."""
        layers = [i for i, block in enumerate(self.transformer.h) if isinstance(block.mixer, HyenaOperator)]
        if not layers:
            return {}
        return dict(zip(layers, filter_bank([self.transformer.h[i].mixer.filter for i in layers], T)))

    def new_cache(self, max_len):
        """Per-layer decoding state for sequences of up to max_len tokens (see forward)."""
        return {'length': 0, 'layers': [{'max_len': max_len} for _ in self.transformer.h]}

    def crop_block_size(self, block_size):
        """Fewer learned positions (a GPT-2 trained at 1024 fine-tuned at 256). Not for Hyena layers: their filters
        scale time by the block_size they were built with, so a cropped config would rebuild other filters."""
        if block_size > self.config.block_size:
            raise ValueError(f"crop_block_size({block_size}): the model has only {self.config.block_size} positions")
        if self.config.hyena_layers:
            raise ValueError("crop_block_size: a model with Hyena layers keeps its block_size (its filters' time "
                             "scale); run it on shorter sequences instead")
        self.config.block_size = block_size
        if self.transformer.wpe is not None:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    # ---- loading GPT-2 weights -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir, override_args=None):
        """GPT-2 weights from the hub ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', needs transformers
        and network) or from a local Hugging Face GPT-2 folder (config.json + model.safetensors or
        pytorch_model.bin, no network, no transformers). override_args: e.g. {'dropout': 0.1}."""
        if os.path.isdir(name_or_dir):
            hf_config, hf_state = _read_hf_folder(name_or_dir)
        elif name_or_dir in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'):
            hf_config, hf_state = _download_hf(name_or_dir)
        else:
            raise SystemExit(f"from_pretrained: '{name_or_dir}' is neither a GPT-2 name (gpt2, gpt2-medium, "
                             f"gpt2-large, gpt2-xl) nor a folder holding a Hugging Face GPT-2 checkpoint")
        args = dict(n_layer=hf_config['n_layer'], n_head=hf_config['n_head'], n_embd=hf_config['n_embd'],
                    block_size=hf_config.get('n_positions', hf_config.get('n_ctx', 1024)),
                    vocab_size=hf_config['vocab_size'], bias=True)
        args.update(override_args or {})
        model = cls(GPTConfig(**args))
        # HF GPT-2 stores Linear layers as Conv1D with (in, out) weights: transpose those four.
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        ours = model.state_dict()
        loaded = set()
        for key, value in hf_state.items():
            if key.endswith(('.attn.bias', '.attn.masked_bias')) or key == 'lm_head.weight':
                continue  # causal-mask buffers; lm_head is tied to wte
            key = key if key.startswith('transformer.') else 'transformer.' + key
            value = value.t() if key.endswith(transposed) else value
            key = key.replace('.attn.', '.mixer.')
            if key not in ours or ours[key].shape != value.shape:
                raise SystemExit(f"from_pretrained: unexpected weight {key} {tuple(value.shape)} in {name_or_dir}")
            ours[key].copy_(value)
            loaded.add(key)
        missing = [k for k in ours if k not in loaded and k != 'lm_head.weight']
        if missing:
            raise SystemExit(f"from_pretrained: {name_or_dir} lacks {len(missing)} weights, e.g. {missing[0]}")
        return model

    # ---- training helpers --------------------------------------------------------------------------------
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, filter_lr_scale=1.0):
        """AdamW with three groups: 2-D weights decayed; biases, norms, gains not; Hyena filter
        parameters not decayed and at learning_rate * filter_lr_scale. Each group has 'lr_scale': the
        training loop sets group['lr'] = lr * group['lr_scale'] every step."""
        filter_ids = {id(p) for p in filter_parameters(self)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if id(p) not in filter_ids and p.dim() >= 2],
             'weight_decay': weight_decay, 'lr_scale': 1.0},
            {'params': [p for p in params if id(p) not in filter_ids and p.dim() < 2],
             'weight_decay': 0.0, 'lr_scale': 1.0},
            {'params': [p for p in params if id(p) in filter_ids], 'weight_decay': 0.0, 'lr_scale': filter_lr_scale},
        ]
        groups = [g for g in groups if g['params']]
        for g in groups:
            g['lr'] = learning_rate * g['lr_scale']
        extra = dict(fused=True) if device_type == 'cuda' else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the weights, plus
        12 * n_embd * T per attention layer, plus the FFT convolutions of each Hyena layer (~30 log2(2T)
        per channel per filter: rfft, product and irfft forward, twice that backward)."""
        cfg = self.config
        n_attn = cfg.n_layer - len(cfg.hyena_layers)
        fft = 30 * math.log2(2 * seq_len) * cfg.n_embd * (cfg.hyena_order - 1) * len(cfg.hyena_layers)
        return 6 * self.get_num_params() + 12 * n_attn * cfg.n_embd * seq_len + fft

    def estimate_mfu(self, fwdbwd_per_iter, dt, seq_len=None, device=None):
        """Model FLOPs utilisation against the bf16 dense peak of the GPU the run uses (device: its name, e.g.
        'cuda:1'; None: the current CUDA device); None when unknown or on the CPU."""
        peak = peak_flops(device)
        if peak is None:
            return None
        seq_len = seq_len or self.config.block_size
        return self.flops_per_token(seq_len) * seq_len * fwdbwd_per_iter / dt / peak

    def fixed_size_cache(self):
        """True when the decoding state does not grow with the context: every mixer a recurrent Hyena
        operator (recurrent.py). Such a cache can be decoded through a CUDA graph (decode_graph)."""
        return all(getattr(block.mixer, 'modal', None) is not None for block in self.transformer.h)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, cuda_graph=True):
        """Sample max_new_tokens after idx (B, T). With use_cache the prefix is processed once and each
        new token costs one step per layer; without, every token re-runs the model on the last
        block_size tokens (nanoGPT's loop). With learned positions a cache holds at most block_size
        tokens; past that, it is rebuilt from the last block_size // 2 tokens. cuda_graph: decode a
        fixed-size (recurrent) cache on CUDA by replaying one captured step (see decode_graph). temperature=0
        decodes greedily (the most likely token)."""
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"generate: temperature={temperature} must be >= 0 and top_k={top_k} >= 1 (or None)")
        limit = self.config.block_size if self.config.pos_emb else idx.size(1) + max_new_tokens
        cache, pending, length, step = None, idx, 0, None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -self.config.block_size:] if self.config.pos_emb else idx)
            elif cache is None or length + pending.size(1) > limit:
                cache = self.new_cache(limit)
                pending = idx[:, -(limit // 2):] if idx.size(1) >= limit else idx
                logits, _ = self(pending, cache=cache)  # prefill
                length, step = pending.size(1), None
            else:
                if step is None:
                    graph = cuda_graph and idx.is_cuda and self.fixed_size_cache()
                    step = decode_graph(self, cache, idx.size(0)) if graph else lambda t: self(t, cache=cache)[0]
                logits = step(pending)
                length += 1
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            pending = idx_next
        return idx


def cache_tensors(cache):
    """Every tensor of a decoding cache (model.new_cache(), filled by forward calls), in a fixed order."""
    if torch.is_tensor(cache):
        return [cache]
    items = cache.values() if isinstance(cache, dict) else cache if isinstance(cache, (list, tuple)) else []
    return [t for item in items for t in cache_tensors(item)]


def cache_bytes(cache):
    """Bytes a decoding cache holds: KV cache, Hyena history, or the constant-size recurrent state."""
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


@torch.no_grad()
def decode_graph(model, cache, batch_size):
    """One decoding step, model(idx (batch_size, 1), cache=cache) -> logits (batch_size, 1, vocab), captured
    once as a CUDA graph and then replayed: returns step(idx) -> logits (a buffer the next step overwrites).

    A decoding step of GPT-2 small is dozens of small kernels per layer; at the sizes where a recurrent student's
    step takes well under a millisecond of GPU time, launching them from Python costs more than running them,
    and one graph replay launches them all at once. A graph replays the same kernels on the same memory, so
    this needs a cache of fixed size (model.fixed_size_cache()): every piece of state updated in place, the
    position a device tensor. The cache keeps working with plain model(idx, cache=cache) calls afterwards."""
    device = next(model.parameters()).device
    static_idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    if not torch.is_tensor(cache['length']):
        cache['length'] = torch.tensor(cache['length'], device=device)
    state = cache_tensors(cache)
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up outside the graph: lazy inits, cuBLAS workspaces
        model(static_idx, cache=cache)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits, _ = model(static_idx, cache=cache)
    for t, s in zip(state, saved):  # undo the warm-up step (capturing runs nothing)
        t.copy_(s)

    def step(idx):
        static_idx.copy_(idx)
        graph.replay()
        return static_logits
    return step


def peak_flops(device=None):
    """bf16 dense peak FLOP/s of the CUDA device (None: the current one), or None for a CPU device or a GPU we do
    not know."""
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith('cuda')):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
                       ('H800', 989e12), ('A100', 312e12), ('A800', 312e12)):
        if key in name:
            return flops
    return None


def _read_safetensors(path):
    """Minimal reader for the safetensors format (8-byte header length, JSON header, raw tensors),
    so loading a local folder needs neither transformers nor safetensors installed."""
    dtypes = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16, 'F64': torch.float64}
    with open(path, 'rb') as f:
        header_len = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        begin, end = info['data_offsets']
        buf = bytearray(data[begin:end])
        tensors[name] = torch.frombuffer(buf, dtype=dtypes[info['dtype']]).view(info['shape']).float() \
            if end > begin else torch.zeros(info['shape'])
    return tensors


def _read_hf_folder(folder):
    config_path = os.path.join(folder, 'config.json')
    if not os.path.exists(config_path):
        raise SystemExit(f"from_pretrained: {folder} has no config.json; pass a folder written by save_pretrained")
    with open(config_path) as f:
        hf_config = json.load(f)
    st_path, bin_path = os.path.join(folder, 'model.safetensors'), os.path.join(folder, 'pytorch_model.bin')
    if os.path.exists(st_path):
        return hf_config, _read_safetensors(st_path)
    if os.path.exists(bin_path):
        return hf_config, torch.load(bin_path, map_location='cpu', weights_only=True)
    raise SystemExit(f"from_pretrained: {folder} holds neither model.safetensors nor pytorch_model.bin")


def hub_offline_reason(env_vars=('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'), timeout=3.0):
    """Why the Hugging Face hub cannot be used right now, or None: one of env_vars is set, or no TCP connection
    to HF_ENDPOINT (default huggingface.co) within timeout seconds. A quick, bounded check, so an offline
    machine fails in seconds instead of hanging on the hub client's retries."""
    for var in env_vars:
        if os.environ.get(var, '').upper() in ('1', 'ON', 'YES', 'TRUE'):
            return f"{var} is set"
    hub = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    try:
        socket.create_connection((hub.hostname, hub.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {hub.hostname} ({e})"
    return None


def _download_hf(name):
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise SystemExit(f"from_pretrained('{name}') needs `pip install transformers`; "
                         f"or pass a local folder holding a Hugging Face GPT-2 checkpoint")
    reason = hub_offline_reason()
    if reason:
        raise SystemExit(f"from_pretrained('{name}'): the Hugging Face hub is not usable ({reason}); download the "
                         f"model elsewhere (save_pretrained) and pass its local folder instead")
    hf = GPT2LMHeadModel.from_pretrained(name)
    return hf.config.to_dict(), hf.state_dict()
