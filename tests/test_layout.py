"""The seams between modules: no import circle, and each rule defined in one place."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tipsen", "flows", "service")


def _imports() -> dict[str, set[str]]:
    """Every project module's project imports, including those inside functions (a lazy import is still an edge)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_import_graph_has_no_circle():
    graph, state, cycles = _imports(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 20 and graph["tipsen.config"]  # the walk really saw the package
    assert cycles == [], " -> ".join(cycles[0])


def _files(pattern: str) -> set[str]:
    """The project files with a line matching `pattern`."""
    rx = re.compile(pattern)
    return {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if any(rx.search(line) for line in p.read_text(encoding="utf-8").splitlines())}


def test_one_definition_of_each_rule():
    assert _files(r"2\s*\*\*\s*(31|32|63)|0x7FFFFFFF") == {"tipsen/config.py"}  # one seed range
    for bound in (r"ge=1, le=50\b", r"le=20\.0\b", r"ge=0\.0, le=2\.0, strict", r"ge=8, le=4096"):  # sampling bounds
        assert _files(bound) == {"tipsen/config.py"}, bound
    # one atomic writer: temporary names and renames live in tipsen/io.py
    assert _files(r"mkstemp|mkdtemp|\.tmp\b") == {"tipsen/io.py"}
    assert _files(r"os\.replace\(|\.rename\(") == {"tipsen/io.py"}
    assert _files(r"^class ConfigError") == {"tipsen/errors.py"}
    assert _files(r"def describe\(|\['msg'\]|\[\"msg\"\]") == {"tipsen/errors.py"}  # one error formatter


def test_core_packages_are_pinned_and_the_image_decoder_is_patched():
    import tomllib

    deps = _declared()
    spec = {re.split(r"[=<>!~]", d, maxsplit=1)[0].strip().lower(): d for d in deps}
    for name in ("torch", "torchvision", "diffusers", "peft", "transformers", "safetensors", "open_clip_torch",
                 "bentoml", "prefect", "dvc"):
        assert "==" in spec[name], spec[name]  # the model and serving stack moves only on purpose
    floor = re.search(r">=\s*([\d.]+)", spec["pillow"]).group(1)
    assert tuple(map(int, floor.split("."))) >= (13, 0, 0)  # curation decodes untrusted images


def _declared() -> list[str]:
    """Every requirement pyproject.toml declares, the core's and each extra's, less the extras' self-references."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [d for group in project["optional-dependencies"].values() for d in group]
    return [d for d in [*project["dependencies"], *extras] if not d.startswith("tipsen[")]


def test_every_imported_package_is_declared_in_its_extra():
    """A third-party module imported by tipsen/, service/ or flows/ belongs to a distribution pyproject declares:
    the core for tipsen/ (bar the lazily imported dvc, bentoml and prefect), the serve extra for service/, and
    the flows extra for flows/."""
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = lambda group: {_canonical(re.split(r"[=<>!~;\[\s]", d, maxsplit=1)[0]) for d in group}  # noqa: E731
    core, extras = names(project["dependencies"]), project["optional-dependencies"]
    allowed = {"tipsen": core | names(extras["dvc"]), "service": core | names(extras["serve"]),
               "flows": core | names(extras["flows"])}
    dists = importlib.metadata.packages_distributions()
    missing = []
    for folder, ok in allowed.items():
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module.split(".")[0]]
                else:
                    continue
                for mod in mods:
                    if mod in sys.stdlib_module_names or mod in ("tipsen", "service", "flows"):
                        continue
                    if not {_canonical(d) for d in dists.get(mod, [mod])} & ok:
                        missing.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not missing, sorted(set(missing))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: open_clip_torch is open-clip-torch


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def test_the_service_image_pins_what_pyproject_pins():
    """The Bento installs service/requirements.txt: a package pinned exactly for tipsen is pinned the same there,
    and the image decoder's floor holds there too."""
    import tomllib

    pinned = {_canonical(d.split("==")[0]): d.split("#")[0].strip() for d in _declared() if "==" in d}
    service = {}
    for line in (ROOT / "service" / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            service[_canonical(re.split(r"[=<>!~]", line, maxsplit=1)[0])] = line
    for name, spec in service.items():
        if name in pinned:
            assert spec.replace(" ", "") == pinned[name].replace(" ", ""), (spec, pinned[name])
    assert _release(re.search(r">=\s*([\d.]+)", service["pillow"]).group(1)) >= (13, 0, 0)


def test_the_lock_pins_each_package_once_and_agrees_with_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [line.strip() for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()]
    assert lines[0].startswith("#") and any("make lock" in line for line in lines if line.startswith("#"))
    locked: dict[str, str] = {}
    for line in (line for line in lines if line and not line.startswith("#")):
        found = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\d[0-9A-Za-z.+!-]*)", line)
        assert found, f"requirements.lock: {line!r} is not name==version"
        name = _canonical(found[1])
        assert name not in locked, f"requirements.lock: {name} twice"
        locked[name] = found[2]
    assert "tipsen" not in locked and "pip" not in locked  # the project is installed on top, --no-deps
    assert project["optional-dependencies"]["test"][0] == "tipsen[serve,dvc,flows]"  # make test installs it all
    for dep in _declared():
        name = _canonical(re.split(r"[=<>!~;\[\s]", dep, maxsplit=1)[0])
        assert name in locked, f"{dep!r} is not in requirements.lock; run make lock"
        for op, bound in re.findall(r"(==|>=|<)\s*([\d.]+)", dep.split("#")[0]):
            have, want = locked[name], bound
            ok = {"==": have == want, ">=": _release(have) >= _release(want), "<": _release(have) < _release(want)}[op]
            assert ok, f"pyproject.toml wants {dep!r}; requirements.lock has {name}=={have}; run make lock"


def test_a_missing_extra_is_one_line_naming_it():
    from tipsen.errors import ConfigError, require

    require("yaml", "serve", what="serve")  # installed: nothing to say
    with pytest.raises(ConfigError) as info:
        require("no_such_module_for_tipsen", "serve", what="serve")
    assert str(info.value) == ("serve: needs no_such_module_for_tipsen, which this installation lacks; install it "
                               "with pip install 'tipsen[serve]'")


def test_the_bento_installs_a_lock_that_is_current():
    """service/requirements.lock pins every package of the Bento's environment at requirements.lock's version, and
    is what scripts/bento-lock.py makes from this environment now (so `make lock` has been run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bento_lock", ROOT / "scripts" / "bento-lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = [line for line in (ROOT / "service" / "requirements.lock").read_text(encoding="utf-8").splitlines()
             if line and not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    dev = {_canonical(k): v for k, v in (line.split("==") for line in
                                         (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
                                         if line and not line.startswith("#"))}
    assert all(dev.get(_canonical(name)) == version for name, version in pins.items()), \
        {n: (v, dev.get(_canonical(n))) for n, v in pins.items() if dev.get(_canonical(n)) != v}
    roots = [r.split("#")[0].strip() for r in (ROOT / "service" / "requirements.txt").read_text().splitlines()]
    assert pins == module.closure([r for r in roots if r] + module.ALSO)
    assert {"torch", "diffusers", "bentoml", "kiwipiepy-model"} <= set(pins)
    bentofile = (ROOT / "bentofile.yaml").read_text(encoding="utf-8")
    assert 'requirements_txt: "service/requirements.lock"' in bentofile


def test_only_the_demo_tests_and_benchmarks_run_offline(tmp_path):
    """`make paper` downloads the real models on a fresh machine: it is not forced offline as the demo is."""
    import os
    import subprocess

    stub = tmp_path / "bin"  # a stand-in for dvc (the paper run itself needs a GPU): it prints what it was given
    stub.mkdir()
    for tool in ("dvc", "tipsen"):  # ...and so does tipsen, for the fetch before it
        (stub / tool).write_text(f'#!/bin/sh\necho "{tool} offline=${{HF_HUB_OFFLINE:-unset}},'
                                 f'${{TRANSFORMERS_OFFLINE:-unset}} $1 $2"\n')
        (stub / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MAKEFLAGS")}
    env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"  # before any real dvc; BIN names no folder
    paper = subprocess.run(["make", "-s", "-o", "venv", "BIN=.no-such-folder", "paper"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert paper.returncode == 0, paper.stderr
    assert paper.stdout.strip().splitlines() == ["tipsen offline=unset,unset models fetch",  # the models first
                                                 "dvc offline=unset,unset exp run"]
    for target in ("demo", "test", "test-fast", "bench"):  # the tiny models, built here: never the network
        dry = subprocess.run(["make", "-n", "-o", "venv", target], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60)
        assert "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in dry.stdout, (target, dry.stdout)
