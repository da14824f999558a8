"""One command line for every script: --key value as well as --key=value, -h / --help listing every
key with its default, errors that start with the script's name; prepare.py's old flags; progress on
a terminal's stderr only; what prepare.py reports."""
import importlib.util
import json
import os

import pytest

from configurator import script_keys
from conftest import ROOT, make_corpus, run, run_on_tty


@pytest.mark.parametrize('script', ['prepare.py', 'train.py', 'sample.py', 'evaluate.py', 'export.py'])
def test_help_lists_every_key_with_its_default(script):
    p = run(script, '--help')
    assert p.stderr == '' and '--key=value or --key value' in p.stdout
    keys = script_keys(os.path.join(ROOT, script))
    assert len(keys) >= 5
    missing = [k for k in keys if f'\n  {k} = ' not in p.stdout]
    assert not missing, missing


def test_space_form_in_every_script(tmp_path):
    make_corpus(tmp_path / 'corpus', n_docs=12)
    p = run('prepare.py', '--input', str(tmp_path / 'corpus'), '--dataset', 'spaced', '--data_dir', str(tmp_path / 'data'),
            '--tokenizer', 'byte', '--val_fraction', '0.25', '--min_split_tokens', '16', '--force')
    assert (tmp_path / 'data' / 'spaced' / 'meta.json').exists() and 'prepare: wrote' in p.stdout
    (tmp_path / 'out').mkdir()
    log = [{'step': 10, 'loss': 3.0, 'lr': 1e-3, 'tokens_per_sec': 900.0}, {'step': 10, 'train_loss': 3, 'val_loss': 3.1}]
    (tmp_path / 'out' / 'log.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in log))
    if importlib.util.find_spec('matplotlib'):  # optional dependency
        run('evaluate.py', '--out_dir', str(tmp_path / 'out'), '--plot', str(tmp_path / 'c.png'))
        assert (tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'
    # sample.py and export.py: the value after the space arrives (and the error names the script)
    for script, args, message in (
            ('sample.py', ['--start', f'FILE:{tmp_path / "nothing.txt"}'], f'cannot read prompt file {tmp_path / "nothing.txt"}'),
            ('export.py', ['--format', 'onnx', '--out', 'x'], "format must be 'sturdygpt' or 'hf', got 'onnx'"),
            ('evaluate.py', ['--stride', 'abc'], "stride must be a number in [1, inf), got 'abc'")):
        p = run(script, '--out_dir', str(tmp_path / 'out'), *args, check=False)
        assert p.returncode != 0 and p.stderr.startswith(f'{script}: error: ') and message in p.stderr, p.stderr
        assert p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr


def test_prepare_old_flags_and_a_config_file(tmp_path):
    make_corpus(tmp_path / 'a', n_docs=6)
    make_corpus(tmp_path / 'b', n_docs=6)
    (tmp_path / 'b' / 'notes.md').write_text('# not python\n' * 50)
    flags = ['--input=' + str(tmp_path / 'a'), '--input', str(tmp_path / 'b'), '--glob=*.py', '--text_key=text',
             '--dataset=ab', f'--data_dir={tmp_path / "data"}', '--tokenizer=bpe', '--vocab_size=300',
             '--bpe_train_bytes=1e5', '--val_fraction=0.3', '--min_split_tokens=16', '--strict=0', '--force=1']
    p = run('prepare.py', *flags)
    meta = json.loads((tmp_path / 'data' / 'ab' / 'meta.json').read_text())
    assert meta['inputs']['files'] == 12 and len(meta['settings']['inputs']) == 2  # both --input, no .md
    assert meta['settings']['bpe_train_bytes'] == 100000 and meta['settings']['vocab_size'] == 300
    config = tmp_path / 'ab.py'
    config.write_text(f"input = [{str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r}]\nglob = '*.py'\ndataset = 'ab'\n"
                      f"data_dir = {str(tmp_path / 'data')!r}\nvocab_size = 300\nbpe_train_bytes = 100_000\n"
                      "val_fraction = 0.3\nmin_split_tokens = 16\n")
    p = run('prepare.py', str(config))
    assert 'is up to date, reused it' in p.stdout  # the same dataset as the flags made
    for args, message in ((['--vocab_size', '100'], 'prepare.py: error: --vocab_size=100 does not fit'),
                          (['--max_docs=many'], "prepare.py: error: --max_docs='many' must be a whole number"),
                          (['--tokenizer', str(config)], f'prepare.py: error: {config} is not a tokenizer.json')):
        p = run('prepare.py', str(config), *args, check=False)
        assert p.returncode != 0 and p.stderr.startswith(message) and p.stderr.count('\n') == 1, p.stderr


def test_prepare_progress_on_a_terminal_only(tmp_path):
    make_corpus(tmp_path / 'corpus', n_docs=12)
    args = [f'--input={tmp_path / "corpus"}', f'--data_dir={tmp_path / "data"}', '--tokenizer=byte',
            '--val_fraction=0.25', '--min_split_tokens=16', '--force']
    code, out, err = run_on_tty('prepare.py', *args)
    assert code == 0 and 'prepare: reading' in err and 'prepare: encoding' in err and '%|' in err
    assert 'prepare: wrote' in out and '\r' not in out and '%|' not in out  # stdout: the summary only
    p = run('prepare.py', *args)  # stderr a pipe, as in a log: no bars at all
    assert p.stderr == '' and 'prepare: wrote' in p.stdout


def test_prepare_names_skipped_files_and_counts_only_bytes_read(tmp_path):
    make_corpus(tmp_path / 'corpus', n_docs=12)
    for i in range(8):
        (tmp_path / 'corpus' / f'bin{i}.py').write_bytes(b'\0binary\0')
    p = run('prepare.py', f'--input={tmp_path / "corpus"}', f'--data_dir={tmp_path / "data"}', '--tokenizer=byte',
            '--val_fraction=0.25', '--min_split_tokens=16')
    named = [line for line in p.stdout.splitlines() if line.startswith('prepare: skipped ')]
    assert named[0] == f'prepare: skipped {tmp_path / "corpus" / "bin0.py"}: binary file (NUL bytes)'
    assert len(named) == 6 and named[-1].startswith('prepare: skipped ... and 3 more')
    (tmp_path / 'corpus' / 'zz_big.py').write_text('x = 1\n' * 400_000)  # 2.4 MB, sorted last: never read
    p = run('prepare.py', f'--input={tmp_path / "corpus"}', f'--data_dir={tmp_path / "data"}', '--tokenizer=byte',
            '--val_fraction=0.25', '--min_split_tokens=16', '--max_docs=4')
    meta = json.loads((tmp_path / 'data' / 'corpus' / 'meta.json').read_text())
    read = sum(s['bytes'] for s in meta['splits'].values())
    assert 0 < read < 10_000 and '2.4 MB, keeping the first 4 documents' in p.stdout
    assert f'prepare: {read / 1e6:.1f} MB in ' in p.stdout and 'prepare: 2.4 MB in' not in p.stdout
