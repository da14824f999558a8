"""wandb logging offline: the keys users know, and a resumed run continues the same wandb run."""
import glob
import os

import checkpoint
from conftest import TINY, run


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
