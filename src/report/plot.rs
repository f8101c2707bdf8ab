//! Training curves of one or more runs on shared axes (x: epochs), drawn with plotters into a
//! PNG or an SVG. The font (DejaVu Sans, `assets/`) is compiled in, so no system fonts are needed.
//!
//! Panels: training loss per log interval with the evaluation loss per epoch, evaluation top-1
//! and top-5, learning rate, images/s, the loss scale with skipped (overflowed) steps marked, and
//! a text summary per run. One colour per run.

use super::{RunMetrics, StepPoint};
use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// Picture size in pixels.
pub const SIZE: (u32, u32) = (1500, 900);

const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// One colour per run (matplotlib's "tab10" without its red, which marks skipped steps).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];
const SKIP_COLOUR: RGBColor = RGBColor(214, 39, 40);

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .map_err(|_| anyhow!("the bundled font is unreadable"));
    });
    result
}

/// Draw `runs` into `path`: SVG when it ends in `.svg`, otherwise PNG. The file is replaced
/// atomically.
pub fn draw(runs: &[RunMetrics], path: &Path) -> Result<()> {
    register_font()?;
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let bytes = if svg {
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
            draw_on(&root, runs)?;
            root.present()?;
        }
        text.into_bytes()
    } else {
        let (w, h) = SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
            draw_on(&root, runs)?;
            root.present()?;
        }
        use image::codecs::png::{CompressionType, FilterType, PngEncoder};
        use image::ImageEncoder;
        let mut png = Vec::new();
        PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::Adaptive)
            .write_image(&buf, w, h, image::ExtendedColorType::Rgb8)
            .context("encoding the PNG")?;
        png
    };
    super::write_atomic(path, &bytes)
}

/// A range around finite values with a margin; `fallback` when there are none.
fn span(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return fallback;
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let pad = (hi.abs() * 0.1).max(1e-6);
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.06;
    (lo - pad, hi + pad)
}

fn finite(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite()
}

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[RunMetrics]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let title = match runs {
        [one] => format!("Training curves: {}", one.name),
        _ => format!("Training curves: {} runs", runs.len()),
    };
    let (top, body) = root.split_vertically(36);
    top.draw(&Text::new(
        title,
        (14, 8),
        (FONT, 22).into_font().color(&BLACK),
    ))?;
    let panels = body.split_evenly((2, 3));
    let x_max = runs
        .iter()
        .flat_map(|r| {
            let last_step = r.steps.last().map(|s| r.epoch_of(s.step));
            let last_epoch = r.epochs.last().map(|e| e.epoch as f64);
            last_step.into_iter().chain(last_epoch)
        })
        .fold(1.0f64, f64::max);
    let x = 0.0..x_max * 1.02;
    loss_panel(&panels[0], runs, x.clone())?;
    accuracy_panel(&panels[1], runs, x.clone())?;
    let (lr_fmt, ips_fmt) = (|v: &f64| format!("{v:.1e}"), |v: &f64| format!("{v:.0}"));
    let lr = ("Learning rate", "lr");
    line_panel(&panels[2], runs, x.clone(), lr, &lr_fmt, |s| s.lr)?;
    let speed = ("Throughput", "images/s");
    line_panel(&panels[3], runs, x.clone(), speed, &ips_fmt, |s| {
        s.images_per_sec
    })?;
    scale_panel(&panels[4], runs, x)?;
    summary_panel(&panels[5], runs)?;
    Ok(())
}

type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    x: std::ops::Range<f64>,
    y: (f64, f64),
    y_desc: &str,
    y_fmt: &dyn Fn(&f64) -> String,
) -> Result<Chart<'a, DB>>
where
    DB::ErrorType: 'static,
{
    let mut c = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(10)
        .x_label_area_size(38)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y.0..y.1)?;
    c.configure_mesh()
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_desc("epoch")
        .y_desc(y_desc)
        .y_label_formatter(y_fmt)
        .draw()?;
    Ok(c)
}

