"""Sphinx configuration: the Markdown pages in docs/ (MyST), built by scripts/docs.sh and CI.

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

project = "isic_jax"
author = "isic_jax contributors"
copyright = "isic_jax contributors, Apache-2.0"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# `page.md#a-heading` links: anchors for headings down to this level (GitHub's slugs).
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_title = "isic_jax"
html_theme_options = {
    "show_toc_level": 2,
}
