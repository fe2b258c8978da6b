"""The package's layers run one way (docs/architecture.md): a module imports only its own layer or earlier ones, no
two modules import each other (directly or around a loop), and the library imports its own modules at the top of
the file, not inside functions, unless a comment there says why."""
import ast
from collections import defaultdict
from pathlib import Path

import ftwt_cli

PACKAGE = Path(ftwt_cli.__file__).parent
# earliest first; the names are ftwt_cli's top-level modules and subpackages
LAYERS = [
    ("errors", "settings", "solve"),          # no dependency inside the package
    ("runtime",),                             # device and precision, the torchrun process group
    ("arch",),                                # the registry, detection, the dataflow trace
    ("data", "formats"),                      # datasets and transforms; file formats only
    ("gating",),                              # gates, the gated model, ground truth, MACs
    ("fast", "static", "attach"),             # compact inference, static pruning, a new run from a checkpoint
    ("runs",),                                # runs as models: load, export, static twins, latency, defaults
    ("eval",),
    ("train",),
    ("sweep", "demo", "images"),
    ("cli", "__main__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


def _imports():
    """(importer, imported module, line, inside a function, has a comment on that line or the one before)."""
    known = {m for m, _, _ in _modules()}
    for name, path, is_pkg in _modules():
        src = path.read_text().splitlines()
        tree = ast.parse("\n".join(src))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name a submodule
                targets = [f"{mod}.{a.name}" if node.module is None else mod for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftwt_cli"):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("ftwt_cli")]
            line = node.lineno - 1 if targets else 0
            commented = targets and ("#" in src[line] or (line > 0 and src[line - 1].strip().startswith("#")))
            for t in targets:
                yield name, _resolve(t, known), node.lineno, id(node) in inner, commented


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    missing = sorted({_layer(m) for m, _, _ in _modules() if _layer(m) and _layer(m) not in RANK})
    assert not missing, f"add {missing} to LAYERS here and to docs/architecture.md"


def test_no_module_imports_a_later_layer():
    bad = [f"{a} imports {b} (line {line})" for a, b, line, _, _ in _imports()
           if _layer(a) and _layer(b) and RANK[_layer(b)] > RANK[_layer(a)]]
    assert not bad, "\n".join(bad)


def _resolve(target: str, known: set) -> str:
    """The module an import names (``from .x import y`` may name a function of x, or a submodule y)."""
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def test_no_import_cycles():
    graph = defaultdict(set)
    for a, b, _, _, _ in _imports():
        # a package's __init__ re-exporting its own modules is not a cycle of ideas
        if b != a and not a.startswith(b + ".") and b != "ftwt_cli":
            graph[a].add(b)
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(" → ".join(c) for c in cycles[:5])


def test_library_imports_its_own_modules_at_the_top():
    """Inside functions only with a comment saying why (the command line defers its imports for start-up time: cli/
    is exempt)."""
    bad = [f"{a}:{line} imports {b}" for a, b, line, inner, commented in _imports()
           if inner and not commented and _layer(a) not in ("cli", "__main__")]
    assert not bad, "\n".join(bad)


def test_third_party_imports_inside_library_functions_say_why():
    """A package imported inside a library function (for start-up time, or as an optional dependency) has a comment
    on that line or the one before saying which; the standard library is imported at the top."""
    bad = []
    for name, path, _ in _modules():
        if _layer(name) in ("cli", "__main__"):
            continue
        src = path.read_text().splitlines()
        tree = ast.parse("\n".join(src))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not (isinstance(node, ast.ImportFrom) and node.level):
                    top = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                    if top == "ftwt_cli":
                        continue
                    line = node.lineno - 1
                    if not ("#" in src[line] or (line > 0 and src[line - 1].strip().startswith("#"))):
                        bad.append(f"{name}:{node.lineno}: {src[line].strip()}")
    assert not bad, "\n".join(bad)
