"""The command line: ``[--config FILE ...] [key=value ...]`` merged onto the config dataclasses.

``OmegaConf.merge(structured(Schema), yaml, cli)`` rejects unknown keys and wrong types; the
dataclasses' ``__post_init__`` checks values. Errors are one-line ``UserError``s that name the
file or key; ``--help`` lists every key with its default and the comment under it.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lit_latent import config
from lit_latent.config import UserError


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            full = f"{prefix}{f.name}"
            keys.append(full)
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                keys.extend(_all_keys(value, full + "."))
    return keys


def _closest_hint(key: str, schema: type) -> str:
    match = difflib.get_close_matches(key, _all_keys(schema()), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _describe(e: OmegaConfBaseException, schema: type, source: str) -> str:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        return f"{source}: unknown config key {key}{_closest_hint(key, schema)}"
    reason = str(e).splitlines()[0]
    return f"{source}: config key {key}: {reason}"


def parse_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """Split ``[--config FILE ...] [--help] [key=value ...]``; several files merge in order."""
    config_files, overrides, want_help = [], [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a file path")
            config_files.append(argv[i + 1])
            i += 1
        elif arg.startswith("--config="):
            config_files.append(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise UserError(f"unexpected argument {arg!r}: use --config FILE and key=value overrides")
        i += 1
    return config_files, overrides, want_help


def load_config(schema: type, config_files: list[str], overrides: list[str]):
    """Merge schema defaults, YAML files (in order) and CLI overrides, then validate into ``schema``."""
    base = OmegaConf.structured(schema)
    layers: list[tuple[DictConfig, str]] = []
    for config_file in config_files:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {config_file}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError carries a line number in its first line
            raise UserError(f"{config_file}: cannot parse YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise UserError(f"{config_file}: must hold a mapping of config keys")
        layers.append((loaded, config_file))
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except Exception as e:
        raise UserError(f"command line: cannot parse overrides: {str(e).splitlines()[0]}") from None
    layers.append((cli, "command line"))
    merged = base
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise UserError(_describe(e, schema, source)) from None
    if config_files and "config_name" in merged:
        merged.config_name = "-".join(Path(f).stem for f in config_files)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(_describe(e, schema, "config")) from None
    _check_finite(cfg)
    return cfg


def _check_finite(node: Any, prefix: str = "") -> None:
    """NaN or inf in a numeric key (``latent.lr=nan``) would pass every range check silently."""
    import math

    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"config key {prefix}{f.name}: {value} is not a finite number")


def help_text(schema: type, command: str) -> str:
    """One line per key: name, default, description (the field's docstring in the source)."""
    import ast
    import inspect

    docs: dict[tuple[str, str], str] = {}
    tree = ast.parse(inspect.getsource(config))
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        body = cls.body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[(cls.name, stmt.target.id)] = nxt.value.value.strip()

    lines = [f"usage: python {command} [--config FILE ...] [key=value ...]", "", "keys (default: description):"]

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                doc = next((docs[(c.__name__, f.name)] for c in type(obj).__mro__ if (c.__name__, f.name) in docs), "")
                lines.append(f"  {prefix}{f.name}={OmegaConf.to_yaml(value).strip() if isinstance(value, (dict, list)) else value}  {doc}")

    walk(schema(), "")
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
