"""
Where a training run's numbers go: out_dir/log.jsonl always, Weights & Biases and TensorBoard when
the config asks, and out_dir/summary.json at the end. A record is a dict with 'step', one per log
line or eval.

    check(config)                           the loggers asked for import, before anything is written
    Log(config, iter_num, wandb_id, ...)    .write(record), .close(); rank 0's, nothing for others
    iter_line(record, max_iters, left)      the log line of an iteration's record
    trim(out_dir, last_iter)                a resumed run's log.jsonl holds each iteration once
    write_summary(out_dir, summary)

A write that fails is one line (an Error) naming the file and the OS's reason, and leaves the files
that were there intact; Log.write keeps the first such line in .error, for train.py to stop at the
end of that iteration rather than in the middle of it.
"""
import json
import os

import metrics
from errors import Error, oneline, warn
from files import write_atomic

# our record keys -> the names wandb and TensorBoard show (nanoGPT's panels: mfu in percent)
KEYS = {'loss': 'train/loss', 'lr': 'train/lr', 'mfu': 'train/mfu', 'step': 'train/iter',
        'ms_per_iter': 'train/dt_ms', 'tokens_per_sec': 'train/tokens_per_sec',
        'peak_mem_gib': 'train/peak_mem_gib',
        'peak_mem_reserved_gib': 'train/peak_mem_reserved_gib', 'train_loss': 'eval/train_loss',
        'val_loss': 'eval/val_loss', 'val_ppl': 'eval/val_ppl',
        **{k: f'eval/{k}' for k in metrics.TRAINING_KEYS}}


def check(config):
    """Error now, before anything is written, if a logger the config asks for is not installed."""
    if config['tensorboard_log']:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise Error("tensorboard_log=True needs tensorboard: pip install tensorboard") from None
    if config['wandb_log']:
        try:
            import wandb
        except ImportError:
            raise Error("wandb_log=True needs wandb: pip install wandb") from None
        # a folder named wandb (its offline runs) stood in for it
        if getattr(wandb, '__file__', None) is None:
            raise Error(f"wandb_log=True needs wandb: pip install wandb "
                        f"(the folder {list(wandb.__path__)[0]} "
                        f"holds wandb's runs, it is not the package)")


