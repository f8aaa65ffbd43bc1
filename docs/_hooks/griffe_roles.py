"""A griffe extension for the API reference: the docstrings' Sphinx roles
(``:class:`sqlflag.Flag```, ``:meth:`build```) become Markdown, links where they name a
documented object (in full, or relative to the docstring's class or module), code otherwise."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def resolve(pkg: griffe.Module, obj: griffe.Object, target: str) -> str | None:
    """The full path ``target`` names from ``obj``'s docstring, if it exists."""
    scopes = [""]
    scope: griffe.Object | None = obj
    while scope is not None:
        scopes.insert(0, scope.path + ".")
        scope = scope.parent
    for prefix in scopes:
        path = prefix + target.lstrip(".")
        if not path.startswith(pkg.path + ".") and path != pkg.path:
            continue
        try:
            if path != pkg.path:
                pkg[path.removeprefix(pkg.path + ".")]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        return path
    return None


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._rewrite(pkg, pkg)

    def _rewrite(self, pkg: griffe.Module, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            def markdown(match: re.Match[str]) -> str:
                target = match.group(2).strip()
                shown = target.rsplit(".", 1)[-1] if match.group(1) else target
                path = resolve(pkg, obj, target)
                return f"[`{shown}`][{path}]" if path else f"`{shown}`"

            obj.docstring.value = ROLE.sub(markdown, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(pkg, member)  # type: ignore[arg-type]
