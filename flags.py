"""The command line of every emo command: --key=value flags over a --config JSON file (train.py), --help
generated from the settings' own comments, argparse for the others with a bad flag as one line naming the
closest real one. The bottom of the commands' imports, beside emo.py, so that data/prepare.py uses it too."""

import argparse
import difflib
import inspect
import json
import re
import sys
from dataclasses import fields
from pathlib import Path

import emo
from emo import SettingError


def parse_flags(argv, doc, classes, same_thing):
    """--key=value flags, over a --config JSON file, as {setting: typed value} for the fields of `classes`
    (dataclasses). --help prints every field with its default and comment. same_thing: two settings that say
    one thing in two forms (a flag of either overrides the file's other; both as flags is refused)."""
    if "--help" in argv or "-h" in argv:
        print_help(doc, *classes)
        sys.exit(0)
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SettingError(f"unexpected argument {arg!r}: settings are --key=value flags")
        key, _, value = arg[2:].partition("=")
        if _ and not value:  # an unset shell variable, say: never silently the default
            raise SettingError(f"--{key}= is empty: give a value, or leave the flag out for its default")
        values[key] = value if _ else "true"
    if "config" in values:
        from_file = read_config_file(values["config"])
        for flag, other in (same_thing, same_thing[::-1]):  # flags override the file
            if flag in values:
                from_file.pop(other, None)
        values = {**from_file, **values}
    known = {f.name: f.type for cls in classes for f in fields(cls)}
    unknown = sorted(set(values) - set(known) - {"n_experts"})
    if unknown:
        raise SettingError(unknown_flag(unknown[0], known))
    first, second = same_thing
    if values.get(first) and second in values:
        raise SettingError(f"give --{first} or --{second}, not both (they say the same in two forms)")
    return {key: convert(key, value, known.get(key, "int")) for key, value in values.items()}


def read_config_file(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SettingError(f"--config={path}: cannot read a JSON object ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise SettingError(f"--config={path}: must hold a JSON object of settings")
    if {"run", "settings", "model"} <= set(data):
        data = run_config_settings(data, path)
    for key, value in data.items():
        if key in ("config", "resume"):
            raise SettingError(f"--config={path}: {key!r} is not a setting a config file can give (a flag only)")
        if value == "" or value == []:
            raise SettingError(f"--config={path}: {key!r} is empty: give a value, or leave it out for its default")
    return data


def run_config_settings(data, path):
    """A run folder's own config.json given as --config: its settings and model, to start a new run like it
    (its out_dir holds that run: a new one is refused there, so give --out_dir). What names its history
    (resume, config) and what its schedule sets (n_experts) are left out, and so are empty values (defaults)."""
    if not (isinstance(data["settings"], dict) and isinstance(data["model"], dict)):
        raise SettingError(f"--config={path}: a run's config.json whose settings or model is not an object (edited?)")
    skip = {"resume", "config", "n_experts"} | ({"experts"} if data["settings"].get("stages") else set())
    return {k: "none" if v is None else v for k, v in {**data["settings"], **data["model"]}.items()
            if k not in skip and v not in ("", [])}


def convert(key, value, kind):
    """A flag's text (or a JSON value) as the field's type, or a one-line error naming it."""
    if not isinstance(value, str):  # from a JSON file
        value = ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
    if "None" in str(kind):  # pool_size (int | float | None), pool_size_range (tuple | None)
        if value.lower() in ("none", "null", ""):
            return None
        try:
            numbers = tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v) for v in value.split(","))
        except ValueError:
            raise SettingError(f"--{key}={value}: expected a number, a pair lo,hi, or none") from None
        return numbers if "tuple" in str(kind) else numbers[0] if len(numbers) == 1 else numbers
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if kind is int:
            number = float(value)  # allows 2e6
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(value.strip('"') if kind is str else value)
    except (ValueError, OverflowError):  # OverflowError: int("inf")
        raise SettingError(f"--{key}={value}: expected {'true/false' if kind is bool else kind.__name__}") from None


def setting_help(*classes):
    """{field: (default, its comment)} for dataclasses whose fields are commented on their own line of source,
    `name: type = default  # what it means`: --help is generated from the one place a setting is declared."""
    out = {}
    for cls in classes:
        defaults = {f.name: f.default for f in fields(cls)}
        for line in inspect.getsource(cls).splitlines():
            found = re.match(r"\s+(\w+): [^=]+(= [^#]*)?(#\s*(.*))?$", line)
            if found and found.group(1) in defaults:
                out[found.group(1)] = (defaults[found.group(1)], (found.group(4) or "").strip())
    return out


def print_help(doc, *classes):
    print(doc.strip() + "\n\nsettings (--key=value; default, then meaning):")
    for name, (default, meaning) in setting_help(*classes).items():
        print(f"  --{name}={'' if default is None else default}" + (f"  {meaning}" if meaning else ""))


def unknown_flag(flag, known):
    """The one line for a flag no command knows: the closest real one, if any is close."""
    close = difflib.get_close_matches(flag, known, n=1)
    return f"unknown setting --{flag}" + (f"; did you mean --{close[0]}?" if close else "") + \
        " (--help lists every setting)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every emo command uses it: a bad flag is one line and exit status 1, as train.py's, not a
    usage block and 2; --help as usual."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --nam is not --name: a flag means what it says

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        empty = next((arg for arg in args if arg.startswith("--") and arg.endswith("=")), None)
        if empty:  # an unset shell variable, say: never silently the default
            self.error(f"{empty} is empty: give a value, or leave the flag out for its default")
        return super().parse_args(args, namespace)

    def error(self, message):
        close = re.search(r"unrecognized arguments: --([\w-]+)", message)
        known = [a.lstrip("-") for action in self._actions for a in action.option_strings]
        if close:
            message = unknown_flag(close.group(1), known)
        sys.exit(f"{self.prog}: {message}" + ("" if close else " (--help lists every flag)"))


def read_law(path):
    """A ScalingLaw from a JSON file of its coefficients (plan.py --save_law writes one), checked like a flag."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SettingError(f"--law={path}: cannot read a JSON object of the law's coefficients "
                           f"({type(err).__name__})") from None
    why = emo.law_problem(values)
    if why:
        raise SettingError(f"--law={path}: {why}")
    return emo.ScalingLaw(**{k: float(values[k]) for k in emo.LAW_COEFFICIENTS})
