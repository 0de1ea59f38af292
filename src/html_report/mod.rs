//! The visual report (`--report-html FILE`, `smoe-opt report REPORT.json --html FILE`): one
//! self-contained HTML page, its figures inline SVG drawn with `plotters`, no script and no
//! network. It shows expert usage per layer, the groups or kept experts, per-layer and
//! per-matrix calibrated error, ranks and bytes before/after, the plans compared and the
//! held-out fidelity. The page is rendered from the `--report` JSON document, so a saved
//! report renders to the same page as the run that wrote it.
use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

mod charts;
mod view;

use charts::{Bars, Cell, Heatmap};
use view::View;

/// Reports larger than this are refused (a report of a model with thousands of layers is a
/// few MB).
const MAX_REPORT_BYTES: u64 = 256 << 20;

/// Renders a pipeline report as an HTML page.
pub fn render_report(report: &crate::pipeline::PipelineReport) -> Result<String> {
    let v = serde_json::to_value(report).map_err(|e| Error::Usage(format!("report: {e}")))?;
    render_value(v, None)
}

/// Renders a saved `--report` JSON file as an HTML page.
pub fn render_file(path: &Path) -> Result<String> {
    let text = crate::inputs::read_text(path, MAX_REPORT_BYTES, "report")?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Input {
        path: path.to_path_buf(),
        reason: format!("not a JSON report: {e}"),
    })?;
    if !v.is_object() || v.get("blocks").is_none() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "not a smoe-opt report (no \"blocks\"; make one with --report)".into(),
        });
    }
    render_value(v, Some(path))
}

/// `path`: the saved report the document came from (its faults are the file's).
fn render_value(v: serde_json::Value, path: Option<&Path>) -> Result<String> {
    let view: View = serde_json::from_value(v).map_err(|e| {
        let reason = format!("keys of an unexpected type for the HTML report: {e}");
        match path {
            Some(p) => Error::Input {
                path: p.to_path_buf(),
                reason,
            },
            None => Error::Usage(format!("the report: {reason}")),
        }
    })?;
    page(&view).map_err(|e| Error::Usage(format!("drawing the report's figures: {}", e.0)))
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn human(b: u64) -> String {
    crate::inspect::human_bytes(b)
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}\
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;\
text-align:left;font-size:13px}th{background:#f4f4f4}figure{margin:12px 0;overflow-x:auto}\
figcaption{font-size:13px;color:#555;max-width:900px}.note{color:#777;font-size:13px}";

/// One figure: its SVG and what it shows.
struct Figure {
    id: String,
    svg: String,
    caption: String,
    /// HTML after the caption (a table that explains the figure).
    extra: String,
}

fn page(v: &View) -> std::result::Result<String, charts::ChartError> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>smoe-opt report: {}</title><style>{STYLE}</style></head><body>\n",
        esc(&v.input)
    );
    let _ = writeln!(
        h,
        "<h1>smoe-opt: {} → {}</h1>",
        esc(&v.input),
        esc(&v.output)
    );
    summary(&mut h, v);
    // Each section: its title, what it says when there is nothing to draw, its figures.
    let sections: [(&str, &str, Vec<Figure>); 5] = [
        (
            "Expert usage and groups",
            "No layer was reduced: the report has no routing statistics.",
            usage_figures(v)?,
        ),
        (
            "Calibrated error",
            "No compression or held-out measurement in this report.",
            error_figures(v)?,
        ),
        (
            "Bytes, ranks and FLOPs",
            "No layer was reduced.",
            size_figures(v)?,
        ),
        (
            "Plans compared",
            "Only one plan was built (no end-to-end comparison).",
            plan_figures(v)?,
        ),
        (
            "Held-out fidelity",
            "The written model was not measured against the original (no held-out samples).",
            fidelity_figures(v)?,
        ),
    ];
    for (title, empty, figs) in sections {
        let _ = writeln!(h, "<h2>{}</h2>", esc(title));
        if figs.is_empty() {
            let _ = writeln!(h, "<p class=\"note\">{}</p>", esc(empty));
        }
        for f in figs {
            let _ = writeln!(
                h,
                "<figure id=\"{}\" class=\"plot\">{}<figcaption>{}</figcaption>{}</figure>",
                esc(&f.id),
                f.svg,
                esc(&f.caption),
                f.extra
            );
        }
    }
    matrix_table(&mut h, v);
    h.push_str("</body></html>\n");
    Ok(h)
}

