//! The latency chart: one SVG with two panels, latency vs group size (at one
//! concurrency) and vs concurrency (at one group size), p50 and p99 of each
//! target. Plotters' SVG backend writes text as `<text>` elements, so no font
//! library is needed to draw it.

use std::path::Path;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use thiserror::Error;

use super::report::{Report, Target};
use super::workload::Cell;

const SIZE: (u32, u32) = (1200, 520);
const FONT: &str = "sans-serif";

#[derive(Debug, Error)]
pub enum ChartError {
    #[error("cannot draw the latency chart: {0}")]
    Draw(String),
    #[error("cannot write the latency chart to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn draw_error(error: impl std::fmt::Display) -> ChartError {
    ChartError::Draw(error.to_string())
}

/// One line of a panel: a target's p50 or p99 over the panel's x values.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub target: Target,
    pub percentile: u8,
    /// (x, latency ms), ascending x; points without a latency are left out
    /// (a log axis cannot show 0).
    pub points: Vec<(f64, f64)>,
}

impl Line {
    fn label(&self) -> String {
        format!("{} p{}", self.target.name(), self.percentile)
    }
}

/// A panel: its title, x axis description, and lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_desc: &'static str,
    pub lines: Vec<Line>,
}

/// The two panels of `report`.
pub fn panels(report: &Report) -> [Panel; 2] {
    let plan = &report.plan;
    let by_size = lines(report, |cell| {
        (cell.concurrency == plan.size_sweep_concurrency).then_some(cell.group_size as f64)
    });
    let by_concurrency = lines(report, |cell| {
        (cell.group_size == plan.concurrency_sweep_size).then_some(cell.concurrency as f64)
    });
    [
        Panel {
            title: format!(
                "latency vs group size ({} concurrent clients)",
                plan.size_sweep_concurrency
            ),
            x_desc: "members in the group",
            lines: by_size,
        },
        Panel {
            title: format!(
                "latency vs concurrency ({} members)",
                plan.concurrency_sweep_size
            ),
            x_desc: "concurrent clients",
            lines: by_concurrency,
        },
    ]
}

