"""The package's shape: no import cycle between dtrain's modules (counting imports inside
functions, not those under `if TYPE_CHECKING:`), and the size limits (files <= 400 lines,
functions <= 60 lines) in dtrain/, bench/ and tests/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dtrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return (
        isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        or isinstance(node.test, ast.Attribute)
        and node.test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """dtrain modules imported anywhere in `path` (a package import counts as its __init__)."""
    found: set[str] = set()
    me = module_name(path)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                pkg = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*pkg, node.module])
            subs = {f"{base}.{a.name}" for a in node.names}
            found.update(subs & known if subs <= known else subs | {base})  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != me}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imported_modules(p, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle_between_dtrain_modules():
    graph = import_graph()
    assert "dtrain.training.trainer" in graph and graph["dtrain.training.trainer"]  # the walk sees the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def python_files() -> list[Path]:
    return [p for folder in ("dtrain", "bench", "tests", "tools") for p in (REPO / folder).rglob("*.py")]


def test_files_have_at_most_400_lines():
    long = {str(p.relative_to(REPO)): n for p in python_files() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_functions_have_at_most_60_lines():
    long = {}
    for p in python_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long[f"{p.relative_to(REPO)}:{node.name}"] = n
    assert long == {}


# ---- where each kind of code may live -------------------------------------------------------

ENGINES = ("torch.distributed", "deepspeed")
LIGHT_CONFIG = (
    "dtrain.model",
    "dtrain.backends",
    "dtrain.training",
    "dtrain.inference",
    "dtrain.lora",
    "dtrain.cli",
    "dtrain.memory",
    "dtrain.analysis",
)


def all_imports(path: Path) -> set[str]:
    """Every module named by an import in `path` (inside functions too), plus `torch.distributed`
    where it is reached as an attribute (`torch.distributed.barrier()` without its own import)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            out.add("torch.distributed")
    return out


def _named(modules: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_only_backends_import_torch_distributed_and_deepspeed():
    outside = {
        str(p.relative_to(REPO)): sorted(found)
        for p in PACKAGE.rglob("*.py")
        if "backends" not in p.relative_to(PACKAGE).parts and (found := _named(all_imports(p), ENGINES))
    }
    assert outside == {}
    assert _named(all_imports(PACKAGE / "backends" / "deepspeed.py"), ENGINES)  # the walk sees them


def test_config_imports_no_model_backends_or_training():
    """dtrain/config/ is pure: loading a config downloads nothing and builds nothing (named models
    are resolved by dtrain/model/sources.py, for the commands that run one)."""
    heavy = {
        str(p.relative_to(REPO)): sorted(found)
        for p in (PACKAGE / "config").rglob("*.py")
        if (found := _named(all_imports(p), LIGHT_CONFIG))
    }
    assert heavy == {}
    assert _named(all_imports(PACKAGE / "model" / "sources.py"), ("dtrain.config",))  # the walk sees dtrain imports


def test_the_engine_rule_catches_an_attribute_use(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef f():\n    return torch.distributed.get_rank()\n")
    assert _named(all_imports(probe), ENGINES) == {"torch.distributed"}


# ---- one home per concept: each of these is defined once, in the file named ---------------

ONE_HOME = {
    "output_head": "dtrain/model/layers.py",
    "head_names": "dtrain/model/layers.py",
    "is_head_name": "dtrain/model/layers.py",
    "HEAD_NAMES": "dtrain/model/layers.py",
    "decoder_blocks": "dtrain/model/layers.py",
    "input_embeddings": "dtrain/model/layers.py",
    "resolve_named_models": "dtrain/model/sources.py",
    "load_config": "dtrain/model/sources.py",
    "is_hub_id": "dtrain/config/names.py",
    "is_builtin": "dtrain/config/names.py",
    "gguf_hint": "dtrain/config/names.py",
    "parse_duration": "dtrain/config/types.py",
    "replace_dir": "dtrain/storage/files.py",
    "publish": "dtrain/storage/files.py",
    "rank": "dtrain/backends/launcher.py",
    "is_multi_process": "dtrain/backends/launcher.py",
    "together": "dtrain/backends/collectives.py",
    "DiskFull": "dtrain/errors.py",
    "assemble": "dtrain/training/assembly.py",
    "prepare": "dtrain/data/pipeline.py",  # was two `prepare`s
    "targeted_linears": "dtrain/memory/estimate.py",
    "full_optimizer_state": "dtrain/backends/zero3_state.py",
    "labelled_tokens": "dtrain/training/loss.py",
    "load_tokenizer": "dtrain/model/tokenizer.py",
    "alpaca_turns": "dtrain/data/chat.py",
}


def definitions() -> dict[str, set[str]]:
    """Top-level function, class and constant names -> the package files that define them."""
    out: dict[str, set[str]] = {}
    for p in PACKAGE.rglob("*.py"):
        for node in ast.parse(p.read_text()).body:
            names = (
                [node.name]
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                else [t.id for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Assign)
                else []
            )
            for n in names:
                out.setdefault(n, set()).add(str(p.relative_to(REPO)))
    return out


def test_each_concept_has_one_home():
    found = definitions()
    homes = {name: sorted(found.get(name, ())) for name in ONE_HOME}
    assert homes == {name: [home] for name, home in ONE_HOME.items()}
    gone = {"_rank", "_replace", "default_skip"} & set(found)  # the old second homes
    assert gone == set()


def test_the_build_sequence_is_written_once():
    """Only Backend writes `_build`; the backends override its hooks (_build_empty, _shard, _materialize)."""
    methods: dict[str, set[str]] = {}
    for p in (PACKAGE / "backends").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                for f in node.body:
                    if isinstance(f, ast.FunctionDef):
                        methods.setdefault(f.name, set()).add(f"{p.name}:{node.name}")
    assert methods["_build"] == {"base.py:Backend"}
    assert {"fsdp.py:FSDPBackend", "deepspeed.py:DeepSpeedBackend", "single.py:SingleBackend"} <= methods[
        "_materialize"
    ]
