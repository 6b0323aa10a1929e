//! The density run's PNG: host resident memory (left axis) and VMs running (right axis) over
//! time, one panel per ramp, with the budget as a line.
//!
//! Text is drawn with plotters' `ab_glyph` backend from a TrueType file read at run time
//! (DejaVu Sans, Debian package `fonts-dejavu-core`), so building needs no system library.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::ramp::Sample;

/// Where the plot's font is looked for, in order.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const GIB: f64 = (1u64 << 30) as f64;

/// One panel of the plot.
#[derive(Clone, Debug)]
pub struct Panel<'a> {
    /// Title.
    pub title: String,
    /// Samples of the ramp.
    pub samples: &'a [Sample],
}

fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                format!(
                    "no font for the plot (looked for {}); install fonts-dejavu-core",
                    FONT_PATHS.join(", ")
                )
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable TrueType font"))
    })
    .clone()
}

/// Draw `panels` stacked, with the budget line at `budget` bytes, into `out` (PNG).
pub fn draw(out: &Path, panels: &[Panel<'_>], budget: u64) -> Result<(), String> {
    ensure_font()?;
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", out.display());
    let height = 360 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(out, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    let ymax = panels
        .iter()
        .flat_map(|p| p.samples.iter().map(|s| s.resident))
        .max()
        .unwrap_or(0)
        .max(budget) as f64
        / GIB
        * 1.1;
    let vmax = panels
        .iter()
        .flat_map(|p| p.samples.iter().map(|s| s.vms))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let tmax = panel.samples.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(50)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(|e| err(&e))?
            .set_secondary_coord(0f64..tmax, 0f64..vmax);
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("host resident (GiB)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .configure_secondary_axes()
            .y_desc("VMs running")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        let b = budget as f64 / GIB;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, b), (tmax, b)],
                RED.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("budget B")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                panel.samples.iter().map(|s| (s.t, s.resident as f64 / GIB)),
                BLUE.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("host resident")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_secondary_series(LineSeries::new(
                panel.samples.iter().map(|s| (s.t, s.vms as f64)),
                BLACK.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label("VMs running (right axis)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        if ensure_font().is_err() {
            eprintln!("skip: no DejaVu font here");
            return;
        }
        let dir = std::env::temp_dir().join(format!("tp-density-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("p.png");
        let s: Vec<Sample> = (0..50)
            .map(|i| Sample {
                t: f64::from(i) * 0.1,
                resident: (i as u64) << 26,
                vms: i as usize / 10,
            })
            .collect();
        let panels = [Panel {
            title: "test".into(),
            samples: &s,
        }];
        draw(&out, &panels, 2 << 30).expect("draw");
        let bytes = std::fs::read(&out).expect("png");
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
