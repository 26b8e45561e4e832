"""Every SQL, Python-search and `similar` example in README.md runs against a demo-sized catalog.

The catalog is built from the demo's tiles and months (two 31UFU sub-tiles near Hoorn, 2024-06 and
2024-07, FoMo) by the library functions the assets call; the README's paths (`data/...`) are pointed
at it. A query that fails, or an example about a chip that returns nothing, fails the test.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from catalog_data import MODELS, copy_root, shared_materialisation
from rs_embed_assets import search
from rs_embed_assets.catalog import build_catalog
from rs_embed_assets.storage import Storage

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = copy_root(shared_materialisation(tmp_path_factory), tmp_path_factory.mktemp("demo") / "data")
    storage = Storage(root)
    build_catalog(storage, models=MODELS)
    search.build_index(storage, "fomo")
    return root


class _FetchEveryQuery(ast.NodeTransformer):
    """``con.sql(...)`` as a statement → ``_ran.append((source, con.sql(...).fetchall()))``."""

    def __init__(self, source: str):
        self.source = source

    def visit_Expr(self, node: ast.Expr):
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "sql":
            fetch = ast.Call(ast.Attribute(call, "fetchall", ast.Load()), [], [])
            pair = ast.Tuple([ast.Constant(ast.get_source_segment(self.source, call)), fetch], ast.Load())
            node = ast.Expr(ast.Call(ast.Attribute(ast.Name("_ran", ast.Load()), "append", ast.Load()), [pair], []))
        return node


def test_readme_sql_examples_answer_on_the_demo_catalog(demo):
    sql_blocks = [b for b in blocks("python") if "connect_readonly" in b]
    assert sql_blocks, "README has no SQL example block"
    ran: list[tuple[str, list]] = []
    for block in sql_blocks:
        code = block.replace('"data/catalog.duckdb"', repr(str(demo / "catalog.duckdb")))
        tree = ast.fix_missing_locations(_FetchEveryQuery(code).visit(ast.parse(code)))
        exec(compile(tree, str(README), "exec"), {"_ran": ran})
    assert len(ran) >= 8
    for source, rows in ran:
        if any(m in source for m in ("similar_chips", "chip_timeseries", "chip_change", "GROUP BY model",
                                     "FROM manifest", "vectors_fomo")):
            assert rows, f"README example returned no rows on the demo catalog: {source}"


def test_readme_python_search_example_runs(demo):
    code = next(b for b in blocks("python") if "search.similar" in b)
    scope: dict = {}
    exec(code.replace('Storage("data")', f"Storage({str(demo)!r})"), scope)
    assert len(scope["hits"]) > 0 and all(h.month.isoformat() == "2024-07-01" for h in scope["hits"])


def test_readme_similar_commands_run(demo, capsys):
    from rs_embed_assets.cli import main

    lines = [ln.split("#")[0].strip() for b in blocks("bash") for ln in b.splitlines()
             if ln.strip().startswith("rs-embed-assets similar") and "..." not in ln]
    assert lines
    for line in lines:
        argv = shlex.split(line)[1:] + ["--data-root", str(demo)]
        assert main(argv) == 0, line
        assert capsys.readouterr().out.strip(), f"no neighbours printed for: {line}"
