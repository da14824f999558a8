"""wandb logging offline: the keys users know, and a resumed run continues the same wandb run."""
import glob
import os
import subprocess
import sys

import checkpoint
from conftest import ROOT, TINY, run


def test_wandb_offline_resume_keeps_the_run(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    env = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'}
    common = [*TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={out}', '--wandb_log=True',
              '--eval_interval=3']
    run('train.py', *common, '--max_iters=3', env=env)
    first = checkpoint.load(os.path.join(out, 'latest.safetensors'))['wandb_id']
    run('train.py', *common, '--max_iters=6', '--init_from=resume', env=env)
    second = checkpoint.load(os.path.join(out, 'latest.safetensors'))['wandb_id']
    assert first and first == second
    runs = glob.glob(str(tmp_path / 'wandb' / f'offline-run-*-{first}' / f'run-{first}.wandb'))
    assert len(runs) == 2  # two processes, one wandb run id
    data = b''.join(open(r, 'rb').read() for r in runs)
    for key in ('train/loss', 'train/lr', 'train/mfu', 'train/iter', 'train/dt_ms', 'train/tokens_per_sec',
                'eval/train_loss', 'eval/val_loss', 'eval/val_ppl'):
        assert key.encode() in data, key


def test_resume_that_cannot_log_in_continues_offline(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    offline = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'}
    common = [*TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={out}', '--eval_interval=3']
    run('train.py', *common, '--wandb_log=True', '--max_iters=3', env=offline)
    first = checkpoint.load(os.path.join(out, 'latest.safetensors'))['wandb_id']
    # after a reboot, no login: the run's own config says wandb_log=True, and it still continues
    no_login = dict(offline, WANDB_MODE='online', WANDB_API_KEY='')
    r = run('train.py', *common, '--max_iters=6', env=no_login)
    assert 'resumed from' in r.stdout and 'logging offline instead' in r.stderr and 'wandb sync' in r.stderr
    assert checkpoint.load(os.path.join(out, 'latest.safetensors'))['wandb_id'] == first
    # a new run that cannot log in is refused before it starts, in one line
    r = run('train.py', *common, '--wandb_log=True', f'--out_dir={tmp_path / "new"}', '--max_iters=3',
            env=no_login, check=False)
    assert r.returncode != 0 and 'wandb could not start' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a finished run run again starts nothing: no wandb run
    before = glob.glob(str(tmp_path / 'wandb' / '*run-*'))
    r = run('train.py', *common, '--max_iters=6', env=offline)
    assert 'is complete' in r.stdout and glob.glob(str(tmp_path / 'wandb' / '*run-*')) == before


HIDE_WANDB = """
import importlib.machinery, runpy, sys
folder = sys.argv[1]
class Folder:  # `import wandb` finds only a ./wandb folder of offline runs, as without the package
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(name, [folder]) if name == 'wandb' else None
sys.meta_path.insert(0, Folder())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_a_wandb_folder_is_not_the_package(tiny_data, tmp_path):
    (tmp_path / 'wandb' / 'offline-run-1').mkdir(parents=True)
    (tmp_path / 'hide.py').write_text(HIDE_WANDB)
    p = subprocess.run([sys.executable, str(tmp_path / 'hide.py'), str(tmp_path), os.path.join(ROOT, 'train.py'),
                        *TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "out"}',
                        '--wandb_log=True'], capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT})
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert 'pip install wandb' in p.stderr and str(tmp_path / 'wandb') in p.stderr and 'not the package' in p.stderr
    assert not (tmp_path / 'out').exists()  # nothing written
