//! The HTML report (`--report-html`, `smoe-opt report REPORT.json --html PAGE`): opened in a
//! real headless Chromium and checked against the JSON report it was made from by
//! `tests/py/check_html_report.py` (Playwright, Pillow; no smoe-opt code): the figures the
//! report calls for are present, rendered and non-empty, and show the JSON's values. The
//! browser is Debian's `chromium` (scripts/test.sh installs it), or `$SMOE_CHROMIUM`.
mod common;
use common::*;
use std::path::{Path, PathBuf};

fn chromium() -> PathBuf {
    let p = std::env::var_os("SMOE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.exists(),
        "{} not found: install Debian's chromium (apt-get install chromium; scripts/test.sh \
         does) or set SMOE_CHROMIUM",
        p.display()
    );
    p
}

fn check_page(py: &Path, report: &Path, page: &Path) -> std::process::Output {
    let mut c = std::process::Command::new(py);
    c.arg(root().join("tests/py/check_html_report.py"))
        .arg(report)
        .arg(page)
        .env("SMOE_CHROMIUM", chromium());
    c.output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A compression segment by segment (per-block held-out errors), one whose plans were
/// compared end to end, a merge (usage and groups) and a pruning (dropped experts): each
/// run's `--report-html` page renders in Chromium, matches its JSON, and equals the page
/// `smoe-opt report` makes from the saved JSON, byte for byte.
#[test]
fn html_reports_render_in_a_browser_and_match_their_json() {
    let Some(py) = python() else { return };
    let lm = root().join("testdata/lm");
    let tmp = tempfile::tempdir().unwrap();
    let calib = [
        "--calib-text",
        lm.join("calib.txt").to_str().unwrap(),
        "--tokenizer",
        lm.join("tokenizer.json").to_str().unwrap(),
        "--seq-len",
        "64",
        "--holdout",
        "0.1",
    ]
    .map(String::from);
    let cases: [(&str, &[&str], &[&str]); 4] = [
        (
            "segments",
            &[
                "--target-size",
                "0.5",
                "--compress",
                "low-rank",
                "--memory-limit",
                "4M",
            ],
            &["layer-error", "matrix-error", "block-cosine"],
        ),
        (
            "plans",
            &["--target-size", "0.5", "--compress", "neurons"],
            &["plans", "layer-bytes", "layer-flops"],
        ),
        ("merge", &["--keep", "0.5"], &["usage", "groups"]),
        (
            "prune",
            &["--method", "prune-frequency", "--keep", "0.5"],
            &["groups"],
        ),
    ];
    let mut reports = vec![];
    for (name, args, figures) in cases {
        let out = tmp.path().join(format!("{name}.onnx"));
        let page = tmp.path().join(format!("{name}.html"));
        let mut all: Vec<&str> = args.to_vec();
        all.extend(calib.iter().map(String::as_str));
        all.extend(["--report-html", page.to_str().unwrap()]);
        let r = reduce(&lm.join("model.onnx"), &out, &all);
        assert!(r.ok, "{name}: {}", r.stderr);
        let html = std::fs::read_to_string(&page).unwrap();
        for f in figures {
            assert!(
                html.contains(&format!("<figure id=\"{f}\"")),
                "{name}: no figure {f}"
            );
        }
        // The saved JSON renders to the same page.
        let report = out.with_extension("report.json");
        let again = tmp.path().join(format!("{name}.again.html"));
        let o = bin()
            .arg("report")
            .arg(&report)
            .arg("--html")
            .arg(&again)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(
            std::fs::read(&again).unwrap() == html.as_bytes(),
            "{name}: the page from the saved report differs from the run's"
        );
        let o = check_page(&py, &report, &page);
        assert!(o.status.success(), "{name}: {}", text(&o));
        eprintln!("{name}: {}", text(&o));
        reports.push(report);
    }
    // The reports drawn fit the committed report schema.
    assert_fits_schema(&py, &root().join("schemas/report.schema.json"), &reports);

    // The checker can fail: a usage share the page does not show, and a figure missing.
    let report = tmp.path().join("merge.report.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    doc["layers"][0]["groups"][0]["frequencies"][0] = serde_json::json!(0.987);
    let tampered = tmp.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec(&doc).unwrap()).unwrap();
    let o = check_page(&py, &tampered, &tmp.path().join("merge.html"));
    assert!(!o.status.success(), "a wrong usage share passed");
    assert!(text(&o).contains("labels missing"), "{}", text(&o));
    let html = std::fs::read_to_string(tmp.path().join("merge.html")).unwrap();
    let cut = tmp.path().join("cut.html");
    std::fs::write(&cut, html.replace("<figure id=\"groups\"", "<div id=\"x\"")).unwrap();
    let o = check_page(&py, &report, &cut);
    assert!(!o.status.success(), "a missing figure passed");
}

/// A copy (no method) has nothing to draw: the page says so in each section.
#[test]
fn a_report_without_reduction_renders_its_notes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("testdata/models/mixtral_v4_ts");
    let out = tmp.path().join("copy.onnx");
    let r = reduce(&dir.join("model.onnx"), &out, &[]);
    assert!(r.ok, "{}", r.stderr);
    let page = tmp.path().join("copy.html");
    let o = bin()
        .arg("report")
        .arg(out.with_extension("report.json"))
        .arg("--html")
        .arg(&page)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains("<figure"), "figures drawn from nothing");
    assert!(html.contains("No layer was reduced"));
    assert!(html.contains("table id=\"summary\""));
}

/// Bad input to `smoe-opt report`: the file and the fault named, non-zero exit, no page.
#[test]
fn report_command_refuses_bad_input_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("p.html");
    let cases: [(&str, &[u8], &str); 3] = [
        ("garbage.json", b"{not json", "not a JSON report"),
        ("other.json", b"{\"a\": 1}", "not a smoe-opt report"),
        (
            "typed.json",
            b"{\"blocks\": [], \"layers\": \"many\"}",
            "unexpected type",
        ),
    ];
    for (name, bytes, msg) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = bin()
            .arg("report")
            .arg(&p)
            .arg("--html")
            .arg(&page)
            .output()
            .unwrap();
        let err = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(msg) && err.contains(name), "{name}: {err}");
        assert!(!page.exists(), "{name}: a page was written");
    }
    // The page may not overwrite the report.
    let p = tmp.path().join("other.json");
    let o = bin()
        .arg("report")
        .arg(&p)
        .arg("--html")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\": 1}");
}
