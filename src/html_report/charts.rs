//! The report's figures, drawn with `plotters` into SVG strings: heatmaps (expert usage,
//! groups, per-matrix error) and bar charts (per-layer error, bytes, FLOPs, fidelity, plan
//! scores). Each function returns one `<svg>` element.
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Drawing failed (plotters reports backend errors only; an SVG string backend has none
/// in practice, but they are passed on rather than unwrapped).
#[derive(Debug)]
pub struct ChartError(pub String);

type R<T> = std::result::Result<T, ChartError>;

fn err<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError(e.to_string())
}

const FONT: &str = "sans-serif";
/// Categorical colours for groups (Tableau 10), repeated past ten groups.
const GROUP_COLORS: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(89, 161, 79),
    RGBColor(237, 201, 72),
    RGBColor(176, 122, 161),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];
/// Bars: before (grey) and after (blue).
const BEFORE: RGBColor = RGBColor(171, 171, 171);
const AFTER: RGBColor = RGBColor(78, 121, 167);
const HIGHLIGHT: RGBColor = RGBColor(225, 87, 89);

/// One heatmap cell.
pub struct Cell {
    /// Column.
    pub x: usize,
    /// Row (0 is drawn at the top).
    pub y: usize,
    /// Colour value in `[0, 1]` (`None`: drawn grey, no value).
    pub value: Option<f64>,
    /// Categorical colour index instead of a value (group maps).
    pub category: Option<usize>,
    /// Text written in the cell.
    pub label: String,
}

/// A heatmap of `rows × cols` cells.
pub struct Heatmap<'a> {
    /// Title above the figure.
    pub title: &'a str,
    /// Axis descriptions.
    pub x_desc: &'a str,
    /// Row axis description.
    pub y_desc: &'a str,
    /// Column labels.
    pub cols: Vec<String>,
    /// Row labels.
    pub rows: Vec<String>,
    /// The cells (missing ones stay white).
    pub cells: Vec<Cell>,
    /// What a colour value of 1 means (legend), for value maps.
    pub scale_max: Option<f64>,
}

fn viridis(v: f64) -> RGBColor {
    let c = ViridisRGB::get_color(v.clamp(0.0, 1.0));
    RGBColor(c.0, c.1, c.2)
}

/// Black or white text, whichever reads on `c`.
fn ink_on(c: RGBColor) -> &'static RGBColor {
    let l = 0.299 * c.0 as f64 + 0.587 * c.1 as f64 + 0.114 * c.2 as f64;
    if l > 140.0 {
        &BLACK
    } else {
        &WHITE
    }
}

fn label_width(labels: &[String]) -> u32 {
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
    (longest as u32 * 7 + 16).clamp(40, 260)
}

