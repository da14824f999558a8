"""Every bench/ script runs at its smallest settings and prints its figures: benchmarks that cannot
rot silently. The figures are matched, never judged (speed on a shared machine is no test); the
checks a script makes itself (same scores, bit-identical, each iteration once) must hold. Each
runs in its own folder on the tiny corpus, so nothing is written into the repository but
bench_gpu.py's own data/bench_gpu_small (it takes no data flag; prepared once, then reused)."""
import json
import os
import re
import shutil
import tempfile

import pytest

from conftest import ROOT, make_corpus, run
from test_bad_input import run_inline

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--log_interval=1']

# script: the lines its output must hold. The slowest first: pytest-xdist starts them first.
FIGURES = {
    'bench_gpu.py': [r'^\[train_compiled\] [\d,]+ tokens/s, \d+ ms/iter, MFU .*% of measured',
                     r'^\[train_eager\] [\d,]+ tokens/s, \d+ ms/iter',
                     r'^\[sample\] \d+ new tokens .*: KV cache [\d,]+ tokens/s, full recompute [\d,]+',
                     r"^\[ddp\] torchrun --nproc_per_node=1 \(gloo\) exit 0, '1 process\(es\)' logged: True",
                     r'^\[ckpt\] [\d.]+ GiB state: blocked [\d.]+ s per save',
                     r"^\[muon\] [\d,]+ tokens/s.*; [\d.]+x adamw's tokens/s",
                     r'^\[fp8\] (fp8 vs float32: tiny [\d,]+ vs [\d,]+ tokens/s|skipped: .*torchao)',  # optional
                     r'^\[headloss\] \d+ rows x \d+ -> \d+: (\w+ [\d.]+ ms, ){3}\w+ [\d.]+ ms',
                     r'^\[pad\] one step of \d+x\d+ tokens: vocabulary \d+ [\d.]+ ms, \d+ [\d.]+ ms',
                     r'^\[resume\] two uninterrupted runs: .* weights bit-identical; SIGKILL at iteration \d+ and '
                     r'resumed: .* weights bit-identical',
                     r'^\[float16\] \d+ steps: .* finite: True; stopped at \d+ and resumed: scaler state equal'],
    'bench_recipe.py': [r'^timing round 1/1: .* \d+ ms, default \d+ ms$', r'^nanogpt-s1337-i\d+: whole-val loss [\d.]+',
                        r"^\| nanogpt \| nanoGPT's CPU recipe \| \d+ x nanogpt \| 1.00 \[",
                        r'^\| default \| our default \(train.py\).* \| [+-][\d.]+ vs nanogpt \|$'],
    'bench_sft.py': [r'^task: \d+ training pairs, \d+ held out, from ',
                     r'^base \(2 iters on tiny\): tiny val loss [\d.]+; held-out answer loss [\d.]+, exact match',
                     r'^\| answers only \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \|$',
                     r'^\| all tokens \| ', r'^\| replay 10% \| '],
    'torture.py': [rf'^{phase}: 1 SIGKILLs.*bit-identical to an uninterrupted run: True; log holds each iteration '
                   rf'once: True' for phase in ('kills', 'corrupt')],
    'bench_lora.py': [r'^full fine-tune: .* parameters; AdamW state [\d.]+ MiB; checkpoint [\d.]+ MiB; .* tokens/s',
                      r'^LoRA \(rank 8, .*\): .* trained: [\d.]+%\); .* tokens/s',
                      r"^LoRA: [\d.]+x the full fine-tune's tokens/s; its checkpoint is [\d.]+% of the full one's"],
    'bench.py': [r'^train default config: [\d,]+ tokens/s, [\d.]+ ms/iter; checkpoint [\d.]+ MB written in \d+ ms',
                 r'^train config/python_code.py: [\d,]+ tokens/s',
                 r'^sample: 10 new tokens .*: KV cache \d+ tok/s, full recompute \d+ tok/s, ratio [\d.]+x'],
    'bench_train.py': [r'MFLOP/token; given float32 matmul peak 100 GFLOP/s',
                       r'^compile=False: [\d,]+ tokens/s, MFU [\d.]+% of the given peak',
                       r"^where an eager iteration's time goes", r'^  aten::\S+ +[\d.]+%'],
    'bench_ckpt.py': [r'^default: state [\d.]+ GB; blocked per save: sync [\d.]+ s \(.*\), background [\d.]+ s',
                      r'ckpt_interval 200 x [\d.]+ s/iter \(measured here\) .* overhead sync [\d.]+%, '
                      r'background [\d.]+%'],
    'bench_eval.py': [r'^batch_size=1 +[\d.]+ items/s',
                      r'^batch_size=4 +[\d.]+ items/s \(range .*\), [\d.]+x one forward per choice; same scores '
                      r'\(log-likelihoods within [\d.e-]+, accuracy on the \d+ of 8 items whose two best differ '
                      r'by more\)$'],
    'bench_prepare.py': [r'^corpus: 40 files',
                         r'^bpe 300 *: +[\d.]+s wall, end to end +[\d.]+ MB/s, peak RSS +\d+ MB, [\d,]+ tokens',
                         r'^byte +: +[\d.]+s wall', r'^cache hit: [\d.]+s wall',
                         r'^encode only: tiktoken [\d.]+ MB/s, HF encode_batch [\d.]+ MB/s .* identical ids in '
                         r'(\d+)/\1 pieces'],
    'glossary.py': [(r'^wrote glossary: 20 documents \(200 sentences\) in kormed/, 32 training pairs, '
                     r'8 held out, an exam of 40 items$')],
}


