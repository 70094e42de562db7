"""No class under marketd/ingest/ keeps more than 20 instance attributes.

A class that needs more holds more than one piece of bookkeeping: split it (the Kafka-outage
stage had 32 before its state moved into `ingest/delivery.py`'s state machine and sub-objects).
Counted: attributes assigned on `self` anywhere in the class, plus annotated class-level fields
(dataclasses, attrs). Exempt: msgspec Structs, whose fields are a wire or record format (the
size of Binance's 24 h ticker is Binance's choice).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

INGEST = Path(__file__).resolve().parents[2] / "marketd" / "ingest"
LIMIT = 20


def _is_struct(cls: ast.ClassDef) -> bool:
    return any(ast.unparse(base).endswith("Struct") for base in cls.bases)


def _self_attribute(node: ast.AST) -> str | None:
    """`x` for `self.x`, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.attr if node.value.id == "self" else None
    return None


def instance_attributes(cls: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(cls):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            names.update(a for x in ast.walk(target) if (a := _self_attribute(x)))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.update([] if "ClassVar" in ast.unparse(node.annotation) else [node.target.id])
    return names


def classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted(INGEST.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not _is_struct(node):
                found.append((f"{path.name}:{node.name}", node))
    return found


@pytest.mark.parametrize(("where", "cls"), classes(), ids=[w for w, _ in classes()])
def test_at_most_20_instance_attributes(where: str, cls: ast.ClassDef) -> None:
    names = instance_attributes(cls)
    assert len(names) <= LIMIT, f"{where}: {len(names)} attributes: {sorted(names)}"


def test_the_count_sees_self_assignments_and_fields() -> None:
    src = (
        "class A:\n    x: int\n    def __init__(self):\n"
        "        self.a = 1\n        self.b: int = 2\n"
    )
    (cls,) = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ClassDef)]
    assert instance_attributes(cls) == {"x", "a", "b"}
