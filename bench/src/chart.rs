//! The run's charts, as SVG files drawn from its [`Report`] (docs/BENCHMARKS.md, "Charts").
//! Written by hand — a few rectangles, lines and texts — so that the bench needs no
//! plotting crate:
//!
//! - `limiter_pairs.svg`: pairs/s of the limiter rows beside their baselines (the naive
//!   etcd semaphore, the Redis semaphore, and the no-op RPC ceiling halved: a pair is two
//!   calls), with the throughput ratios;
//! - `<scenario>_latency.svg`: p50 and p99 of every row of a scenario;
//! - one line chart per [`Curve`] of the report (`presence_rss.svg`: RSS against open
//!   sessions).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::Result;
use super::report::{Curve, Report, Row, thousands};

/// Width of every chart, px.
const WIDTH: f64 = 960.0;
/// Space around the plot, px.
const MARGIN: f64 = 16.0;
/// Room right of the longest bar for its value, px.
const VALUE_ROOM: f64 = 110.0;
/// Height of one bar, px, and the space below each bar and each group.
const BAR: f64 = 14.0;
const BAR_GAP: f64 = 2.0;
const GROUP_GAP: f64 = 10.0;
/// Height of a line chart's plot, px.
const PLOT_HEIGHT: f64 = 360.0;
/// Rough width of one character of 12 px sans-serif, px (for the label column).
const CHAR_WIDTH: f64 = 7.0;

const LIMITER: &str = "#3566a8";
const BASELINE: &str = "#9a9a9a";
const P50: &str = "#8fb3e0";
const P99: &str = "#24497a";
const GRID: &str = "#e4e4e4";
const INK: &str = "#222222";

/// Text styles: tick labels under and left of an axis, values, group labels, axis titles.
const TICK_X: &str = "font-size=\"11\" text-anchor=\"middle\"";
const TICK_Y: &str = "font-size=\"11\" text-anchor=\"end\"";
const VALUE: &str = "font-size=\"11\"";
const LABEL: &str = "font-size=\"12\" text-anchor=\"end\"";
const AXIS: &str = "font-size=\"12\" text-anchor=\"middle\"";

