//! A small line-chart writer for the benchmarks' plots (SVG 1.1, no chart library).

use std::fmt::Write;
use std::path::Path;

use anyhow::Context;

/// One line of a chart: a name for the legend and its (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// Gathers `(name, x, y)` points into one series per name, in the order each name first
    /// appears.
    pub fn grouped(points: impl IntoIterator<Item = (String, f64, f64)>) -> Vec<Series> {
        let mut series: Vec<Series> = Vec::new();
        for (name, x, y) in points {
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push((x, y)),
                None => series.push(Series {
                    name,
                    points: vec![(x, y)],
                }),
            }
        }
        series
    }
}

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes a chart of milliseconds against guest memory (MiB), log-log, to `path`, and says
/// so on stdout.
pub fn write_memory_chart(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let svg = log_log_chart(title, "guest memory (MiB)", "milliseconds", series);
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    println!("# chart written to {}", path.display());
    Ok(())
}

/// Both axes logarithmic (base 2 on x, base 10 on y): memory sizes double, times span orders
/// of magnitude. Points with non-positive or non-finite values are left out.
pub fn log_log_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let scale = Scale::fit(series);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        esc(title)
    );
    write_grid(&mut o, &scale);
    write_axis_labels(&mut o, x_label, y_label);
    for (i, s) in series.iter().enumerate() {
        write_series(&mut o, &scale, i, s);
    }
    o.push_str("</svg>\n");
    o
}

/// A point that can be drawn on log-log axes.
fn plottable(&(x, y): &(f64, f64)) -> bool {
    x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0
}

/// The axes' ranges in whole powers (of 2 on x, of 10 on y), at least one power wide.
struct Scale {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Scale {
    /// The smallest whole-power ranges holding every plottable point (0..1 on both axes when
    /// there is none).
    fn fit(series: &[Series]) -> Scale {
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| plottable(p))
        {
            x0 = x0.min(x.log2());
            x1 = x1.max(x.log2());
            y0 = y0.min(y.log10());
            y1 = y1.max(y.log10());
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let (x0, x1) = (x0.floor(), x1.ceil().max(x0.floor() + 1.0));
        let (y0, y1) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
        Scale { x0, x1, y0, y1 }
    }

    /// Pixel column of `x`.
    fn px(&self, x: f64) -> f64 {
        LEFT + (x.log2() - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)
    }

    /// Pixel row of `y`.
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y.log10() - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)
    }
}

/// Grid lines and tick labels: one per power of 2 on x, one per power of 10 on y.
fn write_grid(o: &mut String, sc: &Scale) {
    let mut e = sc.x0 as i32;
    while e as f64 <= sc.x1 {
        let x = sc.px(2f64.powi(e));
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            2f64.powi(e)
        );
        e += 1;
    }
    let mut e = sc.y0 as i32;
    while e as f64 <= sc.y1 {
        let v = 10f64.powi(e);
        let y = sc.py(v);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
        e += 1;
    }
}

/// The axis titles: under the x axis, and turned upright beside the y axis.
fn write_axis_labels(o: &mut String, x_label: &str, y_label: &str) {
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        H - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        H / 2.0,
        H / 2.0,
        esc(y_label)
    );
}

/// The `i`th series: its line and a dot per point (when it has plottable points), and its
/// legend entry.
fn write_series(o: &mut String, sc: &Scale, i: usize, s: &Series) {
    let color = COLORS[i % COLORS.len()];
    let path: Vec<String> = s
        .points
        .iter()
        .filter(|p| plottable(p))
        .map(|&(x, y)| format!("{:.1},{:.1}", sc.px(x), sc.py(y)))
        .collect();
    if !path.is_empty() {
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
        }
    }
    let ly = TOP + 10.0 + i as f64 * 18.0;
    let _ = writeln!(
        o,
        r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
        W - RIGHT + 12.0,
        W - RIGHT + 32.0,
        W - RIGHT + 38.0,
        ly + 4.0,
        esc(&s.name)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_line_per_series_and_skips_bad_points() {
        let svg = log_log_chart(
            "setup <time>",
            "memory (MiB)",
            "ms",
            &[
                Series {
                    name: "4K".into(),
                    points: vec![(128.0, 1.9), (1024.0, 3.0), (4096.0, f64::NAN)],
                },
                Series {
                    name: "2M populate".into(),
                    points: vec![(128.0, 19.4), (1024.0, 118.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4, "NaN point left out");
        assert!(svg.contains("setup &lt;time&gt;"));
        assert!(svg.contains(">2M populate<"));
        // x ticks at powers of two, y ticks at powers of ten.
        assert!(svg.contains(">128<") && svg.contains(">1024<"));
        assert!(svg.contains(">1<") && svg.contains(">100<"));
    }

    #[test]
    fn points_are_grouped_by_name_in_first_seen_order() {
        let s = Series::grouped([
            ("b".to_string(), 1.0, 2.0),
            ("a".to_string(), 3.0, 4.0),
            ("b".to_string(), 5.0, 6.0),
        ]);
        let got: Vec<(&str, &[(f64, f64)])> = s
            .iter()
            .map(|s| (s.name.as_str(), s.points.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                ("b", &[(1.0, 2.0), (5.0, 6.0)][..]),
                ("a", &[(3.0, 4.0)][..])
            ]
        );
    }
}
