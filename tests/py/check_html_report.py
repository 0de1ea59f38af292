"""Opens smoe-opt's HTML report in a real headless Chromium (Debian's, driven by Playwright)
and checks it against the JSON report it was made from, independently of smoe-opt's code:

- the figures the report's content calls for are all there, and no others;
- each figure is rendered: a real bounding box, and its screenshot has drawn pixels (a share
  of non-white pixels and several colours);
- the values drawn match the JSON: expert-usage cells (percent of routed slots), group
  labels, ranks / neuron counts per stored matrix, the chosen plan highlighted;
- the page loads nothing: no script, no external resource.

usage: check_html_report.py REPORT.json PAGE.html
Chromium: $SMOE_CHROMIUM, else /usr/bin/chromium.
"""
import io
import json
import os
import sys
from collections import Counter

from PIL import Image
from playwright.sync_api import sync_playwright

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HIGHLIGHT = (225, 87, 89)


def expected_figures(r):
    layers = r.get("layers") or []
    comp = [l for l in layers if l.get("compression")]
    fid = r.get("fidelity") or {}
    fblocks = fid.get("blocks") or []
    ids = set()
    if any(f > 0 for l in layers for g in l.get("groups", []) for f in g.get("frequencies", [])):
        ids.add("usage")
    if any(l["experts_after"] < l["experts_before"] or l.get("dropped") for l in layers):
        ids.add("groups")
    if comp or fblocks:
        ids.add("layer-error")
    if any(l["compression"].get("matrices") for l in comp):
        ids.add("matrix-error")
    if comp:
        ids |= {"layer-bytes", "layer-flops"}
    elif layers:
        ids.add("layer-experts")
    if (r.get("compression") or {}).get("chosen_by"):
        ids.add("plans")
    if fid:
        ids.add("fidelity")
    if fblocks:
        ids.add("block-cosine")
    return ids


def usage_labels(r):
    want = Counter()
    for l in r.get("layers") or []:
        for g in l.get("groups", []):
            for f in g.get("frequencies", []):
                want[f"{100 * f:.0f}"] += 1
    return want


def group_labels(r):
    want = Counter()
    for l in r.get("layers") or []:
        for g in l.get("groups", []):
            for m in g["members"]:
                want[f"{g['expert']}*" if m == g["expert"] else str(g["expert"])] += 1
        want["×"] += len(l.get("dropped") or [])
    return want


def matrix_labels(r):
    want = Counter()
    for l in r.get("layers") or []:
        for m in (l.get("compression") or {}).get("matrices", []):
            if m.get("rank") is not None:
                want[f"r{m['rank']}"] += 1
            elif m.get("neurons") is not None:
                want[f"n{m['neurons']}"] += 1
    return want


def pixels(im):
    b = im.tobytes()
    return [tuple(b[i : i + 3]) for i in range(0, len(b), 3)]


def contains(have, want, what):
    missing = want - have
    assert not missing, f"{what}: labels missing from the figure: {dict(missing)}"


def main():
    report = json.load(open(sys.argv[1]))
    page_path = os.path.abspath(sys.argv[2])
    html = open(page_path, encoding="utf-8").read()
    chromium = os.environ.get("SMOE_CHROMIUM", "/usr/bin/chromium")
    want_ids = expected_figures(report)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requests = []
        page.on("request", lambda q: requests.append(q.url))
        page.goto("file://" + page_path)
        assert requests == ["file://" + page_path], f"the page requested {requests}"
        n = page.evaluate("document.querySelectorAll('script,link,img,iframe,object').length")
        assert n == 0, f"{n} script/link/img/iframe/object elements"
        ids = page.eval_on_selector_all("figure.plot", "els => els.map(e => e.id)")
        assert len(ids) == len(set(ids)), ids
        assert set(ids) == want_ids, f"figures {sorted(ids)}, expected {sorted(want_ids)}"

        def texts(fid):
            return Counter(
                page.eval_on_selector_all(
                    f"figure#{fid} svg text", "els => els.map(e => e.textContent.trim())"
                )
            )

        for fid in ids:
            svg = page.locator(f"figure#{fid} svg")
            assert svg.count() == 1, fid
            box = svg.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100, (fid, box)
            im = Image.open(io.BytesIO(svg.screenshot())).convert("RGB")
            px = pixels(im)
            drawn = sum(1 for c in px if c != (255, 255, 255)) / len(px)
            colours = len(set(px))
            assert drawn > 0.03 and colours > 4, (fid, drawn, colours)
            cap = page.locator(f"figure#{fid} figcaption").inner_text()
            assert len(cap) > 20, (fid, cap)
            print(f"{fid}: {box['width']:.0f}x{box['height']:.0f} px, {100 * drawn:.1f}% drawn, "
                  f"{colours} colours")
        if "usage" in ids:
            contains(texts("usage"), usage_labels(report), "usage")
        if "groups" in ids:
            contains(texts("groups"), group_labels(report), "groups")
        if "matrix-error" in ids:
            contains(texts("matrix-error"), matrix_labels(report), "matrix-error")
        if "plans" in ids:
            chosen = [a["chosen"] for a in report["compression"]["chosen_by"]]
            im = Image.open(io.BytesIO(page.locator("figure#plans svg").screenshot())).convert("RGB")
            red = sum(1 for c in pixels(im) if c == HIGHLIGHT)
            assert (red > 50) == any(chosen), f"highlighted pixels {red}, chosen {chosen}"
            assert sum(chosen) <= 1
        summary = page.locator("table#summary").inner_text()
        for k in ("params_before", "params_after"):
            assert str(report[k]) in summary, (k, summary)
        rows = page.locator("table#blocks tr").count() - 1
        assert rows == len(report["blocks"]), (rows, len(report["blocks"]))
        browser.close()
    assert "<script" not in html.lower()
    print(f"ok: {len(ids)} figures")


if __name__ == "__main__":
    main()
