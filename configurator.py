"""
nanoGPT-style configuration: module-level defaults in the script, then Python override files
(config/*.py, exec'd in order), then --key=value (or --key value) arguments. Used by the top-level
scripts:

    config, explicit = configure(defaults, sys.argv[1:], source=__file__)
    globals().update(config)
    check_ranges(config, {'batch_size': '[1, inf)', 'dropout': '[0, 1)'})

Fixes nanoGPT's known gaps: keys set by a config file are checked too (a typo is an error naming
the closest valid key), an int is accepted for a float, a None default can be overridden, values
may contain '=', and a bare --flag means --flag=True for a boolean key (true/false, yes/no, 1/0 all
work); any other key needs a value. As with argparse, --key value works too: a key that is not
boolean takes the next argument as its value unless that starts with '--', a boolean one only when
it is one of those words (so `--force config/x.py` still reads x.py). -h / --help prints the
script's docstring and its block of defaults, comments included.

Config files are Python and are executed, as in nanoGPT: run only config files you trust.

Every value is checked against its default's type, and past_int64 refuses an int that no torch
call takes, whatever the key; check_ranges holds values to their intervals.
"""
import ast
import difflib
import math
import os
import sys
import types
from ast import literal_eval

from errors import Error
from files import read_text


def _closest(key, valid):
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def fits(value, default) -> bool:
    """Whether value may stand for a key whose default is `default`: the same type, an int for a
    float, anything for a None default (a resumed checkpoint's config is held to this too)."""
    if default is None:
        return True
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return isinstance(value, type(default))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and (isinstance(default, float) or isinstance(value, int))


# torch's integers (sizes, counts, seeds): a larger one is an OverflowError deep inside
INT64 = (-2 ** 63, 2 ** 63 - 1)


def past_int64(value) -> bool:
    """Whether value is an int that no torch call takes, whatever the key (every script's ints)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and not INT64[0] <= value <= INT64[1])


def _check(key, value, defaults, where):
    """Return value converted to the type of the default, or Error in one line."""
    if key not in defaults:
        raise Error(f"unknown config key '{key}' in {where}{_closest(key, list(defaults))}")
    default = defaults[key]
    if not fits(value, default):
        raise Error(f"{key} must be {type(default).__name__} like its default {default!r}, "
                    f"got {value!r} in {where}")
    if past_int64(value):
        raise Error(f"{key}={value} is past the 64-bit integers torch takes (at most {INT64[1]}) "
                    f"in {where}")
    return float(value) if isinstance(default, float) else value


BOOL_WORDS = {'true': True, 'false': False, 'yes': True, 'no': False, '1': True, '0': False}


def _parse(key, raw, defaults):
    """Turn the text after '=' into a Python value: a literal if it parses, else the raw string."""
    if isinstance(defaults.get(key), bool) and raw.lower() in BOOL_WORDS:
        return BOOL_WORDS[raw.lower()]
    if isinstance(defaults.get(key), str):
        # strings are taken as typed unless quoted, so --out_dir=123 or --start=3+4 stay strings
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in '\'"':
            return literal_eval(raw)
        return raw
    try:
        return literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _defaults_block(text):
    """The lines between a script's first '# ---' rule and 'defaults = ': its keys, their defaults
    and the comments saying what they do."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('# ---')), len(lines))
    block = []
    for line in lines[start + 1:]:
        if line.startswith('defaults = '):
            break
        if not line.startswith('# ---'):
            block.append(line)
    return block


def print_help(source):
    """The script's docstring, then its defaults block, where every key sits with its default and
    a comment saying what it does."""
    with open(source, encoding='utf-8') as f:
        text = f.read()
    out = [(ast.get_docstring(ast.parse(text)) or '').strip(), '',
           "Config keys and their defaults; set them in a config file (Python, executed: use only "
           "files you trust) or as --key=value or --key value:", '']
    out += [f"  {line}" for line in _defaults_block(text)]
    try:
        sys.stdout.write('\n'.join(out) + '\n')
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, 'w')


