"""docs/plugins.md is the hook reference: every hookspec is there, with its exact signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from core import hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
DEFINITION = re.compile(r"^def (studio_\w+)(\(.*\) -> .*?):", re.MULTILINE)


def hookspec_signatures() -> dict[str, str]:
    """``name -> "(register: Callable[[Loader], None]) -> None"`` for every hookspec."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    specs = {}
    for name, function in vars(hookspecs).items():
        if callable(function) and hasattr(function, marker):
            signature = inspect.signature(function)  # annotations are strings (PEP 563)
            params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
            specs[name] = f"({params}) -> {signature.return_annotation}"
    return specs


def problems(doc: str, specs: dict[str, str]) -> list[str]:
    """What is wrong with ``doc`` as a reference for ``specs`` (empty: nothing)."""
    found: dict[str, list[str]] = {}
    for name, signature in DEFINITION.findall(doc):
        found.setdefault(name, []).append(signature)
    issues = [f"{name} is not documented" for name in specs if name not in found]
    issues += [f"{name} is documented but is not a hook" for name in found if name not in specs]
    for name, signatures in found.items():
        for signature in signatures:
            if name in specs and signature != specs[name]:
                issues.append(f"{name}{signature} should be {name}{specs[name]}")
    return issues


def test_every_hookspec_is_documented_with_its_exact_signature() -> None:
    specs = hookspec_signatures()
    assert len(specs) >= 7  # loaders, wrappers, stages, stores, backends, codecs, commands
    assert problems(DOC.read_text(), specs) == []


def test_the_check_catches_a_missing_hook_and_a_drifted_signature() -> None:
    specs = hookspec_signatures()
    doc = DOC.read_text()
    missing = doc.replace("def studio_register_codecs(", "def codecs_gone(")
    assert "studio_register_codecs is not documented" in problems(missing, specs)
    drifted = doc.replace(
        "def studio_register_loaders(register: Callable[[Loader], None])",
        "def studio_register_loaders(register: Callable[[Loader, str], None])",
    )
    assert any(p.startswith("studio_register_loaders(register: Callable[[Loader, str]")
               for p in problems(drifted, specs))
    extra = doc + "\n```python\ndef studio_register_gadgets(register: Callable) -> None: ...\n```\n"
    assert "studio_register_gadgets is documented but is not a hook" in problems(extra, specs)