class Log:
    """Rank 0's logs of one training process (other ranks pass active=False: it then does
    nothing)."""

    def __init__(self, config, iter_num, wandb_id, continuing, active=True):
        """Start wandb and TensorBoard as config asks. A new run whose wandb cannot start (no login,
        no network) is an Error; a run that goes on (a requeue, a reboot) must not stop for its
        logger, so it logs offline with a warning, and `wandb sync` uploads that later."""
        self.out_dir, self.wandb, self.tb = config['out_dir'], None, None
        self.wandb_from, self.error = 0, None
        self.wandb_id = wandb_id  # kept in checkpoints: a resumed run logs into the same wandb run
        if not active:
            return
        if config['wandb_log']:
            import wandb
            args = dict(project=config['wandb_project'], name=config['wandb_run_name'],
                        config=config, id=wandb_id, resume='allow')
            try:
                self.wandb = wandb.init(**args)
            except Exception as e:  # not logged in, or no network
                why = ' '.join(str(e).split())[:200]
                if not continuing:
                    raise Error(f"wandb could not start ({why}); log in with `wandb login` or "
                                f"WANDB_API_KEY, or log locally with WANDB_MODE=offline") from None
                warn(f"wandb could not start ({why}); logging offline instead: "
                     f"`wandb sync` uploads it into the same run later")
                self.wandb = wandb.init(**args, mode='offline')
            self.wandb_id = self.wandb.id
            # after a kill -9 the iterations since the checkpoint run again; wandb already has
            # them (the same numbers on a deterministic run) and refuses steps below its own, so
            # they are not re-sent
            self.wandb_from = self.wandb.step
        if config['tensorboard_log']:
            from torch.utils.tensorboard import SummaryWriter
            path = os.path.join(self.out_dir, 'tb')
            try:
                # purge_step: a resumed run hides what a killed process logged after its checkpoint
                self.tb = SummaryWriter(path, purge_step=iter_num or None, flush_secs=10)
                text = '\n'.join(f"    {k} = {v!r}" for k, v in config.items())
                self.tb.add_text('config', text, iter_num)
            except OSError as e:
                raise Error(f"cannot write {path}: {oneline(e)}") from None

    def write(self, record):
        """record to log.jsonl, and its numbers to wandb and TensorBoard; a failed write sets
        .error."""
        step = record['step']
        scalars = {KEYS.get(k, f'eval/{k}'): v for k, v in record.items()  # eval/val_loss/NAME
                   if (k in KEYS or k.startswith('val_loss/')) and v is not None}
        try:
            path = os.path.join(self.out_dir, 'log.jsonl')
            with open(path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.tb:
                path = os.path.join(self.out_dir, 'tb')
                for k, v in scalars.items():
                    if k != KEYS['step']:  # TensorBoard's x axis is the step
                        self.tb.add_scalar(k, v, step)
        except OSError as e:
            self.error = self.error or f"cannot write {path}: {oneline(e)}"
        if self.wandb and step >= self.wandb_from:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            try:
                self.tb.close()
            except OSError as e:
                path = os.path.join(self.out_dir, 'tb')
                raise Error(f"cannot write {path}: {oneline(e)}") from None


def trim(out_dir, last_iter):
    """Drop the records after last_iter (work a kill -9 lost, about to be redone) from the live log,
    so it holds each iteration once, and set aside lines that are no record (cut short by a kill,
    bytes that are not UTF-8, a step that is not a count); both go to log.jsonl.dropped. Both files
    are written whole beside the old ones and renamed over them: a failed write changes neither."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    except OSError as e:
        raise Error(f"cannot read {path}: {oneline(e)}") from None
    keep, later, damaged = [], [], []
    for line in lines:
        try:
            step = json.loads(line.decode("utf-8"))["step"]
        except (ValueError, TypeError, KeyError):
            step = None
        if not isinstance(step, int) or isinstance(step, bool):
            damaged.append(line)
        else:
            (keep if step <= last_iter else later).append(line)
    if not later and not damaged:
        return
    try:
        with open(path + ".dropped", "rb") as f:
            dropped = f.readlines()
    except FileNotFoundError:
        dropped = []
    except OSError as e:
        raise Error(f"cannot read {path}.dropped: {oneline(e)}") from None
    write_atomic(path + ".dropped", b"".join(dropped + later + damaged))
    write_atomic(path, b"".join(keep))
    if later:
        print(f"log.jsonl: {len(later)} records after iter {last_iter} moved to log.jsonl.dropped")
    if damaged:
        warn(f"{path}: {len(damaged)} damaged lines (not a record with a step count) set aside in "
             f"log.jsonl.dropped")


def iter_line(r, max_iters, left) -> str:
    """The log line of train.py's record r, `left` its estimate of the seconds to go:
    iter 120/1850: loss 4.7019, lr 8.00e-03, 220.6ms, 9.3k tok/s, mfu 33.2%, eta 6.4min"""
    speed = "warm-up"  # the first interval's time holds the start-up: not a speed
    if r['ms_per_iter']:
        mfu = f"{r['mfu']:.1f}%" if r['mfu'] else 'unknown'
        eta = (f"{left / 3600:.1f}h" if left >= 7200 else f"{left / 60:.1f}min" if left >= 60
               else f"{left:.0f}s")
        speed = (f"{r['ms_per_iter']:.1f}ms, {r['tokens_per_sec'] / 1000:.1f}k tok/s, mfu {mfu}, "
                 f"eta {eta}")
    if 'peak_mem_gib' in r:  # this rank's peak GPU memory: used by tensors, and held
        speed += f", {r['peak_mem_gib']:.1f} GiB ({r['peak_mem_reserved_gib']:.1f} reserved)"
    return f"iter {r['step']}/{max_iters}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, {speed}"


def write_summary(out_dir, summary):
    write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