def smallest(script, data, folder):
    """The script's arguments at its smallest settings; folder is its own."""
    model = [*TINY, f'--data_dir={data}', '--dataset=tiny']
    if script == 'bench_gpu.py':  # every section on a tiny model, eager; it prepares its own data (below)
        return ['--small', '--device=cpu', f'--out={folder / "out"}']
    if script == 'torture.py':
        return ['--kills=1', '--corrupt=1', '--iters=40', '--slow=0.05']
    if script == 'bench_lora.py':
        return ['--rounds=1', '--iters=4', *model]
    if script == 'bench.py':  # its prepare section is bench_prepare.py, run below
        return ['--only=train,sample', '--iters=4', '--new_tokens=10', *model]
    if script == 'bench_recipe.py':  # --smoke: two rows, one seed, a few iterations
        return ['--smoke', '--threads=1', f'--data_dir={data}', '--dataset=tiny', f'--out_dir={folder / "out"}']
    if script == 'bench_train.py':  # --peak_flops given: nothing measured, or written to the peak cache
        return ['--iters=4', '--compile=off', '--peak_flops=1e11', *model]
    if script == 'bench_ckpt.py':
        (folder / 'ckpt').mkdir()
        return ['--states=default', '--rounds=1', f'--dir={folder / "ckpt"}']
    if script == 'bench_eval.py':
        return [f'--data={data}/tiny', '--items=8', '--rounds=1', '--batch_sizes=4']
    if script == 'bench_sft.py':  # --smoke: a few iterations; a copy of the data: it prepares beside it
        shutil.copytree(os.path.join(data, 'tiny'), folder / 'data' / 'tiny')
        return ['--smoke', '--replay=0.1', f'--data_dir={folder / "data"}', '--dataset=tiny',
                f'--out_dir={folder / "out"}']
    if script == 'bench_prepare.py':
        make_corpus(folder / 'corpus')
        return [f'--input={folder / "corpus"}', '--vocab_size=300', '--min_split_tokens=33']
    if script == 'glossary.py':
        return ['--out=glossary', '--docs=20']
    raise ValueError(script)


@pytest.mark.parametrize('script', FIGURES)
def test_smoke(script, tiny_data, tmp_path):
    """Each script in its own test, so that pytest-xdist's workers run them side by side."""
    args = smallest(script, tiny_data, tmp_path)
    out = run(os.path.join('bench', script), *args, cwd=tmp_path).stdout
    for pattern in FIGURES[script]:  # run() raises if the script exits non-zero
        assert re.search(pattern, out, re.M), f"{script}: no line matching {pattern!r} in:\n{out}"
    assert 'FAILED' not in out, out
    if script == 'bench_ckpt.py':
        assert os.listdir(tmp_path / 'ckpt') == [], "bench_ckpt.py removes its checkpoints"
    if script == 'glossary.py':  # the same call writes the same bytes
        def written():
            return {p: p.read_bytes() for p in (tmp_path / 'glossary').rglob('*') if p.is_file()}
        first = written()
        run(os.path.join('bench', script), *args, cwd=tmp_path)
        assert len(first) == 20 + 3 and written() == first
    if script == 'bench_gpu.py':  # a failed section is reported in its JSON, not by the exit status
        with open(tmp_path / 'out' / 'bench_gpu.json') as f:
            sections = json.load(f)['sections']
        assert not [s for s in sections.values() if s['status'].startswith('failed')], sections


