"""Tests of the named-query loader: sections, comments left out, and sections included in others."""

from pathlib import Path

import pytest

from app.service.db.queries import load_queries


def queries_of(tmp_path: Path, text: str) -> dict[str, str]:
    (tmp_path / "queries.sql").write_text(text)
    return load_queries(str(tmp_path / "module.py"))


def test_each_section_is_a_statement_without_its_comments(tmp_path: Path) -> None:
    queries = queries_of(tmp_path, "-- one --\n-- says: why\nSELECT 1\n\n-- two --\nSELECT 2 -- kept\n")
    assert queries == {"one": "SELECT 1", "two": "SELECT 2 -- kept"}


def test_an_include_line_stands_for_the_section_it_names(tmp_path: Path) -> None:
    queries = queries_of(
        tmp_path,
        "-- shared --\n-- not a statement\nb AS (SELECT 2)\n\n"
        "-- first --\nWITH a AS (SELECT 1),\n-- include shared --\nSELECT * FROM a, b\n\n"
        "-- second --\nWITH c AS (SELECT 3),\n-- include shared --\nSELECT * FROM c, b\n",
    )
    assert queries["first"] == "WITH a AS (SELECT 1),\nb AS (SELECT 2)\n\nSELECT * FROM a, b"
    assert queries["second"] == "WITH c AS (SELECT 3),\nb AS (SELECT 2)\n\nSELECT * FROM c, b"


def test_an_include_of_no_section_above_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names no section above it"):
        queries_of(tmp_path, "-- first --\nWITH a AS (SELECT 1),\n-- include later --\nSELECT 1\n\n-- later --\nb\n")


def test_an_include_from_a_sibling_folder_stands_for_that_folders_section(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "queries.sql").write_text("-- common --\n-- not a statement\nb AS (SELECT 2)\n")
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "queries.sql").write_text(
        "-- first --\nWITH a AS (SELECT 1),\n-- include common from shared --\nSELECT * FROM a, b\n"
    )
    queries = load_queries(str(tmp_path / "domain" / "module.py"))
    assert queries["first"] == "WITH a AS (SELECT 1),\nb AS (SELECT 2)\nSELECT * FROM a, b"


def test_an_include_of_no_section_of_the_sibling_folder_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "queries.sql").write_text("-- common --\nb AS (SELECT 2)\n")
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "queries.sql").write_text("-- first --\n-- include other from shared --\nSELECT 1\n")
    with pytest.raises(ValueError, match="names no section above it"):
        load_queries(str(tmp_path / "domain" / "module.py"))
