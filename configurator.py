"""
Config overrides, nanoGPT-style, shared by train.py, sample.py, bench.py and experiment.py:

    python train.py config/moe_e4k2.py --n_experts=8 --learning_rate=3e-4

A script's defaults are its module globals (plus, for model knobs, GPTConfig's fields). Each
argument is either a config file, plain Python that assigns some of those names, or --key=value
(a bare --flag sets a bool knob to True).
They apply left to right. A config file may start from another one with include("other.py")
(a path relative to the including file). Values are parsed as Python literals; a knob whose
default is a string takes the text as written. Mistakes raise UserError with one readable line.
"""

import ast
import difflib
import io
import os
import sys
import tokenize


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file...): the scripts print it as one line."""


def kind(default):
    """'an int', 'a float', 'a str'...: the type a knob expects, for messages."""
    name = type(default).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check(ok, message):
    """UserError(message) unless ok: the scripts' knob checks read as a list of these."""
    if not ok:
        raise UserError(message)


def check_choice(name, value, allowed):
    """UserError unless value is one of allowed: 'dtype must be one of auto, float32, bfloat16; got 'x''."""
    check(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def coerce(key, value, default):
    """value converted to the type of default, or UserError naming the key."""
    if isinstance(default, str):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # dataset = 2024 in a config file: the folder "2024"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)  # --learning_rate=1 means 1.0
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return tuple(value)
    shown = repr(value) if isinstance(value, (int, float, str, bool, tuple, list, type(None))) else \
        f"{type(value).__name__} {getattr(value, '__name__', '')}".rstrip()  # a function, a class: no address
    raise UserError(f"{key} expects {kind(default)} (like {default!r}), got {shown}")


def check_key(key, defaults):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown config key {key!r}{hint}")


def apply_file(path, defaults, config):
    """Run a config file and copy the known names it assigns into config."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    namespace = {"include": lambda other: apply_file(os.path.join(os.path.dirname(path), other), defaults, config)}
    try:
        exec(compile(open(path).read(), path, "exec"), namespace)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"error in config file {path}: {type(e).__name__}: {e}") from None
    for key, value in namespace.items():
        if key.startswith("_") or key == "include":
            continue
        if (callable(value) or type(value).__name__ == "module") and key not in defaults:
            continue  # a helper the file defines or imports
        check_key(key, defaults)
        config[key] = coerce(key, value, defaults[key])


def parse_value(key, text, default):
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"{key}: cannot parse {text!r} as {kind(default)}") from None


def configure(argv, defaults):
    """Apply config files and --key=value arguments in argv over defaults; return the new dict."""
    return {**defaults, **overrides(argv, defaults)}


def overrides(argv, defaults):
    """{key: value} of the keys that the config files and --key=value arguments in argv set, in order (a
    resumed run refuses those that would change it, see train.resume_config)."""
    config = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            check_key(key, defaults)
            if not eq and not isinstance(defaults[key], bool):
                raise UserError(f"expected --{key}=value, got {arg!r}")
            value = parse_value(key, text, defaults[key]) if eq else True  # a bare --flag sets a bool knob
            config[key] = coerce(key, value, defaults[key])
        else:
            apply_file(arg, defaults, config)
    return config


def knob_comments(path):
    """{name: comment} for each line `name = value  # comment` (or `name: type = value  # comment`) at the top
    level of a Python file or of a class in it: the one-line docs of a script's knobs, or of a dataclass's
    fields (not of a function's local variables). The first definition of a name wins."""
    source = open(path).read()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    tree = ast.parse(source)
    statements = [*tree.body, *(s for c in tree.body if isinstance(c, ast.ClassDef) for s in c.body)]
    docs = {}
    for statement in statements:
        target = statement.targets[0] if isinstance(statement, ast.Assign) else getattr(statement, "target", None)
        if isinstance(target, ast.Name) and statement.lineno in comments:
            docs.setdefault(target.id, comments[statement.lineno])
    return docs


def usage(doc, defaults, paths):
    """--help text: a script's docstring, then every knob as --key=default with the comment beside its
    definition in one of paths (the script, and e.g. model.py for GPTConfig's fields)."""
    comments = {}
    for path in paths:
        comments = {**knob_comments(path), **comments}
    shown = lambda value: value if not isinstance(value, str) or value.isprintable() else repr(value)  # "\n"
    knobs = [(f"--{key}={shown(value)}", comments.get(key, "")) for key, value in defaults.items()]
    width = max(len(knob) for knob, _ in knobs)
    return "\n".join([doc.strip(), "", "knobs, set by config files or --key=value (shown with their defaults):",
                      *(f"  {knob:<{width}}  {comment}".rstrip() for knob, comment in knobs)])


def print_help(text):
    """Print a script's --help text. A reader that stops early (`python train.py --help | head`) closes the pipe:
    end quietly, as other commands do, rather than with a BrokenPipeError traceback (stdout is pointed at
    /dev/null, so that Python's flush at exit does not fail again)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