def script_keys(source) -> set:
    """The keys another script's defaults block assigns. sample.py and evaluate.py pass train.py's
    as configure(ignore=...), so the config file that trained a run can be given to them."""
    with open(source, encoding='utf-8') as f:
        tree = ast.parse('\n'.join(_defaults_block(f.read())))
    return {n.id for n in ast.walk(tree)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def script_defaults(source, argv=()) -> dict:
    """A script's config defaults, read off its defaults block without running the script (the
    literal ones), with the config files and --key=value in argv applied as the script would apply
    them: how bench/ learns train.py's settings."""
    with open(source, encoding='utf-8') as f:
        tree = ast.parse('\n'.join(_defaults_block(f.read())))
    defaults = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                defaults[node.targets[0].id] = literal_eval(node.value)
            except ValueError:  # a default from a module (metrics.MCQ_TEMPLATE): not a literal
                pass
    return configure(defaults, list(argv))[0]


def configure(defaults: dict, argv: list, source: str = None, ignore=(), repeatable=()) -> tuple:
    """Apply config files and --key=value / --key value overrides to a copy of defaults.

    Returns (config, explicit): the resolved config and the set of keys the user set.
    With -h or --help in argv: prints the help of `source` (the script's file) and exits 0.
    ignore: keys that a config file may set for another script (see script_keys): skipped silently
    there, still an error on the command line.
    repeatable: keys that take several values, like argparse's action='append': given twice on the
    command line, or as a list in a config file, the value is a list of them (each of the default's
    type)."""
    if source and ('-h' in argv or '--help' in argv):
        print_help(source)
        raise SystemExit(0)
    config = dict(defaults)
    explicit = set()
    on_command_line = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('--'):
            # a config file: plain Python that assigns some of the keys
            source = read_text(arg, 'config file')
            try:
                tree = ast.parse(source, arg)
                scope = dict(config)
                exec(compile(tree, arg, 'exec'), scope)
            except Exception as e:
                tb = e.__traceback__.tb_next if e.__traceback__ else None
                line = getattr(e, 'lineno', None) or (tb.tb_lineno if tb else '?')
                raise Error(f"config file {arg}, line {line}: {type(e).__name__}: {e}") from None
            # every name the file assigns counts as set by the user, even to the default's value
            assigned = {n.id for n in ast.walk(tree)
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for key in sorted(assigned & scope.keys()):
                value = scope[key]
                helper = isinstance(value, (types.ModuleType, types.FunctionType, type))
                if key.startswith('_') or helper:
                    continue  # helpers a config file may define
                # another script's key, e.g. batch_size in a training config given to sample.py
                if key in ignore and key not in defaults:
                    continue
                if key in repeatable and isinstance(value, list):
                    config[key] = [_check(key, v, defaults, arg) for v in value]
                else:
                    config[key] = _check(key, value, defaults, arg)
                explicit.add(key)
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            if key not in defaults:
                _check(key, None, defaults, f"--{key}")  # the unknown-key message
            default = defaults[key]
            following = argv[i] if i < len(argv) else None
            if isinstance(default, bool):
                # a boolean takes the next argument only when it is one,
                # so `--force config.py` still works
                takes = following is not None and following.lower() in BOOL_WORDS
            else:  # anything else takes it unless it is the next option (`--input --force`)
                takes = following is not None and not following.startswith('--')
            if takes:
                raw = following
                i += 1
            elif isinstance(default, bool):
                raw = 'True'  # a bare flag
            else:  # a None default too: a path key (--json) must not become True
                raise Error(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
        value = _check(key, _parse(key, raw, defaults), defaults, f"--{key}={raw}")
        if key in repeatable and key in on_command_line:
            previous = config[key]
            value = (previous if isinstance(previous, list) else [previous]) + [value]
        config[key] = value
        explicit.add(key)
        on_command_line.add(key)
    return config, explicit


def check_ranges(config: dict, ranges: dict, where: str = '') -> None:
    """Error with one line per value outside its interval, written '[1, inf)', '(0, 1]', ...;
    None passes (an unset optional key), a float must be finite and an int a 64-bit one (past_int64)
    whatever its interval.
    `where` ends each line, e.g. ' (in the config of out/latest.safetensors)'."""
    problems = []
    for key, interval in ranges.items():
        value = config[key]
        if value is None:
            continue
        # a key with a None default takes any value: not a number here
        if isinstance(value, (bool, str)):
            problems.append(f"{key} must be a number in {interval}, got {value!r}{where}")
            continue
        lo, hi = (float(b) for b in interval[1:-1].split(','))
        ok = (not past_int64(value) and math.isfinite(value)
              and (lo <= value if interval[0] == '[' else lo < value)
              and (value <= hi if interval[-1] == ']' else value < hi))
        if not ok:
            problems.append(f"{key} must be in {interval}, got {value!r}{where}")
    if problems:
        raise Error('\n'.join(problems))
