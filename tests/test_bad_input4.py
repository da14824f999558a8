"""Bad input, part 4: the error path's last misses, each one line with nothing written: a train.lock
that is not a note of ours, a damaged log.jsonl line, min_lr above learning_rate, a key given with
no value (or a number for a file name)."""
import os
import shutil

from conftest import N, args, read_log, run
from test_bad_input import check, data, out  # noqa: F401  (fixtures)
from test_rerun import digests


def test_a_lock_that_is_not_a_note_of_ours_is_refused(reference, tiny_data, tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_text('my notes\n')
    run_dir = tmp_path / 'run'
    shutil.copytree(reference, run_dir)
    lock = run_dir / 'train.lock'
    for make, expect in ((lambda: lock.symlink_to(victim), 'symbolic link'),
                         (lambda: os.link(victim, lock), 'hard link'),
                         (lambda: lock.write_text('not a note\n'), 'not a lock note'),
                         (lambda: lock.mkdir(), 'Is a directory')):
        make()
        before = digests(run_dir)
        check('train.py', args(tiny_data, str(run_dir), f'--max_iters={N + 2}'), expect, [str(tmp_path)])
        assert victim.read_text() == 'my notes\n' and digests(run_dir) == before
        (lock.rmdir if lock.is_dir() and not lock.is_symlink() else lock.unlink)()
    r = run('train.py', *args(tiny_data, str(run_dir), f'--max_iters={N + 2}'))  # its own note: fine
    assert 'resumed from' in r.stdout and not lock.exists()


def test_a_damaged_log_line_is_set_aside(reference, tiny_data, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(reference, run_dir)
    damaged = [b'{"step": null, "loss": 1.0}\n', b'\xff\xfe{"step": 3}\n', b'{"step": true}\n', b'[1, 2]\n',
               b'{"loss": 2.0}\n', b'{"step": 7, "lo']
    with open(run_dir / 'log.jsonl', 'ab') as f:
        f.write(b''.join(damaged))
    r = run('train.py', *args(tiny_data, str(run_dir), f'--max_iters={N + 2}'))
    assert 'resumed from' in r.stdout and '6 damaged lines' in r.stderr and 'set aside' in r.stderr
    steps = [e['step'] for e in read_log(str(run_dir))]  # every line a record again
    assert steps == sorted(steps) and max(steps) == N + 2
    assert (run_dir / 'log.jsonl.dropped').read_bytes().endswith(b''.join(damaged))


def test_settings_that_contradict_each_other(data, out):
    base = ['--dataset=tiny', f'--data_dir={data}', '--n_layer=1', '--n_head=1', '--n_embd=8', '--block_size=8',
            f'--out_dir={out}-new']
    check('train.py', [*base, '--learning_rate=1e-3', '--min_lr=1e-2'], 'min_lr=0.01 is above learning_rate=0.001',
          [data, out])
    assert not os.path.exists(f'{out}-new')


def test_a_key_given_with_no_value(data, out, tmp_path):
    ev = ['evaluate.py', f'--out_dir={out}', '--split=', '--generate=False']
    for script, *argv, expect in ((*ev, '--json', '--json needs a value'), (*ev, '--mcq', '--mcq needs a value'),
                                  (*ev, '--json=3', '3 is not a file name'),
                                  (*ev, '--mcq=12', '12 is not a file name'),
                                  ('sample.py', f'--out_dir={out}', '--top_k', '--top_k needs a value'),
                                  ('train.py', '--eval_mcq', '--max_iters=1', '--eval_mcq needs a value'),
                                  ('train.py', f'--out_dir={tmp_path / "o"}', f'--data_dir={data}',
                                   '--dataset=tiny', '--eval_mcq=5', '5 is not a file name')):
        check(script, argv, expect, [data, out])
    assert not os.path.exists(tmp_path / 'o')
