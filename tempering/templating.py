"""The one jinja2 environment of the project: HTML pages rendered from package templates.

Owns template loading and the filters templates share. Templates live in ``tempering/templates/``
(package data): ``report.html.j2`` and its sections under ``report/`` (the run report,
:mod:`tempering.html_report`), ``report.css`` (inlined into the page, so it stays one offline
file) and ``data_validate.html.j2`` (the validate stage's HTML report). Autoescape is on for every
template, and an undefined name is an error (``StrictUndefined``), never an empty string.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

from tempering import charts

TEMPLATES = Path(__file__).with_name("templates")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, extensions=["jinja2.ext.do"],
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(fmt=charts.fmt, pct=charts.pct)
    env.tests["num"] = charts.is_num
    env.globals["charts"] = charts
    return env


def render(name: str, **context) -> str:
    """Render the template ``name`` (relative to ``tempering/templates``)."""
    return environment().get_template(name).render(**context)


def read_static(name: str) -> str:
    """A static file next to the templates (the report's CSS), as text."""
    return (TEMPLATES / name).read_text(encoding="utf-8")
