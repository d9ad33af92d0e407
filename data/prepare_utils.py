"""
Helpers shared by every data/<name>/prepare.py: split files into train/val, tokenize documents with GPT-2 BPE on
several processes, write train.bin / val.bin and meta.json. Not a script; the prepare scripts use it:

    python data/pystdlib/prepare.py
    python data/textfiles/prepare.py --input=DIR --out_dir=data/mycorpus
    python data/openwebtext/prepare.py

A .bin file is a flat array of uint16 GPT-2 token ids with EOT (50256) after every document, read by training
with np.memmap(path, dtype=np.uint16, mode='r').
"""
import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, get_encoding

DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and page cache of int32
ITEMS_PER_PROC = 8  # with fewer items per process, starting the pool costs more than it saves


class BadInput(ValueError):
    """Malformed input met in a worker. A ValueError, so a Pool hands it back to the main process (a SystemExit
    raised inside a worker would kill that worker and hang the pool); the main process turns it into one line."""


def encode_text(text):
    """One document -> its ids followed by EOT, as uint16. A blank document gives no tokens, not a lone EOT."""
    if not text.strip():
        return np.empty(0, dtype=DTYPE)
    ids = get_encoding().encode_ordinary(text)  # ordinary: a literal '<|endoftext|>' in the text stays text
    ids.append(EOT_TOKEN)
    return np.array(ids, dtype=DTYPE)


def encode_record(record):
    """A Hugging Face datasets row -> {'ids': ids of its 'text'}, for Dataset.map. It lives here, not in the script:
    datasets hashes the function (with dill) to cache map()'s result, and failed to hash it defined in __main__."""
    return {'ids': encode_text(record['text'])}


def encode_file(path, jsonl_field='text'):
    """A file -> ids. A .jsonl file holds one document per line (the string in jsonl_field); any other file is one
    document. Files are read in the worker, so the main process never holds the corpus text; a worker holds one
    file's text and ids at a time."""
    try:
        # utf-8-sig: a byte-order mark is dropped, not taken as text; a bad byte costs one U+FFFD, not the file
        with open(path, encoding='utf-8-sig', errors='replace') as f:
            if not path.endswith('.jsonl'):
                return encode_text(f.read())
            docs = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get(jsonl_field)
                except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, or nested too deep
                    text = None
                if not isinstance(text, str):
                    raise BadInput(f"{path}:{lineno}: expected a JSON object with a string field '{jsonl_field}' "
                                   f"(set it with --jsonl_field=NAME)")
                docs.append(encode_text(text))
    except OSError as e:  # a broken link, a file removed meanwhile, no permission
        raise BadInput(f"{path}: cannot read it ({e.strerror}); remove it from --input")
    return np.concatenate(docs) if docs else np.empty(0, dtype=DTYPE)


def split_by_file(names, val_fraction):
    """Split relative file names (with '/' separators) into (train, val), keeping their order.

    A file goes to val when a hash of its name falls below val_fraction, so its side depends on nothing else:
    the split is the same on every run and machine, and adding or dropping other files moves no one, as long as
    the names stay the same (textfiles takes them relative to the folder holding every input: a file added above
    that folder renames them all)."""
    def unit(name):  # surrogateescape: a file name that is not valid UTF-8 still hashes
        return int.from_bytes(hashlib.sha256(name.encode('utf-8', 'surrogateescape')).digest()[:8], 'big') / 2**64

    val = {name for name in names if unit(name) < val_fraction}
    if not val and len(names) >= 2 and val_fraction > 0:
        val = {min(names, key=unit)}  # tiny inputs: hold out at least one file rather than none
    train = [name for name in names if name not in val]
    if not train or not val:
        raise SystemExit(f"found {len(names)} file(s) and val_fraction={val_fraction}: the split by file left "
                         f"{len(train)} for train and {len(val)} for val; it needs at least 2 files and a "
                         f"val_fraction between 0 and 1 that leaves both some")
    return train, [name for name in names if name in val]


