"""
OpenWebText, prepared as nanoGPT does: ~8M web documents, ~9B GPT-2 tokens. Needs network and `datasets`.

    pip install datasets
    python data/openwebtext/prepare.py                    # -> data/openwebtext/{train,val}.bin + meta.json
    python data/openwebtext/prepare.py --num_proc=32
    python data/openwebtext/prepare.py --dataset=/path/to/local/copy   # a downloaded copy of the Hub repo, no network

Expect ~54 GB in the Hugging Face cache, train.bin ~17 GB (~9.0B tokens), val.bin ~8.5 MB (~4.4M tokens).

The Hub copy is "Skylion007/openwebtext" (nanoGPT still says just "openwebtext"). `datasets` 4+ dropped
loading scripts; if yours stops with "Dataset scripts are no longer supported", read the Hub's parquet export
instead (--revision=refs/convert/parquet) or pip install 'datasets<4'.

Offline, this stops at once with a one-line message, before `datasets` can hang on retries. Corpora that need no
network: python data/pystdlib/prepare.py (the embedded one) and python data/textfiles/prepare.py (your own files).
"""
import importlib.util
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import configure
from data.prepare_utils import discard, encode_record, make_out_dir, publish, write_split

# -----------------------------------------------------------------------------
dataset = 'Skylion007/openwebtext'  # a Hub name, or a local folder
revision = ''  # '' = the Hub's default branch
val_size = 0.0005  # fraction of documents held out; nanoGPT's test_size
seed = 2357  # nanoGPT's, so the val documents are the same as theirs
num_proc = 8  # the datasets map() workers each hold a share of the data: more is faster but costs memory
write_shards = 1024  # each split is written in this many contiguous pieces, one in memory at a time
out_dir = os.path.dirname(os.path.abspath(__file__))
connect_timeout = 3.0  # seconds for the up-front reachability check
# -----------------------------------------------------------------------------


def why_offline():
    """The reason the dataset cannot be loaded here, or None. Checked before `datasets` starts: offline, it would
    retry for minutes. find_spec looks for the package without paying the second it takes to import."""
    if importlib.util.find_spec('datasets') is None:
        return "`datasets` is not installed (pip install datasets)"
    if os.path.isdir(dataset):
        return None  # a local copy needs no network
    from model import hub_offline_reason  # here, not at the top: torch is imported only when it is needed
    return hub_offline_reason(('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'), connect_timeout)


if __name__ == '__main__':  # the guard keeps worker processes (spawned on macOS/Windows) from re-running the script
    config = configure(globals())
    make_out_dir(out_dir)  # before hours of download and tokenizing
    reason = why_offline()
    if reason:
        raise SystemExit(f"openwebtext: {reason}. Without network use the embedded corpus "
                         f"(python data/pystdlib/prepare.py) or your own text files "
                         f"(python data/textfiles/prepare.py --input=DIR --out_dir=data/NAME)")
    from datasets import load_dataset

    ds = load_dataset(dataset, revision=revision or None, num_proc=num_proc)
    # OpenWebText has only a train split: hold out a random val split the way nanoGPT does
    ds = ds['train'].train_test_split(test_size=val_size, seed=seed, shuffle=True)
    ds['val'] = ds.pop('test')
    ds = ds.map(encode_record, remove_columns=ds['train'].column_names, desc='tokenizing', num_proc=num_proc)

    splits, temps = {}, {}
    try:
        for split, dset in ds.items():
            shards = min(write_shards, len(dset))
            shard = lambda i: dset.shard(num_shards=shards, index=i, contiguous=True).with_format('numpy')
            ids = (np.concatenate(shard(i)[:]['ids']) for i in tqdm(range(shards), desc=f'writing {split}.bin'))
            splits[split] = write_split(out_dir, split, ids, temps)
        publish(out_dir, temps, config, source=f"OpenWebText via Hugging Face datasets: {dataset}"
                + (f" @ {revision}" if revision else ''), splits=splits)
    finally:
        discard(temps)
