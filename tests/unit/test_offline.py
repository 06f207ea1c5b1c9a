"""`dvc plots show` in a workspace writes a page that draws its curves with no network: DVC's
own page loads vega from a CDN (a real DVC repo and DVC's own command; the rendered page:
tests/e2e/test_browser.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from ratchet.offline import PLOTS_TEMPLATE, install_plots_template
from ratchet.workspace import tool_env


def test_dvc_plots_show_inlines_vega_instead_of_loading_it_from_a_cdn(tmp_path):
    ws = tmp_path

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=tool_env(),
                              capture_output=True, text=True, check=True).stdout

    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    dvc("init", "-q")
    (ws / "curve.csv").write_text("step,loss\n1,2.0\n2,1.5\n3,1.1\n")
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"curve.csv": {"x": "step",
                                                                          "y": "loss"}}]}))

    def scripts() -> list[str]:
        dvc("plots", "show", "-o", "dvc_plots")
        page = (ws / "dvc_plots" / "index.html").read_text()
        assert "curve.csv" in page  # the plot's spec is on the page either way
        return re.findall(r'<script[^>]+src="([^"]+)"', page)

    assert any("cdn.jsdelivr.net" in s for s in scripts())  # DVC's own page
    assert install_plots_template(ws) and not install_plots_template(ws)  # once
    assert scripts() == []
    page = (ws / "dvc_plots" / "index.html").read_text()
    assert "vegaEmbed" in page and len(page) > 100_000  # the library itself, inlined
    # The template is the workspace's local business: git-ignored (DVC's own .gitignore keeps
    # config.local out of git; ratchet's keeps .ratchet/ out).
    assert (ws / PLOTS_TEMPLATE).is_file()
    assert "config.local" in (ws / ".dvc" / ".gitignore").read_text()
