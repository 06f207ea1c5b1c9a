"""The web pages a workspace makes, readable with no network: Data Docs and `dvc plots show`.

great-expectations' Data Docs load jQuery, Bootstrap, Font Awesome, bootstrap-table and vega
from CDNs, and `dvc plots show` loads vega from one: offline, the Data Docs index is unstyled
and lists no validations (bootstrap-table builds its tables from JSON in the page) and the
plots page draws no curve. The libraries come from Python packages instead (XStatic-jQuery,
XStatic-Bootstrap, XStatic-Font-Awesome, vl-convert-python): copied next to the pages when they
are written, never kept in this repository or a workspace's git.

- Data Docs (`localize_site`): each page's CDN tags point at `static/vendor/` inside the site;
  what has no package (bootstrap-table, its filter and date-picker add-ons, a dark theme) is
  dropped, and the index's tables, which bootstrap-table would have drawn, are written into
  the page as plain rows (sorted as it would; no search or paging). Idempotent.
- `dvc plots show` / `dvc plots diff` (`install_plots_template`): the workspace's local DVC
  config names an HTML template with vega inlined (`plots.html_template`), so DVC puts in no
  CDN tags. The template is made once per machine (vl-convert bundles vega in a few seconds)
  and copied into the workspace's git-ignored `.ratchet/`.
"""

from __future__ import annotations

import ast
import html
import os
import re
import shutil
from pathlib import Path

VENDOR = Path("static") / "vendor"  # inside a Data Docs site, beside GX's own static/
PLOTS_TEMPLATE = Path(".ratchet") / "plots-template.html"
# Vega-Lite 5 for DVC: dvc-render's specs are written for it.
DVC_VEGA_LITE = "5.20"


def _xstatic(name: str) -> Path:
    import importlib

    return Path(importlib.import_module(f"xstatic.pkg.{name}").BASE_DIR)


def vendor_files() -> dict[str, Path]:
    """Path under the site's VENDOR -> the installed file to copy there."""
    bootstrap, fonts = _xstatic("bootstrap"), _xstatic("font_awesome")
    files = {
        "jquery/jquery.min.js": _xstatic("jquery") / "jquery.min.js",
        "bootstrap/css/bootstrap.min.css": bootstrap / "css" / "bootstrap.min.css",
        # the bundle holds Popper 1, which the pages load on their own from a CDN
        "bootstrap/js/bootstrap.bundle.min.js": bootstrap / "js" / "bootstrap.bundle.min.js",
        "fontawesome/css/all.min.css": fonts / "css" / "all.min.css",
    }
    # woff2 only: every browser that runs the pages reads it, and it is the smallest
    for font in sorted((fonts / "webfonts").glob("*.woff2")):
        files[f"fontawesome/webfonts/{font.name}"] = font
    return files


# CDN address (or its prefix, ending in @ or /) -> the vendor file, None to drop the tag, or
# VEGA for vega (inlined where a page draws a chart; none of ratchet's expectations does).
VEGA = "vega"
CDN: dict[str, str | None] = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": None,
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        "bootstrap/js/bootstrap.bundle.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        "bootstrap/css/bootstrap.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "fontawesome/css/all.min.css",
    "https://unpkg.com/bootstrap-table@": None,
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/": None,
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@": None,
    "https://cdn.jsdelivr.net/npm/vega@5": VEGA,
    "https://cdn.jsdelivr.net/npm/vega-lite@5": None,
    "https://cdn.jsdelivr.net/npm/vega-embed@6": None,
}
GX_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
_TAG = re.compile(r'<script\s+src="(?P<script>[^"]+)"[^>]*>\s*</script>'
                  r'|<link\s+(?:[^>]*?\s)?href="(?P<link>[^"]+)"[^>]*>')
# The index's `$('#id').bootstrapTable(Object.assign({columns, data, toolbar}, {options}))`.
_TABLE = re.compile(
    r"\$\('#(?P<id>[^']+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*"
    r"columns: (?P<cols>\[.*?\]),\s*data: (?P<data>\[.*?\]),\s*toolbar: '[^']*'\s*\},\s*"
    r"(?P<opts>\{[^{}]*\})\s*\)\s*\);", re.S)
_GUARD = "/* ratchet: offline */"


def _target(url: str) -> tuple[bool, str | None]:
    for prefix, target in CDN.items():
        if url == prefix or (prefix[-1] in "@/" and url.startswith(prefix)):
            return True, target
    return False, None


def cache_dir() -> Path:
    """The per-user cache of what is built once per machine (the vega bundle)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ratchet"


def vega_bundle(vega_lite: str | None = None) -> str:
    """vega, vega-lite and vega-embed as one classic script (from vl-convert, offline), safe
    to inline in a page; cached per machine, keyed by vl-convert's version."""
    from importlib.metadata import version

    import vl_convert

    path = cache_dir() / f"vega-{version('vl-convert-python')}-{vega_lite or 'default'}.js"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    js = (vl_convert.javascript_bundle(vl_version=vega_lite) if vega_lite
          else vl_convert.javascript_bundle()).replace("</script", "<\\/script")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(js, encoding="utf-8")
    os.replace(tmp, path)
    return js


