"""Rollback: return an alias to the version it pointed at before, from the alias history."""

from __future__ import annotations

from registry_client.errors import AliasNotFound, NothingToRollBack
from registry_client.protocol import Registry
from registry_client.refs import DEFAULT_ALIAS, validate_alias


def previous_version(history: list[tuple[str, str]], current: str) -> str | None:
    """The version an alias held just before `current`, given its history (oldest first).

    A rollback is itself a move, so rolling back twice returns to where the first rollback
    started (like ``cd -``); going further back is an explicit ``promote``.
    """
    versions = [version for version, _at in history]
    while versions and versions[-1] == current:
        versions.pop()
    return versions[-1] if versions else None


def rollback(registry: Registry, name: str, alias: str = DEFAULT_ALIAS) -> str:
    """Point `alias` back at the version it held before its current one; return that version.

    Raises AliasNotFound if the alias is not set, NothingToRollBack if it never held another
    version, VersionNotFound if that earlier version has since been deleted.
    """
    alias = validate_alias(alias)
    aliases = registry.aliases(name)
    current = aliases.get(alias)
    if current is None:
        raise AliasNotFound(name, alias, tuple(sorted(aliases)))
    target = previous_version(registry.alias_history(name, alias), current)
    if target is None:
        raise NothingToRollBack(name, alias, current)
    registry.set_alias(name, alias, target)
    return target
