//! The run's plot, `OUT/rl.svg` (the demo and `analyze` draw their own beside their tables).

use std::path::Path;

use optimsyn_pipeline::RewardRow;

/// Writes `OUT/rl.svg`: the RL run per GRPO step in three panels, one per scale: raw IF of the
/// valid rollouts; mean reward and validity rate; the KL to the initial policy.
pub fn rl_plot(out: &Path, rows: &[RewardRow], kl: &[(u64, f64)]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let path = out.join("rl.svg");
    let e = |x: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {x}", path.display());
    let root = SVGBackend::new(&path, (720, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let steps = rows.iter().map(|r| r.step).max().unwrap_or(1).max(2);
    let raw_if: Vec<(u64, f64)> = rows
        .iter()
        .filter_map(|r| r.if_valid_mean.map(|v| (r.step, v)))
        .collect();
    let reward: Vec<(u64, f64)> = rows.iter().map(|r| (r.step, r.reward_mean)).collect();
    let valid: Vec<(u64, f64)> = rows.iter().map(|r| (r.step, r.valid_rate)).collect();
    let overlap: Vec<(u64, f64)> = rows
        .iter()
        .filter_map(|r| r.contaminated.map(|c| (r.step, c)))
        .collect();
    type Series<'a> = (&'a str, RGBColor, &'a [(u64, f64)]);
    let panels: [(&str, Vec<Series>); 3] = [
        ("raw influence (valid rollouts)", vec![("", BLUE, &raw_if)]),
        (
            "reward, validity, share overlapping an evaluation set",
            vec![
                ("reward", RED, &reward),
                ("valid", GREEN, &valid),
                ("overlap", MAGENTA, &overlap),
            ],
        ),
        ("KL to the initial policy", vec![("", BLACK, kl)]),
    ];
    for (area, (title, series)) in root.split_evenly((3, 1)).iter().zip(panels) {
        let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
        // A flat series gets a unit-wide band around it; no data, the unit interval.
        let (lo, hi) = match (lo.is_finite(), hi > lo) {
            (true, true) => (lo, hi),
            (true, false) => (lo - 0.5, lo + 0.5),
            (false, _) => (0.0, 1.0),
        };
        let pad = (hi - lo) * 0.08;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .margin_right(52)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(1u64..steps, (lo - pad)..(hi + pad))
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("GRPO step")
            .light_line_style(WHITE)
            .draw()
            .map_err(|x| e(&x))?;
        for (name, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts.to_vec(), color.stroke_width(2)))
                .map_err(|x| e(&x))?;
            // The series' name at its last point instead of a legend box over the data.
            if let (false, Some(&(x, y))) = (name.is_empty(), pts.last()) {
                chart
                    .draw_series(std::iter::once(Text::new(
                        name.to_string(),
                        (x, y),
                        ("sans-serif", 12).into_font().color(&color),
                    )))
                    .map_err(|x| e(&x))?;
            }
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