def test_every_script_is_covered():
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, 'bench')) if f.endswith('.py'))
    assert scripts == sorted(FIGURES), "a bench/ script without a smoke run here (or one that is gone)"


# script: [(arguments, what its one error line says)]: unknown names in a list, counts below 1,
# sizes not positive; each refused before any work (run in this process: torch is loaded already)
BAD = {
    'bench.py': [('--only=trian', "--only takes sections among prepare,train,sample, got 'trian'"),
                 ('--only=', '--only takes'), ('--iters=0', '--iters must be at least 1'),
                 ('--new_tokens=-1', '--new_tokens must be at least 1, got -1')],
    'bench_ckpt.py': [('--states=default,tiny', '--states takes names among default,python_code'),
                      ('--states=', '--states takes'), ('--rounds=0', '--rounds must be at least')],
    'bench_eval.py': [('--items=0', '--items must be at least 1'), ('--rounds=0', '--rounds must'),
                      ('--batch_sizes=16,0', '--batch_sizes takes comma-separated counts of at'),
                      ('--batch_sizes=16,x', '--batch_sizes takes')],
    'bench_gpu.py': [('--only=train,ddp', '--only takes sections among train_compiled,'),
                     ('--only=', '--only takes'), ('--iters=0', '--iters must be at least 1'),
                     ('--batch_size=0', '--batch_size must'), ('--budget_s=0', '--budget_s must'),
                     ('--budget_s=nan', '--budget_s must be a positive number of seconds, got')],
    'bench_lora.py': [('--rounds=0', '--rounds must be at least 1'), ('--iters=0', '--iters must')],
    'bench_prepare.py': [('--vocab_sise=300', "unknown config key 'vocab_sise'")],  # prepare.py's
    'bench_recipe.py': [('--only=nanogpt,bogus', '--only takes rows among nanogpt,old,default'),
                        ('--only=', '--only takes rows'), ('--jobs=0', '--jobs must be at least 1'),
                        ('--threads=0', '--threads must'), ('--rounds=0', '--rounds must'),
                        ('--timing_iters=0', '--timing_iters must'), ('--scale=0', '--scale must'),
                        ('--scale=-1', '--scale must be a positive number, got -1.0'),
                        ('--seeds=1337,x', '--seeds takes comma-separated whole numbers')],
    'bench_sft.py': [('--iters=0', '--iters must be at least 1'), ('--base_iters=0', '--base_iters must'),
                     ('--pairs=0', '--pairs must'), ('--learning_rate=0', '--learning_rate must be a positive'),
                     ('--seeds=1,x', '--seeds takes comma-separated whole numbers'),
                     ('--replay=0.1,1', '--replay takes comma-separated shares'), ('--replay=x', '--seeds takes')],
    'bench_train.py': [('--iters=0', '--iters must be at least 1')],
    'glossary.py': [('--docs=0', '--docs must be at least 1, got 0'),
                    ('--sentences=41', '--sentences must be at most 40')],
    'torture.py': [('--kills=-1', '--kills must be at least 0'), ('--corrupt=-1', '--corrupt must'),
                   ('--iters=0', '--iters must be at least 1'), ('--slow=-0.1', '--slow must'),
                   ('--kills=0 --corrupt=0', '--kills=0 and --corrupt=0 test nothing')],
}
CASES = [(script, *case) for script, cases in BAD.items() for case in cases]


@pytest.mark.parametrize('script, bad, message', CASES)
def test_bad_input_is_one_line_before_any_work(script, bad, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # where a script's temporary folders go
    where = {'bench_ckpt.py': f'--dir={tmp_path}', 'bench_recipe.py': f'--out_dir={tmp_path}/out'}
    argv = [where[script]] if script in where else []
    status, lines = run_inline(os.path.join('bench', script), [*argv, *bad.split()])
    errors = [line for line in lines if 'error' in line]  # argparse's: usage, then the error line
    assert status in (1, 2) and errors == lines[-1:], (status, lines)
    assert lines[-1].startswith(f'{script}: error: ') and message in lines[-1], lines
    assert os.listdir(tmp_path) == [], "nothing written"


def test_every_script_has_bad_input_cases():
    assert sorted(BAD) == sorted(FIGURES)