fn legend<'a, DB: DrawingBackend + 'a>(
    c: &mut Chart<'a, DB>,
    pos: SeriesLabelPosition,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    c.configure_series_labels()
        .position(pos)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

fn line_key(c: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
}

/// Training loss per log interval, evaluation loss per epoch, skipped steps along the bottom.
fn loss_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunMetrics],
    x: std::ops::Range<f64>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    // An evaluation loss far above every training loss (BN statistics not settled after the
    // first epoch, say) would flatten the curves: the axis stops at twice the highest training
    // loss and such points sit on its top edge, labelled with their value.
    let train_max = runs
        .iter()
        .flat_map(|r| r.steps.iter().map(|s| s.loss))
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let cap = if train_max.is_finite() {
        2.0 * train_max.max(0.0)
    } else {
        f64::INFINITY
    };
    let values = runs.iter().flat_map(|r| {
        r.steps
            .iter()
            .map(|s| s.loss)
            .chain(r.evals.iter().map(|e| e.loss).filter(|&v| v <= cap))
    });
    let y = span(values, (0.0, 1.0));
    let mut c = chart(area, "Loss", x, y, "loss", &|v| format!("{v:.2}"))?;
    let several = runs.len() > 1;
    let mut any_skip = false;
    for (i, r) in runs.iter().enumerate() {
        let col = colour(i);
        let train: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|s| (r.epoch_of(s.step), s.loss))
            .filter(finite)
            .collect();
        let name = |what: &str| match several {
            true => format!("{} {what}", r.name),
            false => what.to_string(),
        };
        c.draw_series(LineSeries::new(train, col.stroke_width(2)))?
            .label(name("train (per log interval)"))
            .legend(line_key(col));
        let eval: Vec<(f64, f64)> = r
            .evals
            .iter()
            .map(|e| (e.epoch as f64, e.loss.min(y.1)))
            .filter(finite)
            .collect();
        if !eval.is_empty() {
            let dark = RGBColor(col.0 / 2, col.1 / 2, col.2 / 2);
            for e in r.evals.iter().filter(|e| e.loss > y.1) {
                c.draw_series(std::iter::once(
                    EmptyElement::at((e.epoch as f64, y.1))
                        + Text::new(
                            format!("\u{2191} {:.1}", e.loss),
                            (8, -2),
                            (FONT, 12).into_font().color(&dark),
                        ),
                ))?;
            }
            c.draw_series(DashedLineSeries::new(
                eval.clone(),
                6,
                4,
                dark.stroke_width(2),
            ))?;
            c.draw_series(eval.iter().map(|&p| Circle::new(p, 4, dark.filled())))?
                .label(name("eval (per epoch)"))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, dark.filled()));
        }
        let marks: Vec<(f64, f64)> = r
            .scale_changes
            .iter()
            .filter(|s| s.skipped())
            .map(|s| (r.epoch_of(s.step), y.0 + (y.1 - y.0) * 0.03))
            .collect();
        if !marks.is_empty() {
            any_skip = true;
            c.draw_series(
                marks
                    .iter()
                    .map(|&p| Cross::new(p, 5, SKIP_COLOUR.stroke_width(2))),
            )?;
        }
    }
    if any_skip {
        // One legend entry for every run's markers.
        c.draw_series(std::iter::empty::<Cross<(f64, f64), i32>>())?
            .label("skipped step (overflow)")
            .legend(|(x, y)| Cross::new((x + 10, y), 5, SKIP_COLOUR.stroke_width(2)));
    }
    legend(&mut c, SeriesLabelPosition::UpperRight)
}

/// Top-1 (circles, solid) and top-5 (triangles, dashed) per evaluated epoch, in percent.
fn accuracy_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunMetrics],
    x: std::ops::Range<f64>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let values = runs
        .iter()
        .flat_map(|r| r.evals.iter().flat_map(|e| [e.top1, e.top5]))
        .map(|v| v * 100.0);
    let (lo, hi) = span(values, (0.0, 100.0));
    let y = (lo.max(0.0), hi.min(100.0).max(lo.max(0.0) + 1.0));
    let mut c = chart(
        area,
        "Evaluation top-1 (\u{25cf}, solid) and top-5 (\u{25b2}, dashed)",
        x,
        y,
        "accuracy (%)",
        &|v| format!("{v:.0}"),
    )?;
    let mut any = false;
    for (i, r) in runs.iter().enumerate() {
        let col = colour(i);
        let pts = |f: fn(&super::EvalPoint) -> f64| -> Vec<(f64, f64)> {
            r.evals
                .iter()
                .map(|e| (e.epoch as f64, f(e) * 100.0))
                .filter(finite)
                .collect()
        };
        let (top1, top5) = (pts(|e| e.top1), pts(|e| e.top5));
        any |= !top1.is_empty();
        c.draw_series(LineSeries::new(top1.clone(), col.stroke_width(2)))?;
        c.draw_series(top1.iter().map(|&p| Circle::new(p, 4, col.filled())))?;
        c.draw_series(DashedLineSeries::new(
            top5.clone(),
            6,
            4,
            col.stroke_width(2),
        ))?;
        c.draw_series(
            top5.iter()
                .map(|&p| TriangleMarker::new(p, 5, col.filled())),
        )?;
    }
    if !any {
        note(area, "no evaluation yet")?;
    }
    Ok(())
}

/// One per-interval series of every run (from zero up) against epochs: the learning rate, images/s.
fn line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunMetrics],
    x: std::ops::Range<f64>,
    (caption, y_desc): (&str, &str),
    y_fmt: &dyn Fn(&f64) -> String,
    value: fn(&StepPoint) -> f64,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (_, hi) = span(
        runs.iter().flat_map(|r| r.steps.iter().map(value)),
        (0.0, 1.0),
    );
    let mut c = chart(area, caption, x, (0.0, hi), y_desc, y_fmt)?;
    for (i, r) in runs.iter().enumerate() {
        let pts: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|s| (r.epoch_of(s.step), value(s)))
            .filter(finite)
            .collect();
        c.draw_series(LineSeries::new(pts, colour(i).stroke_width(2)))?;
    }
    Ok(())
}