/// Draws a heatmap; cells of about 44 × 22 pixels.
pub fn heatmap(h: &Heatmap) -> R<String> {
    let (nx, ny) = (h.cols.len().max(1), h.rows.len().max(1));
    let left = label_width(&h.rows);
    let cell_w = if nx > 32 { 22 } else { 44 };
    let legend = if h.scale_max.is_some() { 70 } else { 0 };
    let w = left + 40 + legend + (nx as u32) * cell_w;
    let hgt = 90 + (ny as u32) * 22;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, hgt)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (plot_area, legend_area) = root.split_horizontally(w - legend);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(h.title, (FONT, 16))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(left)
            // An integer range is inclusive in plotters: 0..n - 1 gives n segments.
            .build_cartesian_2d((0..nx - 1).into_segmented(), (0..ny - 1).into_segmented())
            .map_err(err)?;
        let cols = h.cols.clone();
        let rows = h.rows.clone();
        let fx = move |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => cols.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        // Row 0 is drawn at the top: the plot's y grows upwards.
        let fy = move |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) if *i < ny => {
                rows.get(ny - 1 - i).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nx)
            .y_labels(ny)
            .x_desc(h.x_desc)
            .y_desc(h.y_desc)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style((FONT, 11))
            .draw()
            .map_err(err)?;
        let fill = |c: &Cell| match (c.category, c.value) {
            (Some(k), _) => GROUP_COLORS[k % GROUP_COLORS.len()],
            (None, Some(v)) => viridis(v),
            (None, None) => RGBColor(225, 225, 225),
        };
        chart
            .draw_series(h.cells.iter().filter(|c| c.x < nx && c.y < ny).map(|c| {
                let y = ny - 1 - c.y;
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(c.x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(c.x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    fill(c).filled(),
                );
                r.set_margin(1, 1, 1, 1);
                r
            }))
            .map_err(err)?;
        chart
            .draw_series(
                h.cells
                    .iter()
                    .filter(|c| c.x < nx && c.y < ny && !c.label.is_empty())
                    .map(|c| {
                        let style = TextStyle::from((FONT, 10).into_font())
                            .color(ink_on(fill(c)))
                            .pos(Pos::new(HPos::Center, VPos::Center));
                        Text::new(
                            c.label.clone(),
                            (
                                SegmentValue::CenterOf(c.x),
                                SegmentValue::CenterOf(ny - 1 - c.y),
                            ),
                            style,
                        )
                    }),
            )
            .map_err(err)?;
        if let Some(max) = h.scale_max {
            color_legend(&legend_area, max)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A vertical colour bar from 0 to `max`.
fn color_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    max: f64,
) -> R<()>
where
    DB::ErrorType: 'static,
{
    let (_, h) = area.dim_in_pixel();
    let (top, bottom) = (40i32, h as i32 - 40);
    let steps = 40;
    let span = (bottom - top).max(steps);
    for s in 0..steps {
        let v = 1.0 - s as f64 / (steps - 1) as f64;
        let y0 = top + s * span / steps;
        let y1 = top + (s + 1) * span / steps;
        area.draw(&Rectangle::new([(8, y0), (22, y1)], viridis(v).filled()))
            .map_err(err)?;
    }
    let style = TextStyle::from((FONT, 10).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    area.draw(&Text::new(fmt_num(max), (26, top), style.clone()))
        .map_err(err)?;
    area.draw(&Text::new("0".to_string(), (26, top + span), style))
        .map_err(err)?;
    Ok(())
}

/// Compact number for labels.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// A bar chart: one group of bars per category, one bar per series.
pub struct Bars<'a> {
    /// Title above the figure.
    pub title: &'a str,
    /// Value axis description.
    pub y_desc: &'a str,
    /// Categories along the x axis.
    pub categories: Vec<String>,
    /// Series: name and one value per category.
    pub series: Vec<(String, Vec<f64>)>,
    /// Categories drawn in the highlight colour (single-series charts: the chosen plan).
    pub highlight: Vec<bool>,
}

/// Draws a grouped vertical bar chart with a legend when there are several series.
pub fn bars(b: &Bars) -> R<String> {
    let n = b.categories.len().max(1);
    let ns = b.series.len().max(1);
    let per = (26 * ns as u32).max(30);
    let longest = b
        .categories
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(1) as u32;
    // Long category names are written at an angle below the axis.
    let bottom = (longest * 6).clamp(30, 240) + 20;
    let w = (120 + n as u32 * (per + 12)).max(420);
    let hgt = 260 + bottom;
    let ymax = b
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.12 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, hgt)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(b.title, (FONT, 16))
            .margin(10)
            .x_label_area_size(bottom)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(0)
            .y_desc(b.y_desc)
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style((FONT, 11))
            .draw()
            .map_err(err)?;
        let width = 0.8 / ns as f64;
        for (si, (name, vals)) in b.series.iter().enumerate() {
            let color = match (ns, si) {
                (1, _) => AFTER,
                (_, 0) => BEFORE,
                (_, 1) => AFTER,
                _ => GROUP_COLORS[si % GROUP_COLORS.len()],
            };
            let highlight = &b.highlight;
            let series =
                vals.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(move |(i, &v)| {
                        let x0 = i as f64 + 0.1 + si as f64 * width;
                        let c = if ns == 1 && highlight.get(i) == Some(&true) {
                            HIGHLIGHT
                        } else {
                            color
                        };
                        Rectangle::new([(x0, 0.0), (x0 + width, v)], c.filled())
                    });
            let drawn = chart.draw_series(series).map_err(err)?;
            if ns > 1 {
                drawn.label(name.clone()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            }
        }
        // Values above the bars.
        for (si, (_, vals)) in b.series.iter().enumerate() {
            let style =
                TextStyle::from((FONT, 9).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(vals.iter().enumerate().filter(|(_, v)| v.is_finite()).map(
                    |(i, &v)| {
                        let x = i as f64 + 0.1 + (si as f64 + 0.5) * width;
                        Text::new(fmt_num(v), (x, v), style.clone())
                    },
                ))
                .map_err(err)?;
        }
        if ns > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font((FONT, 11))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(err)?;
        }
        // Category names under their groups (the x axis has no numeric labels).
        // Many or long names are written upwards, ending under their group.
        let style = if n > 6 || longest > 12 {
            TextStyle::from((FONT, 11).into_font())
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Right, VPos::Center))
        } else {
            TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Center, VPos::Top))
        };
        for (i, c) in b.categories.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(c.clone(), (px, py + 6), style.clone()))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}
