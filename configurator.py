"""
nanoGPT-style configuration: module-level defaults in the script, then Python override files
(config/*.py, exec'd in order), then --key=value arguments. Used by train.py and sample.py:

    config = configure(defaults, sys.argv[1:], prog='train.py')
    globals().update(config)

Fixes nanoGPT's known gaps: keys set by a config file are checked too (a typo is an error naming
the closest valid key), an int is accepted for a float, a None default can be overridden, values
may contain '=', and a bare --flag means --flag=True for a boolean key.
"""
import ast
import difflib
import types
from ast import literal_eval


def _closest(key, valid):
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check(key, value, defaults, where, prog):
    """Return value converted to the type of the default, or exit with one line."""
    if key not in defaults:
        raise SystemExit(f"{prog}: error: unknown config key '{key}' in {where}{_closest(key, list(defaults))}")
    default = defaults[key]
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, type(default)):
        return value
    raise SystemExit(f"{prog}: error: {key} must be {type(default).__name__} like its default "
                     f"{default!r}, got {value!r} in {where}")


def _parse(key, raw, defaults):
    """Turn the text after '=' into a Python value: a literal if it parses, else the raw string."""
    if isinstance(defaults.get(key), bool) and raw.lower() in ('true', 'false'):
        return raw.lower() == 'true'
    if isinstance(defaults.get(key), str):
        # strings are taken as typed unless quoted, so --out_dir=123 or --start=3+4 stay strings
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in '\'"':
            return literal_eval(raw)
        return raw
    try:
        return literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def configure(defaults: dict, argv: list, prog: str = 'train.py') -> tuple:
    """Apply config files and --key=value overrides to a copy of defaults.

    Returns (config, explicit): the resolved config and the set of keys the user set."""
    config = dict(defaults)
    explicit = set()
    for arg in argv:
        if not arg.startswith('--'):
            # a config file: plain Python that assigns some of the keys
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise SystemExit(f"{prog}: error: cannot read config file {arg}: {e.strerror}")
            try:
                tree = ast.parse(source, arg)
                scope = dict(config)
                exec(compile(tree, arg, 'exec'), scope)
            except Exception as e:
                tb = e.__traceback__.tb_next if e.__traceback__ else None
                line = getattr(e, 'lineno', None) or (tb.tb_lineno if tb else '?')
                raise SystemExit(f"{prog}: error: config file {arg}, line {line}: {type(e).__name__}: {e}")
            # every name the file assigns counts as set by the user, even to the default's value
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for key in sorted(assigned & scope.keys()):
                value = scope[key]
                if key.startswith('_') or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue  # helpers a config file may define
                config[key] = _check(key, value, defaults, arg, prog)
                explicit.add(key)
        else:
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                if key not in defaults:
                    _check(key, None, defaults, f"--{key}", prog)  # the unknown-key message
                if not isinstance(defaults[key], bool) and defaults[key] is not None:
                    raise SystemExit(f"{prog}: error: --{key} needs a value: --{key}=...")
                raw = 'True'
            config[key] = _check(key, _parse(key, raw, defaults), defaults, f"--{key}={raw}", prog)
            explicit.add(key)
    return config, explicit