fn summary(h: &mut String, v: &View) {
    let mut rows: Vec<(&str, String)> = vec![
        ("method", v.method.clone().unwrap_or_else(|| "copy".into())),
        (
            "bytes on disk",
            format!("{} → {}", human(v.bytes_before), human(v.bytes_after)),
        ),
        (
            "parameters",
            format!("{} → {}", v.params_before, v.params_after),
        ),
        ("nodes", format!("{} → {}", v.nodes_before, v.nodes_after)),
        (
            "MoE blocks",
            format!(
                "{} detected, {} rewritten",
                v.blocks_detected,
                v.blocks.iter().filter(|b| b.rewritten).count()
            ),
        ),
    ];
    if let Some(c) = &v.compression {
        rows.push((
            "expert bytes",
            format!(
                "{} → {} ({:.1}% of the original; budget {}), family {}, {} pipeline",
                human(c.bytes_before),
                human(c.bytes_after),
                100.0 * c.fraction,
                human(c.budget_bytes),
                c.family,
                c.pipeline
            ),
        ));
        rows.push(("plan", c.plan.clone()));
    }
    if let Some(c) = &v.calibration {
        rows.push((
            "calibration",
            format!(
                "{} ({} runtime): {} samples fitted, {} tokens; {} held out ({})",
                c.source, c.runtime, c.samples_fit, c.tokens, c.samples_heldout, c.heldout_source
            ),
        ));
    }
    if let Some(f) = &v.fidelity {
        let mut s = format!(
            "{} samples, {} positions, outputs {}: rel L2 {:.4}, cosine {:.4}",
            f.samples,
            f.positions,
            f.outputs.join(", "),
            f.rel_l2,
            f.cosine
        );
        if let Some(t) = f.top1_agreement {
            let _ = write!(s, ", top-1 agreement {t:.4}");
        }
        if let Some(k) = f.kl {
            let _ = write!(s, ", KL {k:.4}");
        }
        let _ = write!(s, " (against the {}, in {})", f.reference, f.runtime);
        rows.push(("held-out fidelity", s));
    }
    if !v.seconds.is_empty() {
        let s = v
            .seconds
            .iter()
            .map(|(k, t)| format!("{k} {t:.1} s"))
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(("time", s));
    }
    h.push_str("<table id=\"summary\">\n");
    for (k, val) in rows {
        let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&val));
    }
    h.push_str("</table>\n<table id=\"blocks\"><tr><th>block</th><th>result</th></tr>\n");
    for b in &v.blocks {
        let what = if b.rewritten {
            b.semantics.clone().unwrap_or_else(|| "rewritten".into())
        } else {
            format!(
                "unchanged: {}",
                b.skipped.clone().unwrap_or_else(|| "not selected".into())
            )
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&b.block),
            esc(&what)
        );
    }
    h.push_str("</table>\n");
}

fn layer_names(v: &View) -> Vec<String> {
    v.layers.iter().map(|l| l.block.clone()).collect()
}

fn expert_cols(n: usize) -> Vec<String> {
    (0..n).map(|e| e.to_string()).collect()
}

