"""The package's imports run one way: no module imports (even inside a function) one that
imports it back."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gpas_jax')


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _is_module(name: str) -> bool:
  base = os.path.join(os.path.dirname(PACKAGE), *name.split('.'))
  return os.path.exists(base + '.py') or os.path.isdir(base)


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports anywhere in its source."""
  graph = {}
  for d, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(d, f)
      deps = set()
      for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('gpas_jax'):
          for alias in node.names:
            full = f'{node.module}.{alias.name}'
            deps.add(full if _is_module(full) else node.module)
        elif isinstance(node, ast.Import):
          deps.update(a.name for a in node.names if a.name.startswith('gpas_jax'))
      name = _module_name(path)
      graph[name] = deps - {name}
  return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
  stack = [(start, [start])]
  seen = set()
  while stack:
    node, path = stack.pop()
    for nxt in graph.get(node, ()):
      if nxt == start:
        return path + [start]
      if nxt not in seen:
        seen.add(nxt)
        stack.append((nxt, path + [nxt]))
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert 'gpas_jax.train.steps' in graph['gpas_jax.train.loading']  # the graph sees imports at all
  cycles = [c for m in sorted(graph) if (c := _cycle_through(graph, m))]
  assert not cycles, ' ; '.join(' -> '.join(c) for c in cycles)
