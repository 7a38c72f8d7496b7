"""MkDocs hooks for the documentation site (mkdocs.yml names this file under ``hooks``).

The docstrings use Sphinx's roles (``:class:`~paramscope.Inventory```), which Markdown renders as
the role's name before the code; the site shows the code alone, by its last name when marked ``~``.
"""

import re

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data):<code>(~?)([\w.]+)</code>")


def _name(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_name, html)
