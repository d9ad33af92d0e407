"""
The embedded default corpus: the running Python's standard library source, ~1,800 .py files, ~15M GPT-2 tokens.
Every machine with Python has it, so it needs no network; it is real text that no one here wrote.

    python data/pystdlib/prepare.py                       # -> data/pystdlib/{train,val}.bin + meta.json
    python data/pystdlib/prepare.py --max_files=50        # a quick subset (first 50 files in sorted order)
    python data/pystdlib/prepare.py --out_dir=/tmp/pystdlib --num_proc=4

What goes in: every *.py file under sysconfig.get_paths()['stdlib'], recursively, except site-packages and
dist-packages (third-party code, different on every machine). The stdlib's own test suites (test/, */test*/) stay
in: they are about half the tokens and are ordinary Python; the few deliberately odd files among them (bad
encodings, Python 2 syntax in lib2to3's test data) are a rounding error. Files are read as UTF-8 with
errors='replace'.

The split is by file (val = held-out files, never the tail of a file), decided by a hash of each file's relative
path. The corpus differs between Python versions, so meta.json records the version and the file lists.
"""
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import configure
from data.prepare_utils import prepare_files

# -----------------------------------------------------------------------------
val_fraction = 0.03  # of files: ~55 files, ~0.7M tokens on Python 3.11; plenty for a steady val loss
max_files = 0  # 0 = all; otherwise the first max_files files in sorted order (tests, quick demos)
out_dir = os.path.dirname(os.path.abspath(__file__))
num_proc = os.cpu_count() or 1
# -----------------------------------------------------------------------------

if __name__ == '__main__':  # the guard keeps worker processes (spawned on macOS/Windows) from re-running the script
    config = configure(globals())
    stdlib = sysconfig.get_paths()['stdlib']
    names = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages')]
        names += [os.path.relpath(os.path.join(dirpath, f), stdlib).replace(os.sep, '/')
                  for f in filenames if f.endswith('.py')]
    names.sort()  # os.walk's order depends on the file system; sorted names make every run identical
    prepare_files(stdlib, names, out_dir, config, f"Python {sys.version.split()[0]} standard library, *.py under {stdlib}",
                  num_proc=num_proc, val_fraction=val_fraction, max_files=max_files)
