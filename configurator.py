"""
The one config mechanism shared by every script (nanoGPT's, made strict).

A script declares its defaults as module globals, then calls

    from configurator import configure
    config = configure(globals())

Each command-line argument is either a config file (`config/foo.py`, exec'd over the defaults)
or a `--key=value` override (the value is parsed as a Python literal, else taken as a string):

    python train_teacher.py config/train_teacher_pystdlib_cpu.py --batch_size=32 --compile=False

An unknown key or a value of the wrong type stops the script with a one-line error that names
the valid keys or the expected type. The returned dict holds the final value of every key,
ready to be logged and saved in checkpoints.
"""
import sys
from ast import literal_eval

CONFIG_TYPES = (int, float, bool, str, list, tuple, type(None))


class ConfigError(SystemExit):
    """Raised for bad config; SystemExit so the user sees one line, not a traceback."""

    def __init__(self, message):
        super().__init__(f"config error: {message}")


def config_keys(scope):
    return sorted(k for k, v in scope.items()
                  if not k.startswith('_') and isinstance(v, CONFIG_TYPES) and not callable(v))


def _coerce(key, value, default):
    """Return value as default's type, or raise ConfigError naming the expected type."""
    if default is None:
        return value  # None defaults mean "any type / unset"
    if value is None:  # a key with a value by default is never unset: it would fail later, mid-run
        raise ConfigError(f"{key} expects {type(default).__name__}, got None")
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --learning_rate=1 means 1.0
    if expected in (list, tuple) and isinstance(value, (list, tuple)):
        return expected(value)
    if type(value) is not expected:
        raise ConfigError(f"{key} expects {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _check_known(key, keys):
    if key not in keys:
        raise ConfigError(f"unknown key '{key}'; valid keys: {', '.join(keys)}")


def configure(scope, argv=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to scope."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(scope)
    defaults = {k: scope[k] for k in keys}
    for arg in argv:
        if not arg.startswith('--'):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError:
                raise ConfigError(f"config file '{arg}' not found; pass a path like config/distill_pystdlib_cpu.py "
                                  f"or an override like --key=value")
            file_scope = {}
            exec(compile(source, arg, 'exec'), file_scope)
            for key, value in file_scope.items():
                if key.startswith('_') or not isinstance(value, CONFIG_TYPES) or callable(value):
                    continue  # imports, helpers and private names in config files are fine
                _check_known(key, keys)
                scope[key] = _coerce(key, value, defaults[key])
        else:
            key, sep, raw = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f"'{arg}' has no value; write --{key}=VALUE")
            _check_known(key, keys)
            try:
                value = literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # bare strings: --device=cuda
            scope[key] = _coerce(key, value, defaults[key])
    return {k: scope[k] for k in keys}
