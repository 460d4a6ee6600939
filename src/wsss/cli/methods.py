"""``wsss methods``: what the method registry holds, as text or JSON.

For each method: its summary and paper, the map formulas it contributes and the one it is judged by, the typed
options of its ``method:`` config section (type and default, from its pydantic model), its presets and its default
pseudo-label recipe (what ``wsss pseudo --method NAME`` applies).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..methods import REGISTRY, Method


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``methods`` subcommand."""
    p = subparsers.add_parser(
        "methods", help="list the registered methods: maps, options, presets, pseudo-label recipes",
        description="List every registered method (built in, entry points of the wsss.methods group, and the "
        "modules named in $WSSS_PLUGINS).")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(func=run)


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if isinstance(name, str) and "[" not in str(annotation) else str(annotation).replace("typing.", "")


def describe(method: Method) -> dict[str, Any]:
    """A method's registry entry as plain data (what ``--json`` prints)."""
    options = {name: {"type": _type_name(field.annotation),
                      "default": field.get_default(call_default_factory=True),
                      "description": field.description}
               for name, field in method.options.model_fields.items()}
    pseudo = None
    if method.pseudo is not None:
        r = method.pseudo
        pseudo = {"rule": r.rule, "params": dict(r.params), "refine": r.refine, "iterations": r.iterations,
                  "crf": r.crf, "scale": r.scale, "softmax": r.softmax}
    return {"name": method.name, "summary": method.summary, "paper": method.paper, "aliases": list(method.aliases),
            "maps": list(method.maps), "own_map": method.own_map, "trainable": method.objective is not None,
            "options": options, "presets": method.preset_names(), "pseudo": pseudo}


def _recipe_text(pseudo: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in pseudo["params"].items())
    text = f"{pseudo['rule']}" + (f" ({params})" if params else "")
    if pseudo["refine"] != "none":
        detail = {"crf": f"preset {pseudo['crf']}", "par": f"{pseudo['iterations']} iterations",
                  "pamr": f"{pseudo['iterations']} iterations"}.get(pseudo["refine"])
        text += f" after {pseudo['refine']}" + (f" ({detail})" if detail else "")
    if pseudo["scale"] != 1.0:
        text += f", scores at x{pseudo['scale']:g}"
    if pseudo["softmax"]:
        text += ", softmax first"
    return text


def format_method(entry: dict[str, Any]) -> str:
    """The text block of one :func:`describe` entry."""
    lines = [f"{entry['name']}: {entry['summary']}"]
    if entry["paper"]:
        lines.append(f"  paper:    {entry['paper']}")
    if entry["aliases"]:
        lines.append(f"  aliases:  {', '.join(entry['aliases'])}")
    maps = [m + (" (own)" if m == entry["own_map"] else "") for m in entry["maps"]]
    if entry["own_map"] is not None and entry["own_map"] not in entry["maps"]:
        maps.append(f"judged by {entry['own_map']}")
    lines.append(f"  maps:     {', '.join(maps) or 'none'}")
    lines.append(f"  training: {'method.name: ' + entry['name'] if entry['trainable'] else 'no objective'}")
    if entry["options"]:
        lines.append("  options:")
        for name, option in entry["options"].items():
            note = f"  # {option['description']}" if option["description"] else ""
            lines.append(f"    {name}: {option['type']} = {option['default']!r}{note}")
    else:
        lines.append("  options:  none")
    lines.append(f"  presets:  {', '.join(entry['presets']) or 'none'}")
    lines.append(f"  pseudo:   {_recipe_text(entry['pseudo']) if entry['pseudo'] else 'none'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the registry."""
    entries = [describe(method) for method in REGISTRY]
    if args.json:
        print(json.dumps({"methods": entries}, indent=2, default=str))
    else:
        print("\n\n".join(format_method(entry) for entry in entries))
    return 0