fn usage_figures(v: &View) -> std::result::Result<Vec<Figure>, charts::ChartError> {
    let n = v.layers.iter().map(|l| l.experts_before).max().unwrap_or(0);
    if v.layers.is_empty() || n == 0 {
        return Ok(vec![]);
    }
    let mut out = vec![];
    let usage: Vec<Vec<Option<f64>>> = v.layers.iter().map(|l| l.usage()).collect();
    let fmax = usage
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0f64, f64::max);
    if fmax > 0.0 {
        let cells = usage
            .iter()
            .enumerate()
            .flat_map(|(y, row)| {
                row.iter().enumerate().map(move |(x, f)| Cell {
                    x,
                    y,
                    value: f.map(|f| f / fmax),
                    category: None,
                    label: f.map(|f| format!("{:.0}", 100.0 * f)).unwrap_or_default(),
                })
            })
            .collect();
        out.push(Figure {
            extra: String::new(),
            id: "usage".into(),
            svg: charts::heatmap(&Heatmap {
                title: "Expert usage (% of routed slots)",
                x_desc: "router expert",
                y_desc: "layer",
                cols: expert_cols(n),
                rows: layer_names(v),
                cells,
                scale_max: Some(100.0 * fmax),
            })?,
            caption: "Each router expert's share of the routed token slots on the calibration \
                      samples, per layer (top-k choices counted once each)."
                .into(),
        });
    }
    let merged = v
        .layers
        .iter()
        .any(|l| l.experts_after < l.experts_before || !l.dropped.is_empty());
    if merged {
        let cells = v
            .layers
            .iter()
            .enumerate()
            .flat_map(|(y, l)| {
                let of = l.group_of();
                of.into_iter().enumerate().map(move |(x, g)| {
                    let kept = g.is_some_and(|g| l.groups[g].expert == x);
                    Cell {
                        x,
                        y,
                        value: None,
                        category: g,
                        label: match g {
                            None => "×".into(),
                            Some(g) if kept => format!("{}*", l.groups[g].expert),
                            Some(g) => l.groups[g].expert.to_string(),
                        },
                    }
                })
            })
            .collect();
        out.push(Figure {
            extra: String::new(),
            id: "groups".into(),
            svg: charts::heatmap(&Heatmap {
                title: "Groups: the merged or kept expert each router expert now uses",
                x_desc: "router expert",
                y_desc: "layer",
                cols: expert_cols(n),
                rows: layer_names(v),
                cells,
                scale_max: None,
            })?,
            caption: "One colour per group; the label is the group's representative (the \
                      expert whose slot the merged expert takes, marked *). × marks an expert \
                      pruned with its router row."
                .into(),
        });
    }
    Ok(out)
}

fn error_figures(v: &View) -> std::result::Result<Vec<Figure>, charts::ChartError> {
    let mut out = vec![];
    let compressed: Vec<&view::Layer> = v
        .layers
        .iter()
        .filter(|l| l.compression.is_some())
        .collect();
    let mut series = vec![];
    if !compressed.is_empty() {
        series.push((
            "calibrated (compression)".to_string(),
            compressed
                .iter()
                .map(|l| l.compression.as_ref().map_or(f64::NAN, |c| c.error))
                .collect::<Vec<_>>(),
        ));
    }
    let fid_blocks = v.fidelity.as_ref().map(|f| &f.blocks[..]).unwrap_or(&[]);
    let cats: Vec<String> = if compressed.is_empty() {
        fid_blocks.iter().map(|b| b.block.clone()).collect()
    } else {
        compressed.iter().map(|l| l.block.clone()).collect()
    };
    if !fid_blocks.is_empty() {
        series.push((
            "held-out at the block".to_string(),
            cats.iter()
                .map(|c| {
                    fid_blocks
                        .iter()
                        .find(|b| &b.block == c)
                        .map_or(f64::NAN, |b| b.rel_l2)
                })
                .collect(),
        ));
    }
    if !series.is_empty() && !cats.is_empty() {
        out.push(Figure {
            extra: String::new(),
            id: "layer-error".into(),
            svg: charts::bars(&Bars {
                title: "Relative error per layer",
                y_desc: "relative error",
                categories: cats,
                series,
                highlight: vec![],
            })?,
            caption: "Calibrated: the relative squared error of the layer's output on its \
                      calibration tokens, as the planner measured it. Held-out: the relative \
                      L2 error of the block's output on the held-out samples (segment by \
                      segment runs)."
                .into(),
        });
    }
    if let Some(f) = matrix_heatmap(v)? {
        out.push(f);
    }
    Ok(out)
}