def tokenize(fn, items, num_proc, desc, unit='doc'):
    """Yield fn(item) for each item, in order, computed on up to num_proc processes, under a progress bar.
    A generator, so the caller writes each result out as it comes: memory grows with the largest items (a file's
    ids, and those the workers finished ahead of it), not with the corpus."""
    procs = min(num_proc, len(items) // ITEMS_PER_PROC)
    get_encoding()  # build it before forking: workers inherit it instead of each parsing the BPE files again
    bar = tqdm(total=len(items), desc=desc, unit=unit)
    try:
        if procs <= 1:
            for item in items:
                yield fn(item)
                bar.update()
        else:
            # small chunks keep every worker busy when item sizes vary 1000x (a 1 KB file next to a 1 MB one)
            chunksize = max(1, min(64, len(items) // (procs * 16)))
            with Pool(procs) as pool:
                for ids in pool.imap(fn, items, chunksize):
                    yield ids
                    bar.update()
    except BadInput as e:
        raise SystemExit(str(e))
    finally:
        bar.close()


def make_out_dir(out_dir):
    """out_dir made if missing, before any work; a one-line error where it cannot be (a file of that name)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"out_dir={out_dir!r} cannot be made a folder ({e.strerror}); pass another --out_dir")


def write_split(out_dir, split, arrays, temps):
    """Stream uint16 id arrays into a temp file in out_dir, recorded in temps[split]; return {'tokens': ...,
    'documents': ...}. Neither the total length nor the whole array has to be known or held. publish() renames
    the temp files into place once every split is written: a prepare that fails or is killed midway leaves the
    previous train.bin, val.bin and meta.json together, never a new train.bin beside an old val.bin."""
    temps[split] = os.path.join(out_dir, f'.tmp-{os.getpid()}-{split}.bin')  # *.bin: gitignored if a kill leaves it
    tokens = documents = 0
    with open(temps[split], 'wb') as f:
        for ids in arrays:
            ids = ids.astype(DTYPE, copy=False)
            f.write(ids.tobytes())
            tokens += len(ids)
            documents += int(np.count_nonzero(ids == EOT_TOKEN))
    print(f"{split}: {tokens:,} tokens, {documents:,} documents")
    return {'tokens': tokens, 'documents': documents}


def discard(temps):
    """Remove the temp files of a prepare that stopped before publish()."""
    for tmp in temps.values():
        if os.path.exists(tmp):
            os.remove(tmp)


def publish(out_dir, temps, config, source, splits, **extra):
    """meta.json written, then each split's temp file (write_split) renamed to out_dir/<split>.bin."""
    write_meta(out_dir, config, source, splits, **extra)
    for split, tmp in temps.items():
        os.replace(tmp, os.path.join(out_dir, f'{split}.bin'))
    print(f"wrote {', '.join(f'{split}.bin' for split in temps)} and meta.json in {out_dir}")


def write_meta(out_dir, config, source, splits, **extra):
    """Write out_dir/meta.json: what the .bin files hold, where they came from and how they were made.
    Large fields (such as the per-split file lists) go last in extra, so the head of the file stays readable."""
    meta = {
        'tokenizer': 'gpt2',
        'vocab_size': GPT2_VOCAB_SIZE,
        'eot': EOT_TOKEN,
        'dtype': 'uint16',
        'source': source,
        'splits': splits,
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': shlex.join(['python'] + sys.argv),
        'python': platform.python_version(),
        'config': config,
        **extra,
    }
    path = os.path.join(out_dir, 'meta.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(path + '.tmp', path)


def prepare_files(root, names, out_dir, config, source, encode=encode_file, num_proc=1, val_fraction=0.03,
                  max_files=0):
    """The whole job of a prepare script over files: names (sorted, relative to root) -> the first max_files
    (0: all) -> a train/val split by file -> tokenized train.bin / val.bin and meta.json in out_dir."""
    if max_files < 0:
        raise SystemExit(f"max_files={max_files}: pass 0 (all files) or how many to take")
    if max_files:
        names = names[:max_files]
    train_names, val_names = split_by_file(names, val_fraction)
    make_out_dir(out_dir)
    splits, temps = {}, {}
    try:
        for split, split_names in (('train', train_names), ('val', val_names)):
            paths = [os.path.join(root, name) for name in split_names]
            ids = tokenize(encode, paths, num_proc, desc=f'tokenizing {split}', unit='file')
            splits[split] = {'files': len(split_names), **write_split(out_dir, split, ids, temps)}
        publish(out_dir, temps, config, source=source, splits=splits, root=root,
                files={'train': train_names, 'val': val_names})
    finally:
        discard(temps)
