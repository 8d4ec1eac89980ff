"""No module of ``core``, ``studio_plugins`` or ``plugins`` imports itself back, directly or round
a circle of other modules.

import-linter's contracts only say which package may import which; a circle inside one
(``plugins/backends/ec2.py`` and ``ec2_fleet.py`` once imported each other, one side lazily to
get away with it) passes them. Function-level imports count: they close the circle at run time.
Imports under ``if TYPE_CHECKING:`` do not, since they never run.
"""

from __future__ import annotations

import grimp

PACKAGES = ("core", "studio_plugins", "plugins")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One shortest circle (``[a, b, ..., a]``) for each direct import that is part of one."""
    cycles, seen = [], set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is None:
                continue
            cycle = [importer, *back]
            key = frozenset(cycle)
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def test_no_import_cycles_across_the_three_packages() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    assert len(graph.modules) > 50  # the packages were found (not an empty graph that passes)
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_circle_and_only_that() -> None:
    """The detector itself: a circle through a lazy import, as ec2 <-> ec2_fleet was."""
    graph = grimp.ImportGraph()
    for importer, imported in [("plugins.a", "plugins.b"), ("plugins.b", "plugins.c"),
                               ("plugins.c", "plugins.a"), ("plugins.c", "plugins.d")]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["plugins.a", "plugins.b", "plugins.c", "plugins.a"]]
    graph.remove_import(importer="plugins.c", imported="plugins.a")
    assert import_cycles(graph) == []
