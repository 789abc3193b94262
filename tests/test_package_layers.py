"""The package's layers hold: no module imports a layer above its own or a peer, and no circle.

The rule table is gpas_jax.LAYERS (bottom first). Every import is read from the source with ast,
function-level and TYPE_CHECKING imports included, so a lazy import cannot hide an upward arrow.
"""

import ast
import pathlib

import pytest

import gpas_jax

PACKAGE_DIR = pathlib.Path(gpas_jax.__file__).parent


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  """The dotted name of a source file under the package directory `root`."""
  parts = (root.name,) + path.relative_to(root).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(root: pathlib.Path, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that `path` imports: `from pkg import name` is pkg.name when that is
  a module, else pkg itself (a name its __init__ defines)."""
  me = module_name(root, path)
  here = me if path.name == '__init__.py' else me.rpartition('.')[0]
  top = root.name
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split('.')[0] == top)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = here.split('.')[:len(here.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      if base.split('.')[0] != top:
        continue
      for a in node.names:
        out.add(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base)
  return out - {me}


def module_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the package's modules it imports."""
  files = {module_name(root, p): p for p in root.rglob('*.py')}
  return {m: imports_of(root, p, set(files)) & set(files) for m, p in files.items()}


def unit_of(module: str) -> str:
  """The layer unit of a module: the first name below the package (`train`, `config`)."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def layer_violations(graph: dict[str, set[str]], layers) -> list[str]:
  """One line per import that goes up or sideways, and per unit missing from the table."""
  rank = {unit: i for i, peers in enumerate(layers) for unit in peers}
  out = []
  for mod in sorted(graph):
    unit = unit_of(mod)
    if not unit:
      continue  # the package's own __init__ (the table itself)
    if unit not in rank:
      out.append(f'{mod}: {unit!r} has no place in LAYERS; add it to the layer it belongs to')
      continue
    for dep in sorted(graph[mod]):
      dep_unit = unit_of(dep)
      if dep_unit in ('', unit):
        continue
      if dep_unit not in rank:
        continue  # reported once, as its own module
      if rank[dep_unit] >= rank[unit]:
        how = 'a peer' if rank[dep_unit] == rank[unit] else 'a layer above'
        out.append(f'{mod} imports {dep}: {unit} (layer {rank[unit]}) may not import {how}, '
                   f'{dep_unit} (layer {rank[dep_unit]})')
  return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every import circle, each as the modules along it (one per strongly connected set)."""
  index, low, stack, on, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
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
        found.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_every_import_goes_down_the_layers():
  graph = module_graph(PACKAGE_DIR)
  assert len(graph) > 40 and 'gpas_jax.train.trainer' in graph
  assert layer_violations(graph, gpas_jax.LAYERS) == []


def test_no_import_circle():
  assert circles(module_graph(PACKAGE_DIR)) == []


def test_every_layer_in_the_table_exists_and_appears_once():
  units = [u for peers in gpas_jax.LAYERS for u in peers]
  assert len(units) == len(set(units))
  for unit in units:
    assert (PACKAGE_DIR / unit).is_dir() or (PACKAGE_DIR / f'{unit}.py').is_file(), unit
  # every package directory is a layer or part of one
  for sub in PACKAGE_DIR.iterdir():
    if sub.is_dir() and (sub / '__init__.py').exists():
      assert sub.name in units, sub


def test_every_subpackage_says_what_it_may_import():
  for unit in (u for peers in gpas_jax.LAYERS for u in peers):
    init = PACKAGE_DIR / unit / '__init__.py'
    if init.exists():
      doc = ast.get_docstring(ast.parse(init.read_text(encoding='utf-8')))
      assert doc and 'May import:' in doc, init


def _write(root: pathlib.Path, rel: str, text: str = '') -> None:
  p = root / rel
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(text, encoding='utf-8')


@pytest.fixture
def toy(tmp_path):
  """A toy package `pkg` with layers core < low < (mid_a, mid_b) < top, all imports downward."""
  root = tmp_path / 'pkg'
  _write(root, '__init__.py')
  _write(root, 'core.py')
  _write(root, 'low/__init__.py')
  _write(root, 'low/a.py', 'from pkg import core\n')
  _write(root, 'mid_a/__init__.py')
  _write(root, 'mid_a/x.py', 'from pkg.low import a\n')
  _write(root, 'mid_b/__init__.py')
  _write(root, 'mid_b/y.py', 'import pkg.core\n')
  _write(root, 'top/__init__.py')
  _write(root, 'top/t.py', 'from pkg.mid_a import x\nfrom pkg.mid_b import y\n')
  layers = (('core',), ('low',), ('mid_a', 'mid_b'), ('top',))
  assert layer_violations(module_graph(root), layers) == []
  assert circles(module_graph(root)) == []
  return root, layers


def test_a_planted_upward_import_is_named(toy):
  root, layers = toy
  _write(root, 'low/a.py', 'from pkg import core\n\ndef f():\n  from pkg.top import t  # lazy\n')
  v = layer_violations(module_graph(root), layers)
  assert v == ['pkg.low.a imports pkg.top.t: low (layer 1) may not import a layer above, '
               'top (layer 3)']


def test_a_peer_import_and_a_relative_one_are_caught(toy):
  root, layers = toy
  _write(root, 'mid_a/x.py', 'from pkg.low import a\nfrom ..mid_b import y\n')
  v = layer_violations(module_graph(root), layers)
  assert v == ['pkg.mid_a.x imports pkg.mid_b.y: mid_a (layer 2) may not import a peer, '
               'mid_b (layer 2)']


def test_a_package_missing_from_the_table_is_named(toy):
  root, layers = toy
  _write(root, 'extra/__init__.py')
  _write(root, 'extra/e.py', 'from pkg import core\n')
  v = layer_violations(module_graph(root), layers)
  assert v == ["pkg.extra: 'extra' has no place in LAYERS; add it to the layer it belongs to",
               "pkg.extra.e: 'extra' has no place in LAYERS; add it to the layer it belongs to"]


def test_a_circle_inside_one_layer_is_found(toy):
  root, _ = toy
  _write(root, 'low/b.py', 'from pkg.low import c\n')
  _write(root, 'low/c.py', 'from pkg.low import b\n')
  assert circles(module_graph(root)) == [['pkg.low.b', 'pkg.low.c']]
