"""The prepare scripts, run as users run them: each writes train.bin / val.bin (uint16 GPT-2 ids, EOT after every
document) and meta.json into out_dir, split by file, the same bytes on every run."""
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, get_encoding


def prepare(name, *args, env=None):
    """Run data/<name>/prepare.py with args; return the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join('data', name, 'prepare.py'), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def prepared(name, out_dir, *args):
    result = prepare(name, f'--out_dir={out_dir}', *args)
    assert result.returncode == 0, result.stderr
    return out_dir


def ids(out_dir, split):
    return np.fromfile(os.path.join(out_dir, f'{split}.bin'), dtype=np.uint16)


def meta(out_dir):
    with open(os.path.join(out_dir, 'meta.json')) as f:
        return json.load(f)


def documents(out_dir, split):
    """The decoded documents of a split, cut at the EOTs."""
    tokens = ids(out_dir, split)
    ends = np.flatnonzero(tokens == EOT_TOKEN)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [get_encoding().decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def read(path):
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


def source_documents(out_dir, split):
    """What the split should hold: its files' texts (a .jsonl file's records), blank ones left out."""
    m = meta(out_dir)
    docs = []
    for name in m['files'][split]:
        path = os.path.join(m['root'], name)
        if name.endswith('.jsonl'):
            docs += [json.loads(line)['text'] for line in read(path).splitlines() if line.strip()]
        else:
            docs.append(read(path))
    return [d for d in docs if d.strip()]


# --- the embedded corpus: the Python standard library -------------------------------------------------------

@pytest.fixture(scope='module')
def pystdlib(tmp_path_factory):
    return prepared('pystdlib', tmp_path_factory.mktemp('pystdlib'), '--max_files=40', '--val_fraction=0.2',
                    '--num_proc=1')


def test_pystdlib_writes_uint16_ids_ending_each_document_with_eot(pystdlib):
    for split in ('train', 'val'):
        assert os.path.getsize(os.path.join(pystdlib, f'{split}.bin')) % 2 == 0
        tokens = ids(pystdlib, split)
        assert len(tokens) > 0 and tokens[-1] == EOT_TOKEN
        assert tokens.max() < GPT2_VOCAB_SIZE
        assert np.count_nonzero(tokens == EOT_TOKEN) > 1


def test_pystdlib_decodes_back_to_the_source_files(pystdlib):
    for split in ('train', 'val'):
        assert documents(pystdlib, split) == source_documents(pystdlib, split)


def test_pystdlib_holds_out_whole_files_for_val(pystdlib):
    files = meta(pystdlib)['files']
    assert files['val'] and not set(files['train']) & set(files['val'])
    assert len(files['train']) + len(files['val']) == 40
    assert all(name.endswith('.py') for name in files['train'] + files['val'])


def test_pystdlib_gives_the_same_bytes_on_every_run_whatever_num_proc(pystdlib, tmp_path):
    again = prepared('pystdlib', tmp_path, '--max_files=40', '--val_fraction=0.2', '--num_proc=2')
    for split in ('train', 'val'):
        with open(os.path.join(pystdlib, f'{split}.bin'), 'rb') as a, open(os.path.join(again, f'{split}.bin'),
                                                                           'rb') as b:
            assert a.read() == b.read()


def test_pystdlib_meta_records_format_counts_and_provenance(pystdlib):
    m = meta(pystdlib)
    assert (m['tokenizer'], m['vocab_size'], m['eot'], m['dtype']) == ('gpt2', 50257, 50256, 'uint16')
    for split in ('train', 'val'):
        tokens = ids(pystdlib, split)
        assert m['splits'][split] == {'files': len(m['files'][split]), 'tokens': len(tokens),
                                      'documents': int(np.count_nonzero(tokens == EOT_TOKEN))}
    assert m['python'] == platform.python_version()
    assert 'standard library' in m['source']
    assert 'data/pystdlib/prepare.py' in m['command'] and '--max_files=40' in m['command']
    assert m['config']['max_files'] == 40
    datetime.datetime.fromisoformat(m['date'])


# --- bring your own: data/textfiles ---------------------------------------------------------------------------

RECORDS = ["first record: jsonl documents are separate", "second record, ünïcödé ✓", "third\nrecord\n"]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """24 small text files in nested folders, a .jsonl of 3 records, and files the script must skip."""
    root = tmp_path_factory.mktemp('corpus')
    files = {f'notes/doc{i:02d}.txt': f"Note {i}: the quick brown fox ✓ {'jumps ' * i}\n" for i in range(20)}
    files.update({
        'readme.md': "# Title\n\nSome *markdown* — with an em dash.\n",
        'src/code.py': "def f(x):\n    return x ** 2  # squares\n",
        'src/deep/more.py': "print('日本語')\n",
        'literal.txt': "a literal <|endoftext|> stays plain text",
        'empty.txt': "",  # blank files give no document, not a lone EOT
        'records.jsonl': ''.join(json.dumps({'text': t, 'id': i}) + '\n' for i, t in enumerate(RECORDS)) + '\n',
        'table.csv': "skipped,extension\n",
        '.git/config.txt': "hidden folders are skipped\n",
        '__pycache__/cached.py': "skipped too\n",
    })
    for name, text in files.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_text(text, encoding='utf-8')
    return root


@pytest.fixture(scope='module')
def textfiles(corpus, tmp_path_factory):
    return prepared('textfiles', tmp_path_factory.mktemp('textfiles'), f'--input={corpus}',
                    '--extensions=.txt,.md,.py,.jsonl', '--val_fraction=0.2', '--num_proc=1')


def test_textfiles_decodes_back_to_the_source_files(textfiles):
    for split in ('train', 'val'):
        assert documents(textfiles, split) == source_documents(textfiles, split)
        assert ids(textfiles, split)[-1] == EOT_TOKEN


def test_textfiles_takes_each_jsonl_record_as_a_document(textfiles):
    docs = documents(textfiles, 'train') + documents(textfiles, 'val')
    assert all(docs.count(record) == 1 for record in RECORDS)


def test_textfiles_walks_folders_for_the_extensions_and_skips_hidden_and_blank_files(textfiles):
    m = meta(textfiles)
    names = m['files']['train'] + m['files']['val']
    assert len(names) == 26  # 20 notes, readme, 2 .py, literal, empty, records; no csv, .git or __pycache__
    assert not set(m['files']['train']) & set(m['files']['val'])
    assert m['splits']['train']['documents'] + m['splits']['val']['documents'] == 20 + 4 + 3  # empty.txt: none


def test_textfiles_keeps_a_literal_endoftext_as_text(textfiles):
    docs = documents(textfiles, 'train') + documents(textfiles, 'val')
    assert "a literal <|endoftext|> stays plain text" in docs


def test_textfiles_gives_the_same_bytes_whatever_num_proc(corpus, textfiles, tmp_path):
    again = prepared('textfiles', tmp_path, f'--input={corpus}', '--extensions=.txt,.md,.py,.jsonl',
                     '--val_fraction=0.2', '--num_proc=2')
    for split in ('train', 'val'):
        assert ids(again, split).tobytes() == ids(textfiles, split).tobytes()
    assert meta(again)['files'] == meta(textfiles)['files']


def test_textfiles_takes_comma_separated_recursive_globs(corpus, tmp_path):
    out = prepared('textfiles', tmp_path, f'--input={corpus}/src/**/*.py,{corpus}/*.jsonl,{corpus}/*.md')
    m = meta(out)
    assert sorted(m['files']['train'] + m['files']['val']) == ['readme.md', 'records.jsonl', 'src/code.py',
                                                                 'src/deep/more.py']


def test_textfiles_stops_with_one_line_when_input_matches_nothing(tmp_path):
    result = prepare('textfiles', f'--input={tmp_path}/nothing/**/*.txt', f'--out_dir={tmp_path}/out')
    assert result.returncode == 1
    assert result.stderr.strip().count('\n') == 0 and 'matches no files' in result.stderr
    assert not os.path.exists(tmp_path / 'out')


def test_textfiles_stops_with_one_line_without_out_dir(corpus):
    result = prepare('textfiles', f'--input={corpus}')
    assert result.returncode == 1
    assert result.stderr.strip().count('\n') == 0 and '--out_dir' in result.stderr


def test_textfiles_names_the_bad_line_of_a_jsonl_file(tmp_path):
    (tmp_path / 'a.jsonl').write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (tmp_path / 'b.jsonl').write_text('{"text": "fine"}\n')
    result = prepare('textfiles', f'--input={tmp_path}/*.jsonl', f'--out_dir={tmp_path}/out')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr and "a.jsonl:2: expected a JSON object with a string field 'text'" \
        in result.stderr


def test_a_prepare_that_fails_midway_leaves_the_previous_files_together(tmp_path):
    from data.prepare_utils import split_by_file
    names = [f'doc{i}.jsonl' for i in range(12)]
    for name in names:
        (tmp_path / name).write_text('{"text": "fine words"}\n')
    prepared('textfiles', tmp_path / 'out', f'--input={tmp_path}/*.jsonl', '--val_fraction=0.3')
    before = {f: (tmp_path / 'out' / f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.json')}
    # a new train file (train.bin would change), then a val file that fails to parse
    new = next(name for name in (f'new{i}.jsonl' for i in range(100))
               if name in split_by_file([name] + names, 0.3)[0])
    (tmp_path / new).write_text('{"text": "more words"}\n')
    (tmp_path / split_by_file(names, 0.3)[1][0]).write_text('not json\n')
    result = prepare('textfiles', f'--input={tmp_path}/*.jsonl', '--val_fraction=0.3', f'--out_dir={tmp_path}/out')
    assert result.returncode == 1 and 'expected a JSON object' in result.stderr
    assert {f: (tmp_path / 'out' / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path / 'out')) == ['meta.json', 'train.bin', 'val.bin']  # no temp file left


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / 'in').mkdir()
    for i in range(4):
        (tmp_path / 'in' / f'd{i}.jsonl').write_bytes('\ufeff{"text": "hello"}\n'.encode())
    out = prepared('textfiles', tmp_path / 'out', f"--input={tmp_path / 'in'}", '--extensions=.jsonl')
    assert documents(out, 'train') + documents(out, 'val') == ['hello'] * 4


def test_an_unreadable_file_stops_with_one_line_naming_it(tmp_path):
    (tmp_path / 'in').mkdir()
    for i in range(4):
        (tmp_path / 'in' / f'd{i}.txt').write_text('words')
    (tmp_path / 'in' / 'gone.txt').symlink_to(tmp_path / 'nowhere.txt')  # a broken link, as an editor's lock file
    result = prepare('textfiles', f"--input={tmp_path / 'in'}", f'--out_dir={tmp_path}/out')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'gone.txt: cannot read it' in result.stderr


def test_out_dir_that_is_a_file_stops_with_one_line(corpus, tmp_path):
    (tmp_path / 'taken').write_text('')
    result = prepare('textfiles', f'--input={corpus}', f'--out_dir={tmp_path}/taken')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'cannot be made a folder' in result.stderr


# --- OpenWebText: needs network, and says so at once ------------------------------------------------------------

def test_openwebtext_fails_fast_offline_naming_the_offline_corpora(tmp_path):
    start = time.time()
    result = prepare('openwebtext', f'--out_dir={tmp_path}', env={'HF_DATASETS_OFFLINE': '1'})
    assert time.time() - start < 5
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.count('\n') == 0 and message.startswith('openwebtext: ')
    assert 'python data/pystdlib/prepare.py' in message and 'python data/textfiles/prepare.py' in message
