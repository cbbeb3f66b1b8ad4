"""CLI flags generated from the settings tree (``circuitq.config``).

A command declares a table of ``(flag, path, ...)``: the flag sets the field at ``path`` (dotted,
inside the command's config) and, optionally, further paths that share it (``--batch-size`` of
``run`` sets the scoring, Hessian and evaluation batches). Default, type, choices and help come
from the field, so a CLI default is the library default by construction; ``build`` turns the
parsed arguments back into the config (and a test checks that no flags give the defaults).
"""
from __future__ import annotations

import argparse
from dataclasses import fields, is_dataclass, replace

from circuitq.presets import apply_preset, get_preset


def _field(cfg, path: str):
    *parents, leaf = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    f = next((f for f in fields(obj) if f.name == leaf), None)
    if f is None:
        raise KeyError(f"{type(obj).__name__} has no setting {leaf!r} (flag table out of date)")
    return f, getattr(obj, leaf)


def set_path(cfg, path: str, value):
    """A copy of ``cfg`` with the field at ``path`` set (nested frozen dataclasses)."""
    head, _, rest = path.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: set_path(getattr(cfg, head), rest, value)})


def add_flags(parser: argparse.ArgumentParser, defaults, table) -> None:
    """Add one flag per table row; row = ``(flag, path)`` or ``(flag, (path, more paths...))``."""
    for flag, paths in table:
        path = paths if isinstance(paths, str) else paths[0]
        f, default = _field(defaults, path)
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        dest = "cfg__" + path.replace(".", "__")
        meta = None if choices else flag.lstrip("-").upper().replace("-", "_")
        if isinstance(default, bool):
            if default:
                parser.add_argument(flag, dest=dest, action="store_false",
                                    help=f"turn off (on by default): {help_}" if help_ else None)
            else:
                parser.add_argument(flag, dest=dest, action="store_true", help=help_)
        elif isinstance(default, tuple):
            elem = type(default[0]) if default else str
            parser.add_argument(flag, dest=dest, nargs="*" if flag == "--baselines" else "+", type=elem,
                                default=list(default), choices=choices, metavar=meta, help=help_)
        else:
            kind = type(default) if default is not None else (float if "float" in str(f.type) else
                                                               int if "int" in str(f.type) else str)
            parser.add_argument(flag, dest=dest, type=kind, default=default, choices=choices, metavar=meta,
                                help=help_ + (f" (default {default})" if default is not None else ""))


def given_flags(argv: list[str]) -> set[str]:
    """The long flags written on the command line (``--x`` and ``--x=v``), in any order."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def build(defaults, args: argparse.Namespace, table):
    """The config the parsed ``args`` describe (validated by the dataclasses themselves); with
    ``--preset NAME`` the preset is applied over it, and a written flag that contradicts the
    preset's recipe is an error naming both (``circuitq.presets``)."""
    cfg = defaults
    for flag, paths in table:
        paths = (paths,) if isinstance(paths, str) else paths
        value = getattr(args, "cfg__" + paths[0].replace(".", "__"))
        if isinstance(value, list):
            value = tuple(value)
        for p in paths:
            try:
                cfg = set_path(cfg, p, value)
            except ValueError as e:   # the library names the setting; say the flag the user typed
                leaf = "--" + p.rsplit(".", 1)[-1].replace("_", "-")
                raise type(e)(str(e).replace(leaf, flag)) from None
    preset = getattr(args, "preset", None)
    if preset:
        written = given_flags(getattr(args, "_argv", []) or [])
        given = {p: flag for flag, paths in table for p in ((paths,) if isinstance(paths, str) else paths)
                 if flag in written}
        cfg = apply_preset(cfg, preset, given)

        kept = [f"{given[p]} (the preset's {v})" for p, v in get_preset(preset).scale.items() if p in given]
        print(f"[circuitq] --preset {preset}: {get_preset(preset).doc}"
              + (f"; your sizes kept: {', '.join(kept)}" if kept else ""), flush=True)
    return cfg


def leaf_paths(cfg, prefix: str = "") -> list[str]:
    """Every leaf setting of a config, dotted (for tests and docs)."""
    out = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out += leaf_paths(v, prefix + f.name + ".") if is_dataclass(v) else [prefix + f.name]
    return out
