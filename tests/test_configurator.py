"""configurator: defaults < config files < --key=value, with one-line errors naming the closest key."""
import pytest

from configurator import configure

DEFAULTS = {'learning_rate': 6e-4, 'max_iters': 100, 'compile': False, 'out_dir': 'out',
            'max_epochs': None, 'start': ''}


def test_overrides_and_types():
    cfg, explicit = configure(DEFAULTS, ['--learning_rate=1', '--max_iters=7', '--compile', '--out_dir=123'])
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)
    assert cfg['max_iters'] == 7 and cfg['compile'] is True and cfg['out_dir'] == '123'
    assert explicit == {'learning_rate', 'max_iters', 'compile', 'out_dir'}
    assert DEFAULTS['max_iters'] == 100  # the defaults themselves are untouched


def test_none_default_and_values_with_equals():
    cfg, _ = configure(DEFAULTS, ['--max_epochs=3', '--start=a = b == c', '--compile=false'])
    assert cfg['max_epochs'] == 3 and cfg['start'] == 'a = b == c' and cfg['compile'] is False
    with pytest.raises(SystemExit, match='max_iters must be int'):
        configure(DEFAULTS, ['--max_iters=None'])  # None only where the default is None


def test_config_file_then_command_line(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nmax_iters = 50\nlearning_rate = math.sqrt(4) * 1e-3\nout_dir = 'out'\n")
    cfg, explicit = configure(DEFAULTS, [str(f), '--max_iters=60'])
    assert cfg['max_iters'] == 60 and cfg['learning_rate'] == 2e-3
    assert explicit == {'max_iters', 'learning_rate', 'out_dir'}  # assigned, even to the default value


@pytest.mark.parametrize('argv, message', [
    (['--learnig_rate=1e-3'], "unknown config key 'learnig_rate' in --learnig_rate=1e-3 (did you mean 'learning_rate'?)"),
    (['--max_iters=1.5'], "max_iters must be int"),
    (['--learning_rate=fast'], "learning_rate must be float"),
    (['--compile=maybe'], "compile must be bool"),
    (['--max_iters'], "--max_iters needs a value"),
    (['missing_config.py'], "cannot read config file missing_config.py"),
])
def test_errors_are_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, argv)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_config_file_errors(tmp_path):
    typo = tmp_path / 'typo.py'
    typo.write_text("max_iter = 5\n")
    with pytest.raises(SystemExit, match=r"unknown config key 'max_iter' in .*typo.py \(did you mean 'max_iters'\?\)"):
        configure(DEFAULTS, [str(typo)])
    broken = tmp_path / 'broken.py'
    broken.write_text("x = (\n")
    with pytest.raises(SystemExit, match=r"broken.py, line 1: SyntaxError"):
        configure(DEFAULTS, [str(broken)])
    wrong = tmp_path / 'wrong.py'
    wrong.write_text("compile = 'yes'\n")
    with pytest.raises(SystemExit, match="compile must be bool"):
        configure(DEFAULTS, [str(wrong)])