/// The loss scale (log2 axis) as logged per interval, its changes marked: red crosses where a
/// step overflowed and was skipped, upward triangles where the scale grew.
fn scale_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunMetrics],
    x: std::ops::Range<f64>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let scaled = runs
        .iter()
        .any(|r| !r.scale_changes.is_empty() || r.steps.iter().any(|s| s.loss_scale != 1.0));
    let log2 = |v: f64| v.max(f64::MIN_POSITIVE).log2();
    let values = runs.iter().flat_map(|r| {
        r.steps
            .iter()
            .map(|s| s.loss_scale)
            .chain(r.scale_changes.iter().flat_map(|c| [c.from, c.to]))
    });
    if !scaled {
        area.margin(9, 0, 0, 0).titled("Loss scale", (FONT, 18))?;
        return note(area, "no loss scaling (fp32)");
    }
    let y = span(values.map(log2), (-1.0, 1.0));
    let mut c = chart(area, "Loss scale", x, y, "loss scale", &|v| {
        format!("{:.0}", v.exp2())
    })?;
    let mut any_skip = false;
    for (i, r) in runs.iter().enumerate() {
        let col = colour(i);
        // The scale in force over time: the logged values, stepping at each change.
        let mut pts: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|s| (s.step, log2(s.loss_scale)))
            .chain(
                r.scale_changes
                    .iter()
                    .flat_map(|c| [(c.step, log2(c.from)), (c.step, log2(c.to))]),
            )
            .map(|(s, v)| (r.epoch_of(s), v))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.draw_series(LineSeries::new(pts, col.stroke_width(2)))?;
        for ch in &r.scale_changes {
            let p = (r.epoch_of(ch.step), log2(ch.to));
            if ch.skipped() {
                any_skip = true;
                c.draw_series(std::iter::once(Cross::new(
                    p,
                    5,
                    SKIP_COLOUR.stroke_width(2),
                )))?;
            } else {
                c.draw_series(std::iter::once(TriangleMarker::new(p, 5, col.filled())))?;
            }
        }
    }
    if any_skip {
        c.draw_series(std::iter::empty::<Cross<(f64, f64), i32>>())?
            .label("overflow: step skipped, scale halved")
            .legend(|(x, y)| Cross::new((x + 10, y), 5, SKIP_COLOUR.stroke_width(2)));
        legend(&mut c, SeriesLabelPosition::LowerLeft)?;
    }
    Ok(())
}

/// A line of grey text in the middle of a panel.
fn note<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, text: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        text.to_string(),
        (w as i32 / 2 - 70, h as i32 / 2),
        (FONT, 15).into_font().color(&BLACK.mix(0.5)),
    ))?;
    Ok(())
}

/// Per run, in its colour: epochs, final training loss, last and best evaluation.
fn summary_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunMetrics],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut y = 16;
    let line = |text: String, y: i32, col: RGBColor, size: u32| {
        area.draw(&Text::new(
            text,
            (20, y),
            (FONT, size).into_font().color(&col),
        ))
    };
    line("Summary".into(), y, BLACK, 18)?;
    y += 32;
    for (i, r) in runs.iter().enumerate().take(8) {
        line(r.name.clone(), y, colour(i), 16)?;
        y += 22;
        let mut facts = Vec::new();
        if let (Some(first), Some(last)) = (r.epochs.first(), r.epochs.last()) {
            facts.push(format!(
                "{} epochs, {} steps; mean train loss {:.4} -> {:.4}",
                last.epoch, last.step, first.mean_loss, last.mean_loss
            ));
        } else if let Some(s) = r.steps.last() {
            facts.push(format!("step {}, train loss {:.4}", s.step, s.loss));
        }
        if let Some(e) = r.evals.last() {
            facts.push(format!(
                "last eval (epoch {}): loss {:.4}, top-1 {:.1}%, top-5 {:.1}%",
                e.epoch,
                e.loss,
                e.top1 * 100.0,
                e.top5 * 100.0
            ));
        }
        if let Some(b) = r.evals.iter().max_by(|a, b| a.top1.total_cmp(&b.top1)) {
            facts.push(format!(
                "best top-1 {:.1}% at epoch {}",
                b.top1 * 100.0,
                b.epoch
            ));
        }
        let skipped = r.scale_changes.iter().filter(|c| c.skipped()).count();
        if skipped > 0 {
            facts.push(format!("{skipped} steps skipped on overflow"));
        }
        for f in facts {
            line(f, y, RGBColor(50, 50, 50), 13)?;
            y += 19;
        }
        y += 10;
    }
    Ok(())
}
