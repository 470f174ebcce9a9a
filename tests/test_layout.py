"""The package layout holds: no import cycle among the project's modules, and
`echo_jax/diarization` is model-agnostic (imports nothing of the model or the
trainer). Static: reads the imports with `ast`, imports nothing."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("echo_jax", "data_pipelines", "experiments", "tools")


def module_imports() -> dict[str, set[str]]:
  """{module: project modules it imports, lazily inside functions too}."""
  modules = {}
  for package in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(open(path).read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        # `from pkg import mod` depends on pkg.mod; `from mod import f` on mod.
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"
                 in modules else node.module for a in node.names]
      else:
        continue
      # A module's parent packages are initialised before it anyway.
      deps |= {n for n in names if n in modules and n != name
               and not name.startswith(n + ".")}
    graph[name] = deps
  return graph


def find_cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycle():
  graph = module_imports()
  assert "echo_jax.trainer" in graph and "echo_jax.diarizer" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c",
                                                              "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_diarization_package_is_model_agnostic():
  graph = module_imports()
  for name, deps in graph.items():
    if name.startswith("echo_jax.diarization"):
      outside = {d for d in deps if d.startswith("echo_jax")
                 and not d.startswith("echo_jax.diarization")}
      assert not outside, (name, outside)
