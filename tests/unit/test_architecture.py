"""Architecture rules checked on the source itself with ``ast``.

1. Domain modules never import the transport: neither ``grpc`` nor the generated
   ``fedstream.common.pb`` code, directly or through another fedstream module.
2. Nothing deserialises code: no ``pickle``, no ``eval``/``exec``, and ``torch.load`` only
   in the checkpoint reader, with ``weights_only=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "common": "fedstream.common",
    "server": "fedstream.server",
    "client": "fedstream.client",
    "api": "fedstream",
}

# The transport adapters and the entry points that wire them up: every other module of
# ours is domain code and must not reach the transport, however it is added later.
ADAPTERS = {
    "common/wire.py",
    "server/auth.py",
    "server/healthcheck.py",
    "server/main.py",
    "server/servicer.py",
    "server/__main__.py",
    "client/connection.py",
    "client/main.py",
    "client/__main__.py",
    "api/__init__.py",
    "api/runs.py",
}
DOMAIN_MODULES = sorted(
    str(path.relative_to(ROOT))
    for folder in ("common", "server", "client", "api")
    for path in (ROOT / folder).rglob("*.py")
    if "pb" not in path.relative_to(ROOT).parts and str(path.relative_to(ROOT)) not in ADAPTERS
)
TRANSPORT_PREFIXES = ("grpc", "grpc_health", "grpc_status", "fedstream.common.pb")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    package = PACKAGES[relative.parts[0]]
    rest = [part for part in relative.with_suffix("").parts[1:] if part != "__init__"]
    return ".".join([package, *rest])


def module_file(name: str) -> Path | None:
    for folder, package in PACKAGES.items():
        if name == package or name.startswith(package + "."):
            parts = name[len(package) :].strip(".").split(".") if name != package else []
            base = ROOT / folder / Path(*parts) if parts else ROOT / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def imported_names(tree: ast.AST) -> set[str]:
    """Every module an import statement names, including ``from pkg import module``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_transport(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in TRANSPORT_PREFIXES)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def transport_imports_reachable(start: Path) -> list[str]:
    """'chain -> transport module' for every transport import reachable from ``start``."""
    found: list[str] = []
    seen: set[Path] = set()
    stack = [(start, module_name(start))]
    while stack:
        path, chain = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in sorted(imported_names(parse(path))):
            if is_transport(name):
                found.append(f"{chain} -> {name}")
            target = module_file(name)
            if target is not None and target not in seen:
                stack.append((target, f"{chain} -> {module_name(target)}"))
    return found


def forbidden_calls(source: str, filename: str) -> list[str]:
    """Lines that deserialise or evaluate code, other than the checkpoint reader."""
    tree = ast.parse(source, filename=filename)
    problems: list[str] = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                if module.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{where}: imports {module}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                if any(alias.name == "load" for alias in node.names):
                    problems.append(f"{where}: from torch import load")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in {"eval", "exec", "__import__"}:
            problems.append(f"{where}: {func.id}()")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner, attr = func.value.id, func.attr
            if owner in PICKLE_MODULES and attr in {"load", "loads", "Unpickler"}:
                problems.append(f"{where}: {owner}.{attr}()")
            if owner == "torch" and attr == "load":
                problems.append(f"{where}: torch.load()")
        for keyword in node.keywords:
            if keyword.arg == "allow_pickle" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                problems.append(f"{where}: allow_pickle")
    return problems


def product_files() -> list[Path]:
    return sorted(path for folder in PACKAGES for path in (ROOT / folder).rglob("*.py"))


def checkpoint_reader() -> ast.FunctionDef:
    tree = parse(ROOT / "server" / "checkpoint.py")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "load_checkpoint":
            return node
    raise AssertionError("server/checkpoint.py has no load_checkpoint")


def torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


# ---- layering ---------------------------------------------------------------------------


@pytest.mark.parametrize("relative", DOMAIN_MODULES)
def test_domain_module_does_not_import_the_transport(relative: str) -> None:
    path = ROOT / relative
    direct = [name for name in imported_names(parse(path)) if is_transport(name)]
    assert direct == [], f"{relative} imports {direct}"


@pytest.mark.parametrize("relative", DOMAIN_MODULES)
def test_domain_module_does_not_reach_the_transport_through_other_modules(
    relative: str,
) -> None:
    assert transport_imports_reachable(ROOT / relative) == []


def test_layering_check_sees_a_transport_import_through_another_module() -> None:
    # servicer.py is a transport adapter: the same walk must find its grpc and pb imports.
    chains = transport_imports_reachable(ROOT / "server" / "servicer.py")
    assert any(chain.endswith("-> grpc") for chain in chains)
    assert any("fedstream.common.pb" in chain for chain in chains)


# ---- no code from bytes -----------------------------------------------------------------


def test_no_product_module_unpickles_or_evaluates_code() -> None:
    reader = checkpoint_reader()
    reader_lines = range(reader.lineno, (reader.end_lineno or reader.lineno) + 1)
    problems: list[str] = []
    for path in product_files():
        relative = str(path.relative_to(ROOT))
        for problem in forbidden_calls(path.read_text(encoding="utf-8"), relative):
            line = int(problem.split(":")[1])
            if (
                relative == "server/checkpoint.py"
                and problem.endswith("torch.load()")
                and line in reader_lines
            ):
                continue  # the local checkpoint reader; its weights_only is checked below
            problems.append(problem)
    assert problems == []


def test_checkpoint_reader_loads_with_weights_only() -> None:
    calls = torch_load_calls(checkpoint_reader())
    assert len(calls) == 1
    keywords = {keyword.arg: keyword.value for keyword in calls[0].keywords}
    weights_only = keywords.get("weights_only")
    assert isinstance(weights_only, ast.Constant) and weights_only.value is True


def test_forbidden_call_check_catches_each_pattern() -> None:
    source = "\n".join(
        [
            "import pickle",
            "from torch import load",
            "pickle.loads(b'')",
            "torch.load(f)",
            "eval('1')",
            "exec('x = 1')",
            "np.load(f, allow_pickle=True)",
            "model.eval()",  # a method named eval is fine
        ]
    )
    problems = forbidden_calls(source, "sample.py")
    assert len(problems) == 7
    assert not any(problem.startswith("sample.py:8") for problem in problems)
