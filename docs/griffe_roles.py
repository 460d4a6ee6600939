"""A griffe extension for the API reference: the docstrings use Sphinx roles (:class:`X`, :func:`~a.b.f`,
:mod:`.checkpoint`) and RST literal-block markers (``Layout::``), which Markdown would print as they are.

Each role becomes a code span that links to the object's page when the object is rendered somewhere in the site
(an *optional* autorefs cross-reference: an object that is not rendered gets no link and no warning). A line ending
in ``::`` ends in ``:`` (the indented block below it is a code block in Markdown too). Only the rendered text
changes; the source docstrings are left as they are.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|type):`(?P<target>[^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*$", re.M)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self.collection = loader.modules_collection
        seen: set[int] = set()
        self._walk(pkg, seen)

    def _walk(self, obj: griffe.Object | griffe.Alias, seen: set[int]) -> None:
        if obj.is_alias or id(obj) in seen:
            return
        seen.add(id(obj))
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj)
        for member in obj.members.values():
            self._walk(member, seen)

    def _rewrite(self, text: str, obj: griffe.Object) -> str:
        text = LITERAL_MARKER.sub(":", text)
        return ROLE.sub(lambda match: self._role(match["target"].strip(), obj), text)

    def _role(self, target: str, obj: griffe.Object) -> str:
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", target)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            short = target.startswith("~")
            target = target.lstrip("~")
            title = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        code = f"<code>{html.escape(title)}</code>"
        path = self._resolve(target, obj)
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        name = target.lstrip(".")
        module = obj.module
        candidates = []
        if target.startswith("."):
            scopes = [obj if obj.is_class else obj.parent, module, module.parent]
            candidates = [f"{scope.path}.{name}" for scope in scopes if scope is not None]
        elif target.split(".", 1)[0] == module.package.name:
            candidates = [target]
        else:
            head, _, rest = target.partition(".")
            for scope in (obj, obj.parent, module):
                if scope is None:
                    continue
                try:
                    resolved = scope.resolve(head)
                except (griffe.NameResolutionError, AttributeError):
                    continue
                candidates.append(f"{resolved}.{rest}" if rest else resolved)
        for candidate in candidates:
            if self._exists(candidate):
                return candidate
        return None

    def _exists(self, path: str) -> bool:
        try:
            self.collection.get_member(path)
        except (KeyError, ValueError, IndexError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return False
        return True
