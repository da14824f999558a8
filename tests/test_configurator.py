"""configurator: defaults < config files < --key=value, with one-line errors naming the closest key."""
import pytest

from configurator import configure
from errors import Error

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
    with pytest.raises(Error, match='max_iters must be int'):
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
    with pytest.raises(Error) as e:
        configure(DEFAULTS, argv)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_config_file_errors(tmp_path):
    typo = tmp_path / 'typo.py'
    typo.write_text("max_iter = 5\n")
    with pytest.raises(Error, match=r"unknown config key 'max_iter' in .*typo.py \(did you mean 'max_iters'\?\)"):
        configure(DEFAULTS, [str(typo)])
    broken = tmp_path / 'broken.py'
    broken.write_text("x = (\n")
    with pytest.raises(Error, match=r"broken.py, line 1: SyntaxError"):
        configure(DEFAULTS, [str(broken)])
    wrong = tmp_path / 'wrong.py'
    wrong.write_text("compile = 'yes'\n")
    with pytest.raises(Error, match="compile must be bool"):
        configure(DEFAULTS, [str(wrong)])


def test_space_form_as_argparse():
    cfg, explicit = configure(DEFAULTS, ['--max_iters', '60', '--learning_rate', '1e-3', '--start', 'a = b'])
    assert cfg['max_iters'] == 60 and cfg['learning_rate'] == 1e-3 and cfg['start'] == 'a = b'
    assert explicit == {'max_iters', 'learning_rate', 'start'}
    # a boolean takes the next argument only when it is one; bare, it means True
    cfg, _ = configure(DEFAULTS, ['--compile', 'False', '--max_iters', '5'])
    assert cfg['compile'] is False and cfg['max_iters'] == 5
    cfg, _ = configure(DEFAULTS, ['--compile', '--max_iters', '5'])
    assert cfg['compile'] is True and cfg['max_iters'] == 5
    cfg, _ = configure(DEFAULTS, ['--compile=no', '--max_epochs', '3'])
    assert cfg['compile'] is False and cfg['max_epochs'] == 3
    for argv in (['--max_iters', '--compile'], ['--max_iters']):  # the next option is not a value
        with pytest.raises(Error, match=r"^--max_iters needs a value: --max_iters=VALUE or "
                                             r"--max_iters VALUE$"):
            configure(DEFAULTS, argv)


def test_space_form_reads_a_config_file_after_a_boolean(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("max_iters = 50\n")
    cfg, _ = configure(DEFAULTS, ['--compile', str(f)])
    assert cfg['compile'] is True and cfg['max_iters'] == 50


def test_repeatable_keys_collect_a_list(tmp_path):
    defaults = {'input': '', 'glob': ''}
    cfg, _ = configure(defaults, ['--input', 'a', '--input=b', '--glob=*.md'], repeatable={'input'})
    assert cfg == {'input': ['a', 'b'], 'glob': '*.md'}
    cfg, _ = configure(defaults, ['--input=a', '--glob=x', '--glob=y'], repeatable={'input'})
    assert cfg == {'input': 'a', 'glob': 'y'}  # once: the plain value; other keys: the last one wins
    f = tmp_path / 'c.py'
    f.write_text("input = ['x', 'y']\n")
    assert configure(defaults, [str(f)], repeatable={'input'})[0]['input'] == ['x', 'y']
    f.write_text("input = ['x', 3]\n")
    with pytest.raises(Error, match="input must be str"):
        configure(defaults, [str(f)], repeatable={'input'})


def test_ranges_refuse_text_for_a_number():
    from configurator import check_ranges
    with pytest.raises(Error, match=r"^max_epochs must be a number in \(0, inf\), got 'abc'$"):
        check_ranges({'max_epochs': 'abc'}, {'max_epochs': '(0, inf)'})
    check_ranges({'max_epochs': None}, {'max_epochs': '(0, inf)'})  # unset: fine