/// Rows: layer × matrix kind; columns: the stored matrices of that kind in order (one per
/// expert, merged expert or shared base).
fn matrix_heatmap(v: &View) -> std::result::Result<Option<Figure>, charts::ChartError> {
    let mut rows = vec![];
    let mut cells = vec![];
    let mut ncols = 0;
    let mut emax = 0.0f64;
    for l in &v.layers {
        let Some(c) = &l.compression else { continue };
        let mut kinds: Vec<&str> = vec![];
        for m in &c.matrices {
            if !kinds.contains(&m.matrix.as_str()) {
                kinds.push(&m.matrix);
            }
        }
        for k in kinds {
            let y = rows.len();
            rows.push(format!("{} {k}", l.block));
            for (x, m) in c.matrices.iter().filter(|m| m.matrix == k).enumerate() {
                ncols = ncols.max(x + 1);
                emax = emax.max(m.error);
                let label = match (m.rank, m.neurons) {
                    (Some(r), _) => format!("r{r}"),
                    (None, Some(n)) => format!("n{n}"),
                    _ if m.form.starts_with("base") => "base".into(),
                    _ => "full".into(),
                };
                cells.push(Cell {
                    x,
                    y,
                    value: Some(m.error),
                    category: None,
                    label,
                });
            }
        }
    }
    if cells.is_empty() {
        return Ok(None);
    }
    let emax = if emax > 0.0 { emax } else { 1.0 };
    for c in &mut cells {
        c.value = c.value.map(|e| e / emax);
    }
    Ok(Some(Figure {
        extra: String::new(),
        id: "matrix-error".into(),
        svg: charts::heatmap(&Heatmap {
            title: "Calibrated error per stored matrix",
            x_desc: "stored matrix (expert, merged expert or shared base, in order)",
            y_desc: "layer, matrix",
            cols: expert_cols(ncols),
            rows,
            cells,
            scale_max: Some(emax),
        })?,
        caption: "Colour: the matrix's relative output error on its routed calibration tokens \
                  (‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖²). Label: rN = rank N (factored), nN = N intermediate \
                  neurons kept, full = dense and complete, base = a shared base."
            .into(),
    }))
}

fn size_figures(v: &View) -> std::result::Result<Vec<Figure>, charts::ChartError> {
    let mut out = vec![];
    let compressed: Vec<(&String, &view::LayerCompression)> = v
        .layers
        .iter()
        .filter_map(|l| l.compression.as_ref().map(|c| (&l.block, c)))
        .collect();
    if !compressed.is_empty() {
        let cats: Vec<String> = compressed.iter().map(|(b, _)| (*b).clone()).collect();
        out.push(Figure {
            extra: String::new(),
            id: "layer-bytes".into(),
            svg: charts::bars(&Bars {
                title: "Routed-expert bytes per layer",
                y_desc: "bytes",
                categories: cats.clone(),
                series: vec![
                    (
                        "before".into(),
                        compressed
                            .iter()
                            .map(|(_, c)| c.bytes_before as f64)
                            .collect(),
                    ),
                    (
                        "after".into(),
                        compressed
                            .iter()
                            .map(|(_, c)| c.bytes_after as f64)
                            .collect(),
                    ),
                ],
                highlight: vec![],
            })?,
            caption: "Bytes of the routed experts' matrices as stored, before and after. \
                      The form each layer got is in the table below."
                .into(),
        });
        out.push(Figure {
            extra: String::new(),
            id: "layer-flops".into(),
            svg: charts::bars(&Bars {
                title: "Routed multiply-adds per token",
                y_desc: "multiply-adds",
                categories: cats,
                series: vec![
                    (
                        "before".into(),
                        compressed.iter().map(|(_, c)| c.flops_before).collect(),
                    ),
                    (
                        "after".into(),
                        compressed.iter().map(|(_, c)| c.flops_after).collect(),
                    ),
                ],
                highlight: vec![],
            })?,
            caption: "Multiply-adds of the experts a token is routed to (top-k aware), per \
                      token, before and after."
                .into(),
        });
    } else if v.layers.iter().any(|l| l.experts_before > 0) {
        out.push(Figure {
            extra: String::new(),
            id: "layer-experts".into(),
            svg: charts::bars(&Bars {
                title: "Experts per layer",
                y_desc: "experts",
                categories: layer_names(v),
                series: vec![
                    (
                        "before".into(),
                        v.layers.iter().map(|l| l.experts_before as f64).collect(),
                    ),
                    (
                        "after".into(),
                        v.layers.iter().map(|l| l.experts_after as f64).collect(),
                    ),
                ],
                highlight: vec![],
            })?,
            caption: "Stored experts per layer before and after merging or pruning.".into(),
        });
    }
    Ok(out)
}

