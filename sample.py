"""
Generate text from a trained model: any checkpoint of this repo (teacher, student or hybrid, rebuilt from
its model_args), or GPT-2 weights by name or from a local Hugging Face folder.

    python sample.py --out_dir=out-teacher                      # out-teacher/ckpt.pt
    python sample.py --init_from=out-distill/ckpt.pt --start="def main(" --max_new_tokens=200
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt   # needs network (or a local folder)
    python sample.py --init_from=/path/to/hf_gpt2_folder --num_samples=1 --temperature=0.7
    python sample.py --init_from=out-distill/ckpt_recurrent.pt  # a student fitted by recurrent.py

Decoding follows the checkpoint: a teacher uses its KV cache, a Hyena student its cache (the FFT prefill,
then O(L * d) per token), a recurrent checkpoint its modal state (constant memory per token); use_cache=False
re-runs the whole context for every token.

Config: the keys below, config files and --key=value (configurator.py). The prompt uses the GPT-2 BPE
(tokenizer.get_encoding()); <|endoftext|> may appear in it.
"""
import os

import torch

import training as T
from configurator import configure
from tokenizer import get_encoding

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a .pt path, a run folder, 'gpt2*' or a Hugging Face folder
out_dir = 'out-teacher'
start = "\n"  # the prompt: text, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 1.0 samples the model's distribution; lower is more conservative; 0 takes the most likely
top_k = 200  # keep only the top_k most likely tokens (0: all)
seed = 1337
device = 'auto'
dtype = 'auto'
use_cache = True  # KV cache (attention) / Hyena cache; False re-runs the whole context per token
# -----------------------------------------------------------------------------
config = configure(globals())
T.check_ranges(config, {'> 0': ('num_samples',), '>= 0': ('seed', 'temperature', 'top_k', 'max_new_tokens')})

device = T.resolve_device(device)
prec = T.setup_precision(device, dtype)
torch.manual_seed(seed)

# ---- the model
if init_from == 'resume' or init_from.endswith('.pt') or os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
    path = (os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else
            init_from if init_from.endswith('.pt') else os.path.join(init_from, 'ckpt.pt'))
    model = T.model_from_checkpoint(T.load_checkpoint(path, if_missing='pass --init_from=<a .pt path, a run folder, '
                                                                     'a GPT-2 name or a Hugging Face folder>'))
    source = path
else:
    from model import GPT
    if not (init_from.startswith('gpt2') or os.path.isdir(init_from)):
        T.fail(f"init_from='{init_from}' is not 'resume', a checkpoint file, a run folder with ckpt.pt, a GPT-2 "
               f"name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 folder")
    model = GPT.from_pretrained(init_from, dict(dropout=0.0))
    source = init_from
model.eval().to(device)

# ---- the prompt
enc = get_encoding()
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        T.fail(f"start={start!r}: cannot read the prompt file ({e.strerror})")
    except UnicodeDecodeError:
        T.fail(f"start={start!r}: the prompt file is not UTF-8 text; convert it (e.g. iconv -t utf-8)")
ids = enc.encode(start, allowed_special={'<|endoftext|>'})
if not ids:
    T.fail("start is empty: give a prompt, e.g. --start='def ' or --start=FILE:prompt.txt")
vocab = model.config.vocab_size
if max(ids) >= vocab:
    T.fail(f"the prompt holds token id {max(ids)}, beyond this model's vocabulary of {vocab}")
x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]


def decode(tokens):
    """GPT-2 ids -> text; ids the tokenizer lacks (the padding of a 50304 vocabulary) show as '<?>'."""
    out, run = [], []
    for t in tokens:
        if t < enc.n_vocab:
            run.append(t)
        else:
            out += [enc.decode(run), '<?>']
            run = []
    return ''.join(out + [enc.decode(run)])


# ---- generate
print(f"sampling from {source}")
with torch.no_grad(), prec.ctx:
    for k in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, use_cache=use_cache)
        print(decode(y[0].tolist()))
        print('---------------')