/// Writes every chart `report` has data for into `dir` (created if missing); their paths.
pub fn write_charts(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut charts = Vec::new();
    for (scenario, range) in report.scenario_rows() {
        let rows = &report.rows[range];
        if rows.is_empty() {
            continue;
        }
        if scenario == "limiter"
            && let Some(chart) = limiter_pairs(rows, report)
        {
            charts.push(("limiter_pairs".to_owned(), chart.svg()));
        }
        charts.push((format!("{scenario}_latency"), latency(scenario, rows).svg()));
    }
    for curve in &report.curves {
        charts.push((curve.name.clone(), line_chart(curve)));
    }
    std::fs::create_dir_all(dir).map_err(|err| format!("creating {}: {err}", dir.display()))?;
    let mut paths = Vec::new();
    for (name, svg) in charts {
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(&path, svg).map_err(|err| format!("writing {}: {err}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// A horizontal bar chart: one group of bars per label, on one axis from 0.
struct BarChart {
    title: String,
    /// Lines under the title.
    about: Vec<String>,
    /// The value axis: `pairs/s`.
    axis: String,
    /// `(colour, meaning)` of the bars.
    legend: Vec<(&'static str, String)>,
    groups: Vec<Group>,
}

struct Group {
    label: String,
    bars: Vec<Bar>,
}

struct Bar {
    value: f64,
    /// Printed right of the bar.
    text: String,
    colour: &'static str,
}

/// The limiter rows counted in pairs/s beside the baselines; `None` without such rows.
fn limiter_pairs(rows: &[Row], report: &Report) -> Option<BarChart> {
    let bar = |label: String, value: f64, colour| Group {
        label,
        bars: vec![Bar {
            value,
            text: format!("{} pairs/s", thousands(value)),
            colour,
        }],
    };
    let mut groups = Vec::new();
    for row in rows {
        if row.name == "rpc_ceiling" {
            groups.push(bar("rpc_ceiling ÷ 2".to_owned(), row.rate / 2.0, BASELINE));
        } else if row.unit == "pairs/s" {
            let colour = if row.name.starts_with("limiter_") {
                LIMITER
            } else {
                BASELINE
            };
            groups.push(bar(row.name.clone(), row.rate, colour));
        }
    }
    if !groups.iter().any(|g| g.bars[0].colour == LIMITER) {
        return None;
    }
    let mut about = vec![
        "Acquire+Release pairs per second (closed loop; see docs/BENCHMARKS.md for each row). \
         rpc_ceiling ÷ 2: no-op Health/Check calls/s halved, the bound for a pair of calls."
            .to_owned(),
    ];
    for ratio in report
        .ratios
        .iter()
        .filter(|r| r.name.starts_with("limiter_vs_"))
    {
        about.push(format!(
            "ratio {} {:.2} (goal {})",
            ratio.name,
            ratio.value,
            ratio.goal.text()
        ));
    }
    Some(BarChart {
        title: "limiter-svc pairs/s and its baselines".to_owned(),
        about,
        axis: "pairs/s".to_owned(),
        legend: vec![
            (LIMITER, "limiter-svc".to_owned()),
            (BASELINE, "baseline".to_owned()),
        ],
        groups,
    })
}

/// p50 and p99 of every row of `scenario`.
fn latency(scenario: &str, rows: &[Row]) -> BarChart {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let bar = |value: f64, colour| Bar {
        value,
        text: format!("{value:.2} ms"),
        colour,
    };
    BarChart {
        title: format!("{scenario}: latency per row"),
        about: vec![
            "Nearest-rank percentiles over every operation completed in the row's window \
             (a pair counts as one operation; see docs/BENCHMARKS.md for each row)."
                .to_owned(),
        ],
        axis: "latency (ms)".to_owned(),
        legend: vec![(P50, "p50".to_owned()), (P99, "p99".to_owned())],
        groups: rows
            .iter()
            .map(|row| Group {
                label: row.name.clone(),
                bars: vec![bar(ms(row.p50), P50), bar(ms(row.p99), P99)],
            })
            .collect(),
    }
}

impl BarChart {
    fn svg(&self) -> String {
        let longest = self.groups.iter().map(|g| g.label.chars().count()).max();
        let x0 = MARGIN + longest.unwrap_or(0) as f64 * CHAR_WIDTH + 12.0;
        let x1 = WIDTH - MARGIN - VALUE_ROOM;
        let mut svg = Svg::default();
        let top = svg.header(&self.title, &self.about, &self.legend);
        let bars = self.groups.iter().flat_map(|g| &g.bars);
        let axis = Axis::to(bars.map(|b| b.value).fold(0.0, f64::max));
        let scale = |value: f64| (value.max(0.0) / axis.top) * (x1 - x0);

        let heights = self
            .groups
            .iter()
            .map(|g| g.bars.len() as f64 * (BAR + BAR_GAP));
        let bottom = top + heights.map(|h| h - BAR_GAP + GROUP_GAP).sum::<f64>();
        for tick in axis.ticks() {
            let x = x0 + scale(tick);
            svg.line(x, top - 4.0, x, bottom, GRID);
            svg.text(x, bottom + 14.0, TICK_X, &number(tick));
        }
        let mut y = top;
        for group in &self.groups {
            let height = group.bars.len() as f64 * (BAR + BAR_GAP) - BAR_GAP;
            svg.text(x0 - 8.0, y + height / 2.0 + 4.0, LABEL, &group.label);
            for bar in &group.bars {
                svg.rect("bar", x0, y, scale(bar.value), BAR, bar.colour);
                let at = x0 + scale(bar.value) + 4.0;
                svg.text(at, y + BAR - 3.0, VALUE, &bar.text);
                y += BAR + BAR_GAP;
            }
            y += GROUP_GAP - BAR_GAP;
        }
        svg.line(x0, top - 4.0, x0, bottom, INK);
        svg.line(x0, bottom, x1, bottom, INK);
        svg.text((x0 + x1) / 2.0, bottom + 32.0, AXIS, &self.axis);
        svg.finish(bottom + 44.0)
    }
}

/// A curve's points joined by a line, on axes from 0.
fn line_chart(curve: &Curve) -> String {
    let mut svg = Svg::default();
    let top = svg.header(&curve.title, std::slice::from_ref(&curve.about), &[]);
    let (x0, x1) = (MARGIN + 72.0, WIDTH - MARGIN - VALUE_ROOM);
    let (y0, y1) = (top, top + PLOT_HEIGHT);
    let x_axis = Axis::to(curve.points.iter().map(|p| p.0).fold(0.0, f64::max));
    let y_axis = Axis::to(curve.points.iter().map(|p| p.1).fold(0.0, f64::max));
    let at = |(x, y): (f64, f64)| {
        (
            x0 + x / x_axis.top * (x1 - x0),
            y1 - y / y_axis.top * (y1 - y0),
        )
    };
    for tick in x_axis.ticks() {
        let (x, _) = at((tick, 0.0));
        svg.line(x, y0, x, y1, GRID);
        svg.text(x, y1 + 14.0, TICK_X, &number(tick));
    }
    for tick in y_axis.ticks() {
        let (_, y) = at((0.0, tick));
        svg.line(x0, y, x1, y, GRID);
        svg.text(x0 - 6.0, y + 4.0, TICK_Y, &number(tick));
    }
    svg.line(x0, y0, x0, y1, INK);
    svg.line(x0, y1, x1, y1, INK);
    let points: Vec<(f64, f64)> = curve.points.iter().map(|p| at(*p)).collect();
    let mut path = String::new();
    for (x, y) in &points {
        let _ = write!(path, "{x:.1},{y:.1} ");
    }
    let _ = write!(
        svg.body,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{P99}\" stroke-width=\"2\"/>",
        path.trim_end()
    );
    for (x, y) in &points {
        let _ = write!(
            svg.body,
            "<circle class=\"point\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{P99}\"/>"
        );
    }
    if let (Some(&(x, y)), Some(&(value_x, value_y))) = (points.last(), curve.points.last()) {
        let text = format!("{} at {}", number(value_y), number(value_x));
        svg.text(x + 6.0, y - 6.0, VALUE, &text);
    }
    svg.text((x0 + x1) / 2.0, y1 + 32.0, AXIS, &curve.x_label);
    let (label_x, label_y) = (MARGIN + 12.0, (y0 + y1) / 2.0);
    let style = format!(
        "font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 {label_x:.1} {label_y:.1})\""
    );
    svg.text(label_x, label_y, &style, &curve.y_label);
    svg.finish(y1 + 44.0)
}

/// An axis from 0 to `top` in round steps.
struct Axis {
    top: f64,
    step: f64,
}

impl Axis {
    /// The smallest round axis (steps of 1, 2, 2.5 or 5 × 10ⁿ, at most 5 of them)
    /// reaching `max`.
    fn to(max: f64) -> Self {
        if !max.is_finite() || max <= 0.0 {
            return Self {
                top: 1.0,
                step: 0.2,
            };
        }
        let raw = max / 5.0;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .into_iter()
            .map(|m| m * magnitude)
            .find(|step| *step >= raw)
            .unwrap_or(10.0 * magnitude);
        Self {
            top: (max / step).ceil() * step,
            step,
        }
    }

    fn ticks(&self) -> impl Iterator<Item = f64> {
        let (step, count) = (self.step, (self.top / self.step).round() as usize);
        (0..=count).map(move |i| i as f64 * step)
    }
}

/// `12,500`, `7.5`, `0.25`.
fn number(value: f64) -> String {
    if value >= 100.0 || value == value.round() {
        return thousands(value);
    }
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// An SVG document being written; every text goes through [`escape`].
#[derive(Default)]
struct Svg {
    body: String,
}

impl Svg {
    /// Title, lines under it and a legend; the y where the plot starts.
    fn header(&mut self, title: &str, about: &[String], legend: &[(&str, String)]) -> f64 {
        self.text(MARGIN, 28.0, "font-size=\"18\" font-weight=\"bold\"", title);
        let mut y = 48.0;
        let columns = ((WIDTH - 2.0 * MARGIN) / CHAR_WIDTH) as usize;
        for line in about.iter().flat_map(|line| wrap(line, columns)) {
            self.text(MARGIN, y, "font-size=\"12\" fill=\"#555555\"", &line);
            y += 16.0;
        }
        let mut x = MARGIN;
        for (colour, meaning) in legend {
            self.rect("legend", x, y - 6.0, 12.0, 12.0, colour);
            self.text(x + 16.0, y + 4.0, "font-size=\"12\"", meaning);
            x += 40.0 + meaning.chars().count() as f64 * CHAR_WIDTH;
        }
        y + if legend.is_empty() { 12.0 } else { 28.0 }
    }

    fn rect(&mut self, class: &str, x: f64, y: f64, width: f64, height: f64, fill: &str) {
        let _ = write!(
            self.body,
            "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" \
             height=\"{height:.1}\" fill=\"{fill}\"/>"
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str) {
        let _ = write!(
            self.body,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\"/>"
        );
    }

    /// `style`: attributes written as given (this module's constants, never measured text).
    fn text(&mut self, x: f64, y: f64, style: &str, text: &str) {
        let _ = write!(
            self.body,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" {style}>{}</text>",
            escape(text)
        );
    }

    fn finish(self, height: f64) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
             width=\"{WIDTH:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {WIDTH:.0} {height:.0}\" \
             font-family=\"sans-serif\" fill=\"{INK}\">\
             <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>{}</svg>\n",
            self.body
        )
    }
}

/// `text` cut at spaces into lines of at most `columns` characters (a longer word keeps a
/// line of its own): SVG does not wrap text.
fn wrap(text: &str, columns: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= columns => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

/// `text` safe inside an XML element or attribute.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::Goal;

    /// Checks that `svg` is well-formed XML as this module writes it: one root element,
    /// tags closed in order, attribute values quoted, `&` only in the five entities.
    fn well_formed(svg: &str) -> std::result::Result<(), String> {
        let mut open: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut rest = svg.trim();
        if let Some(after) = rest.strip_prefix("<?xml") {
            rest = &after[after.find("?>").ok_or("unterminated declaration")? + 2..];
        }
        while let Some(start) = rest.find('<') {
            check_text(&rest[..start])?;
            let end = start + rest[start..].find('>').ok_or("unterminated tag")?;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                if open.pop() != Some(name) {
                    return Err(format!("</{name}> closes nothing open"));
                }
            } else {
                let name = tag.split([' ', '/']).next().unwrap_or_default();
                if open.is_empty() {
                    roots += 1;
                }
                if !tag.matches('"').count().is_multiple_of(2) || tag.contains('<') {
                    return Err(format!("bad attributes in <{tag}>"));
                }
                check_text(tag)?;
                if !tag.ends_with('/') {
                    open.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        check_text(rest)?;
        match (roots, open.is_empty(), rest.trim().is_empty()) {
            (1, true, true) => Ok(()),
            _ => Err(format!("{roots} roots, still open: {open:?}")),
        }
    }

    fn check_text(text: &str) -> std::result::Result<(), String> {
        for (at, _) in text.match_indices('&') {
            let entity = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
            if !entity.iter().any(|e| text[at..].starts_with(e)) {
                return Err(format!("bare & in {text:?}"));
            }
        }
        Ok(())
    }

    /// The widths of the `class="bar"` rectangles, in order.
    fn bar_widths(svg: &str) -> Vec<f64> {
        svg.split("<rect class=\"bar\"")
            .skip(1)
            .map(|rect| {
                let width = rect.split("width=\"").nth(1).unwrap_or_default();
                width
                    .split('"')
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or(f64::NAN)
            })
            .collect()
    }

    fn row(name: &str, rate: f64, unit: &'static str, p50_us: u64, p99_us: u64) -> Row {
        Row {
            name: name.to_owned(),
            rate,
            unit,
            p50: Duration::from_micros(p50_us),
            p99: Duration::from_micros(p99_us),
            notes: String::new(),
        }
    }

    fn limiter_report() -> Report {
        let mut report = Report::default();
        report.begin_scenario("limiter");
        report.rows = vec![
            row("rpc_ceiling", 40_000.0, "calls/s", 700, 5_000),
            row("naive_etcd_semaphore", 5_000.0, "pairs/s", 12_000, 30_000),
            row("limiter_pairs", 20_000.0, "pairs/s", 3_000, 7_000),
            row("limiter_reject", 45_000.0, "calls/s", 1_000, 4_000),
        ];
        report.ratio("limiter_vs_naive_etcd", 4.0, Goal::AtLeast(4.0));
        report
    }

    #[test]
    fn the_checker_rejects_broken_xml() {
        well_formed("<svg><text>a &amp; b</text><rect/></svg>").unwrap();
        for broken in [
            "<svg><text></svg>",
            "<svg>a & b</svg>",
            "<svg/><svg/>",
            "<svg x=\"1></svg>",
        ] {
            assert!(well_formed(broken).is_err(), "{broken}");
        }
    }

    #[test]
    fn bars_scale_with_their_values() {
        let svg = limiter_pairs(&limiter_report().rows, &limiter_report())
            .expect("limiter rows")
            .svg();
        well_formed(&svg).unwrap();
        // rpc_ceiling ÷ 2, naive, limiter_pairs: 20,000 / 5,000 / 20,000 pairs/s.
        let widths = bar_widths(&svg);
        assert_eq!(widths.len(), 3, "{svg}");
        assert!((widths[0] / widths[1] - 4.0).abs() < 0.01, "{widths:?}");
        assert!((widths[2] - widths[0]).abs() < 0.01, "{widths:?}");
        assert!(svg.contains("ratio limiter_vs_naive_etcd 4.00 (goal &gt;= 4)"));
    }

    #[test]
    fn latency_chart_has_p50_and_p99_per_row() {
        let report = limiter_report();
        let svg = latency("limiter", &report.rows).svg();
        well_formed(&svg).unwrap();
        let widths = bar_widths(&svg);
        assert_eq!(widths.len(), 8);
        // naive: p99 30 ms is 2.5 × its p50 12 ms.
        assert!((widths[3] / widths[2] - 2.5).abs() < 0.01, "{widths:?}");
        assert!(svg.contains(">30.00 ms<"));
    }

    #[test]
    fn labels_are_escaped() {
        let chart = BarChart {
            title: "a <b> & \"c\" 'd'".to_owned(),
            about: vec!["x&y".to_owned()],
            axis: "<axis>".to_owned(),
            legend: vec![(LIMITER, "l&l".to_owned())],
            groups: vec![Group {
                label: "</svg>".to_owned(),
                bars: vec![Bar {
                    value: 1.0,
                    text: "1 < 2".to_owned(),
                    colour: LIMITER,
                }],
            }],
        };
        let svg = chart.svg();
        well_formed(&svg).unwrap();
        assert!(svg.contains("a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos;"));
        assert!(svg.contains("&lt;/svg&gt;") && svg.contains("1 &lt; 2"));
        assert_eq!(svg.matches("</svg>").count(), 1);
    }

    #[test]
    fn line_chart_draws_every_point() {
        let curve = Curve {
            name: "presence_rss".to_owned(),
            title: "RSS".to_owned(),
            about: "sampled".to_owned(),
            x_label: "sessions".to_owned(),
            y_label: "MiB".to_owned(),
            points: vec![(0.0, 11.0), (25_000.0, 270.0), (50_000.0, 533.0)],
        };
        let svg = line_chart(&curve);
        well_formed(&svg).unwrap();
        assert_eq!(svg.matches("class=\"point\"").count(), 3);
        assert!(svg.contains(">533 at 50,000<"));
    }

    #[test]
    fn axes_end_on_round_values() {
        let top = |max: f64| (Axis::to(max).top, Axis::to(max).step);
        assert_eq!(top(533.0), (600.0, 200.0));
        assert_eq!(top(18_200.0), (20_000.0, 5_000.0));
        assert_eq!(top(0.9), (1.0, 0.2));
        assert_eq!(top(0.0), (1.0, 0.2));
        assert_eq!(number(2.5), "2.5");
        assert_eq!(
            wrap("aa bb cc  dddddd e", 5),
            ["aa bb", "cc", "dddddd", "e"]
        );
        assert_eq!(number(12_500.0), "12,500");
    }

    #[test]
    fn long_subtitles_wrap_at_spaces() {
        assert_eq!(
            wrap("aa bb cc  dddddd e", 5),
            ["aa bb", "cc", "dddddd", "e"]
        );
        let chart = BarChart {
            about: vec!["word ".repeat(100)],
            ..latency("limiter", &limiter_report().rows)
        };
        assert_eq!(chart.svg().matches("fill=\"#555555\"").count(), 4);
    }

    #[test]
    fn writes_one_file_per_chart() {
        let mut report = limiter_report();
        report.begin_scenario("router");
        report
            .rows
            .push(row("router_comms", 1_000.0, "comms/s", 50_000, 200_000));
        let dir = tempfile::tempdir().unwrap();
        let paths = write_charts(&report, dir.path()).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "limiter_pairs.svg",
                "limiter_latency.svg",
                "router_latency.svg"
            ]
        );
        for path in &paths {
            well_formed(&std::fs::read_to_string(path).unwrap()).unwrap();
        }
    }
}