def _static_table(cols: list[dict], data: list[dict], opts: dict) -> str:
    """The rows bootstrap-table would draw (in its sort order), as plain HTML; a row with a
    link opens it on click, as in GX's index."""
    sort = opts.get("sortName")
    if sort:
        key = next((c.get("sortName", sort) for c in cols if c.get("field") == sort), sort)

        def order(row: dict) -> tuple:
            value = row.get(key)
            return (value is None, value if isinstance(value, (int, float)) else str(value))

        data = sorted(data, key=order, reverse=opts.get("sortOrder") == "desc")

    def align(col: dict) -> str:
        return f' class="text-{html.escape(str(col.get("align", "left")))}"'

    head = "".join(f"<th{align(c)}>{html.escape(str(c.get('title', '')))}</th>" for c in cols)
    rows = []
    for row in data:
        link = row.get("_table_row_link_path")
        attrs = (f' class="clickable-row" style="cursor: pointer" data-href="{html.escape(link)}"'
                 ' onclick="window.location=this.dataset.href"' if link else "")
        # cell values are GX's own markup (links, status icons), as bootstrap-table shows them
        cells = "".join(f"<td{align(c)}>{row.get(c.get('field'), '')}</td>" for c in cols)
        rows.append(f"<tr{attrs}>{cells}</tr>")
    return f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"


def _guard_tables(text: str) -> str:
    """Run a page's bootstrap-table calls only where the plugin is loaded: without it the first
    call throws and stops the rest of its script."""
    def wrap(m: re.Match) -> str:
        body = m[1]
        if _GUARD in body or not re.search(r"\.bootstrapTable\(\s*Object\.assign", body):
            return m[0]
        test = "window.jQuery && jQuery.fn.bootstrapTable"
        return f"<script>{_GUARD} if ({test}) {{{body}}}</script>"

    return re.sub(r"<script>(.*?)</script>", wrap, text, flags=re.S)


def localize_page(page: Path, root: Path) -> bool:
    """Point one Data Docs page at the site's own copies; True if it changed."""
    text = original = page.read_text(encoding="utf-8")
    vendor = Path(os.path.relpath(root / VENDOR, page.parent)).as_posix()
    images = Path(os.path.relpath(root / "static" / "images", page.parent)).as_posix()
    draws_chart = "vegaEmbed('#" in text

    def swap(m: re.Match) -> str:
        url = m["script"] or m["link"]
        known, target = _target(url)
        if not known:
            return m[0]
        if target is None or (target == VEGA and not draws_chart):
            return ""
        if target == VEGA:
            return f"<script>{vega_bundle()}</script>"
        return re.sub(r'\s(integrity|crossorigin)="[^"]*"', "",
                      m[0].replace(url, f"{vendor}/{target}"))

    text = _TAG.sub(swap, text)
    # GX's logo (a copy is in the site's static/images), also as the dark theme's logo
    text = re.sub(re.escape(GX_ASSETS) + r'logo-long\.png(\?d=[^"]*)?', f"{images}/logo-long.png",
                  text)
    text = text.replace(GX_ASSETS + "full_logo_dark.png", f"{images}/logo-long.png")
    if ".bootstrapTable(" in text:
        for m in list(_TABLE.finditer(text)):
            try:
                cols, data, opts = (ast.literal_eval(m[k]) for k in ("cols", "data", "opts"))
            except (ValueError, SyntaxError):
                continue
            empty = re.compile(r'(<table\s+id="' + re.escape(m["id"]) + r'"[^>]*>)\s*</table>')
            text = empty.sub(lambda t, c=cols, d=data, o=opts:
                             t[1] + _static_table(c, d, o) + "</table>", text, count=1)
        text = _guard_tables(text)
    if text == original:
        return False
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, page)
    return True


def localize_site(root: Path) -> int:
    """Make a Data Docs site readable offline: the libraries beside it, every page pointed at
    them. Returns the pages changed."""
    for rel, src in vendor_files().items():
        dest = root / VENDOR / rel
        if dest.is_file() and dest.stat().st_size == src.stat().st_size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return sum(localize_page(p, root) for p in sorted(root.rglob("*.html")))


def plots_template() -> str:
    """An HTML template for `dvc plots show` with vega inlined: it has no `{scripts}`, so DVC
    adds no CDN tags; `{plot_divs}` is where DVC puts the plots."""
    return ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset=\"utf-8\">\n"
            "    <title>ratchet: DVC plots</title>\n"
            f"    <script>{vega_bundle(DVC_VEGA_LITE)}</script>\n"
            "    <style>table { border-spacing: 15px; } img { max-width: 100%; }</style>\n"
            "</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n")


def install_plots_template(ws: Path) -> bool:
    """Make `dvc plots show` in the workspace render offline (see the module's text): the
    template into `.ratchet/`, its path into `.dvc/config.local`. True if anything changed;
    a no-op where both are there already."""
    from dvc.config import Config

    template = ws / PLOTS_TEMPLATE
    relative = Path(os.path.relpath(template, ws / ".dvc")).as_posix()
    current = Config(str(ws / ".dvc")).read("local").get("plots", {}).get("html_template")
    if template.is_file() and current and Path(ws / ".dvc" / current).resolve() == template:
        return False
    text = plots_template()
    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_name(f"{template.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, template)
    with Config(str(ws / ".dvc")).edit("local") as local:
        local.setdefault("plots", {})["html_template"] = relative
    return True
