"""
Bring your own corpus: any folder or glob(s) of text files -> out_dir/{train,val}.bin + meta.json, the same format
as every other prepare script.

    python data/textfiles/prepare.py --input=~/notes --out_dir=data/notes
    python data/textfiles/prepare.py --input='docs/**/*.md,src/**/*.py' --out_dir=data/mycode
    python data/textfiles/prepare.py --input='dump/*.jsonl' --jsonl_field=content --out_dir=data/dump
    python data/textfiles/prepare.py --input=$(python -c "import site; print(site.getsitepackages()[0])") \\
        --out_dir=data/sitepackages --extensions=.py        # a machine's site-packages: often 100M+ tokens

input is a folder, a glob, or a comma-separated list of them ('**' matches folders recursively). A folder is
walked recursively for files whose names end with one of `extensions`, skipping hidden folders (.git) and
__pycache__; a glob takes every file it matches, whatever the extension. Each file is one document, except a
.jsonl file: one JSON object per line, whose `jsonl_field` string is the document.

The split is by file (val = held-out files), decided by a hash of each file's path relative to the folder that
holds all inputs, so a .jsonl file's documents all land on one side: split a single big .jsonl into several files.
Files are read (as UTF-8, errors='replace') and tokenized in worker processes and written out as they come, so
memory grows with the largest file (a few times its size, in token ids), not with the corpus.
"""
import glob
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import configure
from data.prepare_utils import encode_file, prepare_files

# -----------------------------------------------------------------------------
input = ''  # a folder, a glob, or comma-separated globs
out_dir = ''  # required, e.g. data/mycorpus
extensions = '.txt,.md,.py,.rst'  # for folders; add .jsonl (or any other) as needed
jsonl_field = 'text'
val_fraction = 0.05  # of files
max_files = 0  # 0 = all; otherwise the first max_files files in sorted order
num_proc = os.cpu_count() or 1
# -----------------------------------------------------------------------------

if __name__ == '__main__':  # the guard keeps worker processes (spawned on macOS/Windows) from re-running the script
    config = configure(globals())
    if not input:
        raise SystemExit("textfiles: pass --input=FOLDER or --input='GLOB[,GLOB...]'")
    if not out_dir:
        raise SystemExit("textfiles: pass --out_dir=DIR (e.g. data/mycorpus), where train.bin, val.bin and "
                         "meta.json go")
    suffixes = tuple('.' + e.strip().lstrip('.') for e in extensions.split(',') if e.strip())  # 'txt' means '.txt'
    found = set()
    for pattern in (os.path.expanduser(p.strip()) for p in input.split(',') if p.strip()):
        if os.path.isdir(pattern):
            for dirpath, dirnames, filenames in os.walk(pattern):
                dirnames[:] = [d for d in dirnames if not d.startswith('.') and d != '__pycache__']
                found.update(os.path.abspath(os.path.join(dirpath, f)) for f in filenames if f.endswith(suffixes))
        else:
            found.update(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise SystemExit(f"textfiles: --input={input} matches no files (folders are searched for {extensions})")

    # names relative to the folder holding every input: the split and meta.json then don't depend on where it lives
    root = os.path.commonpath(sorted(found))
    if root in found:  # a single file
        root = os.path.dirname(root)
    names = sorted(os.path.relpath(p, root).replace(os.sep, '/') for p in found)
    prepare_files(root, names, out_dir, config, f"text files: {input}", partial(encode_file, jsonl_field=jsonl_field),
                  num_proc=num_proc, val_fraction=val_fraction, max_files=max_files)
