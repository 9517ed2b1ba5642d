"""Package dependency arrows (STYLE.md): gateway -> distill_loop -> router -> models, gateway -> router."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "models": set(),
    "router": {"models"},
    "distill_loop": {"models", "router"},
    "gateway": {"models", "router", "distill_loop"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_packages_import_only_downward() -> None:
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in (ROOT / pkg).rglob("*.py"):
            for dep in imported_packages(path) - allowed - {pkg}:
                bad.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not bad, bad


def test_cross_package_imports_go_through_init() -> None:
    bad = []
    for pkg in ALLOWED:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    top, _, rest = node.module.partition(".")
                    if top in ALLOWED and top != pkg and rest:
                        bad.append(f"{path.relative_to(ROOT)}: from {node.module}")
    assert not bad, bad


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for pkg in ALLOWED
        for p in (ROOT / pkg).rglob("*.py")
        if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not missing, missing


def test_the_trainer_entry_point_never_imports_the_gateway() -> None:
    """`python -m distill_loop` reads the shared settings below the gateway (STYLE.md)."""
    import subprocess
    import sys

    probe = (
        "import sys, distill_loop.__main__ as m; m._settings(None); "
        "print(sorted(n for n in sys.modules if n == 'gateway' or n.startswith('gateway.')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