fn plan_figures(v: &View) -> std::result::Result<Vec<Figure>, charts::ChartError> {
    let Some(c) = &v.compression else {
        return Ok(vec![]);
    };
    if c.chosen_by.is_empty() {
        return Ok(vec![]);
    }
    let metric = c.chosen_by[0].metric.clone();
    let cats: Vec<String> = (0..c.chosen_by.len())
        .map(|i| format!("plan {i}"))
        .collect();
    let mut table = String::from(
        "<table id=\"plans-table\"><tr><th>plan</th><th>what</th><th>score</th><th></th></tr>",
    );
    for (i, a) in c.chosen_by.iter().enumerate() {
        let _ = write!(
            table,
            "<tr><td>plan {i}</td><td>{}</td><td>{:.4}</td><td>{}</td></tr>",
            esc(&a.plan),
            a.score,
            if a.chosen { "written" } else { "" }
        );
    }
    table.push_str("</table>");
    Ok(vec![Figure {
        id: "plans".into(),
        svg: charts::bars(&Bars {
            title: &format!("Whole plans measured end to end ({metric}, lower is better)"),
            y_desc: &metric,
            categories: cats,
            series: vec![(
                metric.clone(),
                c.chosen_by.iter().map(|a| a.score).collect(),
            )],
            highlight: c.chosen_by.iter().map(|a| a.chosen).collect(),
        })?,
        caption: "Each candidate plan at the same budget, scored on the calibration samples \
                  that choose plans; the written one is red."
            .into(),
        extra: table,
    }])
}

fn fidelity_figures(v: &View) -> std::result::Result<Vec<Figure>, charts::ChartError> {
    let Some(f) = &v.fidelity else {
        return Ok(vec![]);
    };
    let mut cats = vec!["cosine".to_string()];
    let mut vals = vec![f.cosine];
    if let Some(t) = f.top1_agreement {
        cats.push("top-1 agreement".into());
        vals.push(t);
    }
    cats.push("relative L2 error".into());
    vals.push(f.rel_l2);
    let mut figs = vec![Figure {
        extra: String::new(),
        id: "fidelity".into(),
        svg: charts::bars(&Bars {
            title: "Written model against the original, held-out",
            y_desc: "value",
            categories: cats,
            series: vec![("held-out".into(), vals)],
            highlight: vec![],
        })?,
        caption: format!(
            "On {} held-out samples ({} positions) of {}: cosine similarity and top-1 \
             agreement of the outputs (1 = identical), and their relative L2 error (0 = \
             identical){}.",
            f.samples,
            f.positions,
            f.outputs.join(", "),
            f.kl.map(|k| format!("; KL divergence of the next-token distributions {k:.4}"))
                .unwrap_or_default()
        ),
    }];
    if !f.blocks.is_empty() {
        figs.push(Figure {
            extra: String::new(),
            id: "block-cosine".into(),
            svg: charts::bars(&Bars {
                title: "Held-out cosine at each rewritten block",
                y_desc: "cosine",
                categories: f.blocks.iter().map(|b| b.block.clone()).collect(),
                series: vec![("cosine".into(), f.blocks.iter().map(|b| b.cosine).collect())],
                highlight: vec![],
            })?,
            caption: format!(
                "Cosine similarity of each block's output ({}) with the original's, on the \
                 held-out samples.",
                f.blocks
                    .iter()
                    .map(|b| b.output.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(figs)
}

/// The per-matrix plan as a table (form, rank or neurons, bytes, error).
fn matrix_table(h: &mut String, v: &View) {
    let layers: Vec<&view::Layer> = v
        .layers
        .iter()
        .filter(|l| l.compression.is_some())
        .collect();
    if layers.is_empty() {
        return;
    }
    h.push_str(
        "<h2>Plan per layer and matrix</h2>\n<table id=\"plan\"><tr><th>layer</th><th>form</th>\
<th>experts</th><th>matrix</th><th>stored as</th><th>rank / neurons</th><th>bytes</th>\
<th>calibrated error</th></tr>\n",
    );
    for l in layers {
        let Some(c) = &l.compression else { continue };
        for m in &c.matrices {
            let rn = match (m.rank, m.neurons) {
                (Some(r), _) => format!("rank {r}"),
                (None, Some(n)) => format!("{n} neurons"),
                _ => String::new(),
            };
            let experts = m
                .experts
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
<td>{}</td><td>{:.4}</td></tr>",
                esc(&l.block),
                esc(&c.family),
                esc(&experts),
                esc(&m.matrix),
                esc(&m.form),
                esc(&rn),
                m.bytes,
                m.error
            );
        }
    }
    h.push_str("</table>\n");
}
