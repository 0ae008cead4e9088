"""Report files from a real tiny study: every format, self-contained HTML, and a headless-Chromium render."""

import csv
import json
import re
import shutil
import subprocess

import pytest

from loraplace.analysis import analyze_store
from loraplace.analysis.report import parse_formats, tex_escape, write_report
from loraplace.errors import LoraplaceError


@pytest.fixture(scope="module")
def report(study_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    analysis = analyze_store(study_store)
    return analysis, write_report(analysis, out), out


def test_every_format_is_written(report):
    analysis, written, out = report
    assert set(written) == {"html", "md", "tex", "csv"}
    for name in ("pareto", "curves", "efficiency", "sites"):
        for fmt in ("png", "svg", "pdf"):
            assert (out / "figures" / f"{name}.{fmt}").stat().st_size > 1000
    assert not list(out.rglob(".*.tmp"))


def test_markdown_and_csv_hold_every_group(report):
    analysis, written, out = report
    md = written["md"].read_text()
    for g in analysis.groups:
        assert re.search(rf"^\| {g.placement} \| r=4 \| 2 \| {g.trainable_params:,} \|", md, re.M)
    assert "![Quality per trainable parameter](figures/pareto.png)" in md
    assert "Eval loss by layer range and role" in md  # top-half is layer-selective
    with open(written["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["placement"] for r in rows) == ["all", "attn", "top"]
    with open(out / "trials.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6


def test_latex_is_a_booktabs_table_with_figures(report):
    _, written, _ = report
    tex = written["tex"].read_text()
    for needle in ("\\toprule", "\\midrule", "\\bottomrule", "\\includegraphics[width=\\linewidth]{figures/pareto.pdf}",
                   "\\caption{Quality per trainable parameter.", "$\\pm$"):
        assert needle in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
    assert len([line for line in body.splitlines() if line.endswith("\\\\")]) == 3
    assert tex_escape("a_b & 5% ± 1") == "a\\_b \\& 5\\% $\\pm$ 1"


def test_html_is_self_contained(report):
    _, written, _ = report
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 4
    # No external asset of any kind: no http(s) src/href, no stylesheet or script links.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "<script" not in page


def test_unknown_format_is_one_clear_error():
    assert parse_formats("html, md") == ["html", "md"]
    with pytest.raises(LoraplaceError, match="unknown report format"):
        parse_formats("html,pdf")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# Flags: headless as root with no network (background networking would only fail to resolve hosts here).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const rows = [...document.querySelectorAll("#comparison tbody tr")].map(r => r.cells[0].textContent);
  const out = {images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
               widths: imgs.map(i => i.naturalWidth), rows: rows,
               trials: document.querySelectorAll("#trials tbody tr").length};
  const pre = document.createElement("pre"); pre.id = "probe-result"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium where it can: "
                    "scripts/install-browser.sh)")
    analysis, written, _ = report
    # The page under test plus a probe script that reports what the browser actually loaded.
    probed = tmp_path / "probed.html"
    probed.write_text(written["html"].read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                          "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"probe did not run; chromium said: {dom.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["images"] == 4 and result["loaded"] == 4, result
    assert all(w > 100 for w in result["widths"])
    assert sorted(result["rows"]) == sorted(g.placement for g in analysis.groups)
    assert result["trials"] == 6
    shot = tmp_path / "report.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
                    f"--screenshot={shot}", written["html"].as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_a_two_layer_placement_map_has_whole_layer_ticks(tmp_path, monkeypatch):
    """Layers are whole numbers: a 2-layer model's map is ticked 0 and 1, never −0.5, 0.5 …"""
    from loraplace.analysis import figures

    ticks = []
    save = figures._save

    def keep(fig, *args, **kwargs):
        ticks.extend(t for ax in fig.axes if ax.get_ylabel() == "layer" for t in ax.get_yticks())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(figures, "_save", keep)
    figures.site_heatmap({"all": [[1.0, 0.0], [0.0, 1.0]]}, ("attn.q", "mlp.up"), tmp_path, "sites", "t", "c", "r")
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_a_report_written_twice_is_the_same_files(report, tmp_path, monkeypatch):
    """Reports are committed beside their stores: writing one again from the same store must not churn a byte
    (SVG element ids and PDF creation dates would otherwise change on every run; the HTML's "generated" time
    follows SOURCE_DATE_EPOCH when it is set, the reproducible-builds convention)."""
    analysis = report[0]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    files = []
    for name in ("first", "second"):
        write_report(analysis, tmp_path / name)
        files.append({p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*")
                      if p.is_file()})
    first, second = files
    assert first.keys() == second.keys() and len(first) > 10
    assert [name for name in first if first[name] != second[name]] == []
    assert "generated 2023-11-14 22:13 UTC" in (tmp_path / "first" / "report.html").read_text()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(LoraplaceError, match="SOURCE_DATE_EPOCH='yesterday' is not a Unix time"):
        write_report(analysis, tmp_path / "third")


LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  // a header is broken inside a word when one of its words spans two lines (its range has two line boxes)
  const broken = [];
  for (const th of document.querySelectorAll("th")) {
    const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const re = /\\S+/g; let m;
      while ((m = re.exec(node.textContent))) {
        const range = document.createRange();
        range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
        if (tops.size > 1) broken.push(m[0]);
      }
    }
  }
  const narrowScrolls = [...document.querySelectorAll(".scroll")].filter(box => {
    const table = box.querySelector("table");
    return table && table.rows[0].cells.length <= 6 && box.scrollWidth > box.clientWidth + 1;
  }).map(box => box.querySelector("table").rows[0].textContent.slice(0, 60));
  const out = {broken: broken, pageWidth: document.documentElement.scrollWidth, viewport: window.innerWidth,
               narrowScrolls: narrowScrolls, headers: document.querySelectorAll("th").length};
  const pre = document.createElement("pre"); pre.id = "layout-result"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_report_tables_are_readable_at_1400_pixels(report, tmp_path):
    """At 1,400 px no table header breaks inside a word, the page never scrolls sideways (a wide table scrolls in
    its own box), and a table of at most six columns fits without scrolling at all."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium where it can: "
                    "scripts/install-browser.sh)")
    _, written, _ = report
    probed = tmp_path / "layout.html"
    probed.write_text(written["html"].read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--window-size=1400,2400", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="layout-result">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"probe did not run; chromium said: {dom.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["headers"] > 20
    assert result["broken"] == [], result
    assert result["pageWidth"] <= result["viewport"], result
    assert result["narrowScrolls"] == [], result