fn lines(report: &Report, x_of: impl Fn(&Cell) -> Option<f64>) -> Vec<Line> {
    let mut lines = Vec::new();
    for target in Target::BOTH {
        for percentile in [50u8, 99] {
            let mut points: Vec<(f64, f64)> = report
                .cells
                .iter()
                .filter_map(|cell| {
                    let x = x_of(&cell.cell)?;
                    let summary = &cell.target(target).overall;
                    let ms = if percentile == 50 {
                        summary.p50_ms
                    } else {
                        summary.p99_ms
                    };
                    (ms > 0.0).then_some((x, ms))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            lines.push(Line {
                target,
                percentile,
                points,
            });
        }
    }
    lines
}

/// A log axis range around `values` with some room below and `headroom`
/// times the highest value above; a single value still gets a range.
fn log_range(values: impl Iterator<Item = f64>, headroom: f64) -> std::ops::Range<f64> {
    let (low, high) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !low.is_finite() || high <= 0.0 {
        return 1.0..10.0;
    }
    low / 1.5..high * headroom
}

/// The chart of `report` as an SVG document.
pub fn render_svg(report: &Report) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let root = root
            .titled(
                &format!(
                    "legacy FHIR server vs fhir-group-proxy: {} ({})",
                    report.mix, report.stop
                ),
                (FONT, 20),
            )
            .map_err(draw_error)?;
        for (area, panel) in root.split_evenly((1, 2)).iter().zip(panels(report)) {
            draw_panel(area, &panel)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel) -> Result<(), ChartError> {
    let points = || panel.lines.iter().flat_map(|l| l.points.iter());
    let x_range = log_range(points().map(|p| p.0), 1.5);
    // Room above the highest line for the legend in the upper left corner.
    let y_range = log_range(points().map(|p| p.1), 6.0);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 17))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.log_scale(), y_range.log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        // Log axes draw a dense line per minor step; bold lines at the labels
        // are enough to read the values.
        .light_line_style(TRANSPARENT)
        .x_desc(panel.x_desc)
        .y_desc("latency (ms, log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(draw_error)?;
    for line in &panel.lines {
        let color = match line.target {
            Target::Legacy => RGBColor(214, 39, 40),
            Target::Proxy => RGBColor(31, 119, 180),
        };
        let style = color.stroke_width(2);
        let points = line.points.clone();
        let drawn = if line.percentile == 50 {
            chart.draw_series(LineSeries::new(points.clone(), style))
        } else {
            chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))
        }
        .map_err(draw_error)?;
        // A solid legend line is one dash as long as the line itself.
        let (dash, gap) = if line.percentile == 50 {
            (24, 1)
        } else {
            (6, 4)
        };
        drawn.label(line.label()).legend(move |(x, y)| {
            DashedPathElement::new(vec![(x, y), (x + 24, y)], dash, gap, color.stroke_width(2))
        });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(draw_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// Writes the chart of `report` to `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), ChartError> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg).map_err(|source| ChartError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadtest::report::tests::sample_report;
    use crate::loadtest::workload::Plan;

    #[test]
    fn panels_sweep_size_and_concurrency_per_target() {
        let plan = Plan::new(&[100, 1_000, 10_000], &[1, 8, 32], false).unwrap();
        let [by_size, by_concurrency] = panels(&sample_report(plan));
        assert_eq!(by_size.lines.len(), 4);
        let legacy_p50 = &by_size.lines[0];
        assert_eq!(
            (legacy_p50.target, legacy_p50.percentile),
            (Target::Legacy, 50)
        );
        let xs: Vec<f64> = legacy_p50.points.iter().map(|p| p.0).collect();
        assert_eq!(xs, vec![100.0, 1_000.0, 10_000.0]);
        assert!(legacy_p50.points.windows(2).all(|w| w[0].1 < w[1].1));
        let proxy_p99 = &by_concurrency.lines[3];
        assert_eq!(
            (proxy_p99.target, proxy_p99.percentile),
            (Target::Proxy, 99)
        );
        let xs: Vec<f64> = proxy_p99.points.iter().map(|p| p.0).collect();
        assert_eq!(xs, vec![1.0, 8.0, 32.0]);
        assert!(by_concurrency.title.contains("1000 members"));
    }

    #[test]
    fn log_ranges_have_room_and_survive_single_or_no_values() {
        assert_eq!(log_range([3.0, 30.0].into_iter(), 1.5), 2.0..45.0);
        assert_eq!(log_range([3.0, 30.0].into_iter(), 6.0), 2.0..180.0);
        let single = log_range([8.0].into_iter(), 1.5);
        assert!(single.start < 8.0 && single.end > 8.0);
        assert_eq!(log_range(std::iter::empty(), 1.5), 1.0..10.0);
    }

    #[test]
    fn chart_is_written_as_a_valid_svg_naming_both_targets() {
        let plan = Plan::new(&[100, 1_000, 10_000], &[1, 8, 32], false).unwrap();
        let dir = std::env::temp_dir().join(format!("fgp-chart-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latency.svg");
        write_svg(&sample_report(plan), &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let document = roxmltree::Document::parse(&text).expect("well-formed XML");
        assert_eq!(document.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = document
            .descendants()
            .filter(|node| node.is_text())
            .filter_map(|node| node.text())
            .collect();
        for label in ["legacy p50", "legacy p99", "proxy p50", "proxy p99"] {
            assert_eq!(
                texts.iter().filter(|t| t.trim() == label).count(),
                2,
                "{label} in both panels"
            );
        }
        assert!(texts.iter().any(|t| t.contains("latency vs group size")));
        let lines = document
            .descendants()
            .filter(|node| node.tag_name().name() == "polyline")
            .count();
        assert!(lines >= 8, "a line per target and percentile in each panel");
    }
}
