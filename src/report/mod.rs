//! What a run's `metrics.jsonl` says, as series: read back for `summary.csv` (timm's per-epoch
//! table) and the training curves (`curves.png`, `curves.svg`, the `plot` command).
//!
//! A resumed run appends to the same file. Its `start` event names the step it resumed at, so
//! everything logged past that step by the interrupted attempt is dropped when reading: each
//! step and epoch appears once, as the run that got furthest logged it.

pub mod plot;

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// File names in a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.csv";
pub const CURVES_PNG: &str = "curves.png";
pub const CURVES_SVG: &str = "curves.svg";

/// One `step` line: logged every `--log-every` steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPoint {
    /// Global steps done (1-based).
    pub step: u64,
    /// Mean loss of the steps since the previous line (the last step's loss in older logs).
    pub loss: f64,
    pub lr: f64,
    pub loss_scale: f64,
    pub images_per_sec: f64,
}

/// One `epoch` line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochPoint {
    pub epoch: usize,
    /// Global steps done at the epoch's end.
    pub step: u64,
    pub mean_loss: f64,
    /// Learning rate of the epoch's last step (absent in runs logged before it was recorded).
    pub lr: Option<f64>,
    pub images_per_sec: f64,
}

/// One `eval` line; top-1 and top-5 as fractions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalPoint {
    pub epoch: usize,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
}

/// One `loss_scale` line: the dynamic loss scale changed after `step` (1-based). A fall means
/// the step overflowed and was skipped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleChange {
    pub step: u64,
    pub from: f64,
    pub to: f64,
}

impl ScaleChange {
    pub fn skipped(&self) -> bool {
        self.to < self.from
    }
}

/// A run's metrics, each series ordered and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    /// Shown in legends: the run folder's name.
    pub name: String,
    /// From the last `start` line, else worked out from the epoch lines.
    pub steps_per_epoch: Option<u64>,
    pub steps: Vec<StepPoint>,
    pub epochs: Vec<EpochPoint>,
    pub evals: Vec<EvalPoint>,
    pub scale_changes: Vec<ScaleChange>,
}

impl RunMetrics {
    /// Read `<dir>/metrics.jsonl`. Lines that are not JSON objects of a known event (a line cut
    /// off by a crash, say) are ignored.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        Ok(Self::parse(&text, name))
    }

    /// Parse the lines of a metrics file.
    pub fn parse(text: &str, name: String) -> Self {
        let mut steps: BTreeMap<u64, StepPoint> = BTreeMap::new();
        let mut epochs: BTreeMap<usize, EpochPoint> = BTreeMap::new();
        let mut evals: BTreeMap<usize, (u64, EvalPoint)> = BTreeMap::new();
        let mut scales: BTreeMap<u64, ScaleChange> = BTreeMap::new();
        let mut steps_per_epoch = None;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let num = |k: &str| v.get(k).and_then(Value::as_f64);
            let int = |k: &str| v.get(k).and_then(Value::as_u64);
            match v.get("event").and_then(Value::as_str) {
                Some("start") => {
                    if let Some(spe) = int("steps_per_epoch") {
                        steps_per_epoch = Some(spe);
                    }
                    // A resumed attempt: what the interrupted one logged past here is replaced.
                    let s = int("step").unwrap_or(0);
                    steps.retain(|&k, _| k <= s);
                    scales.retain(|&k, _| k <= s);
                    epochs.retain(|_, e| e.step <= s);
                    evals.retain(|_, (k, _)| *k <= s);
                }
                Some("step") => {
                    if let (Some(step), Some(lr)) = (int("step"), num("lr")) {
                        steps.insert(
                            step,
                            StepPoint {
                                step,
                                // A NaN loss is logged as null.
                                loss: num("mean_loss").or(num("loss")).unwrap_or(f64::NAN),
                                lr,
                                loss_scale: num("loss_scale").unwrap_or(1.0),
                                images_per_sec: num("images_per_sec").unwrap_or(f64::NAN),
                            },
                        );
                    }
                }
                Some("epoch") => {
                    if let (Some(epoch), Some(step)) = (int("epoch"), int("step")) {
                        epochs.insert(
                            epoch as usize,
                            EpochPoint {
                                epoch: epoch as usize,
                                step,
                                mean_loss: num("mean_loss").unwrap_or(f64::NAN),
                                lr: num("lr"),
                                images_per_sec: num("images_per_sec").unwrap_or(f64::NAN),
                            },
                        );
                    }
                }
                Some("eval") => {
                    if let (Some(epoch), Some(loss)) = (int("epoch"), num("loss")) {
                        let at = int("step").unwrap_or(0);
                        evals.insert(
                            epoch as usize,
                            (
                                at,
                                EvalPoint {
                                    epoch: epoch as usize,
                                    loss,
                                    top1: num("top1").unwrap_or(f64::NAN),
                                    top5: num("top5").unwrap_or(f64::NAN),
                                },
                            ),
                        );
                    }
                }
                Some("loss_scale") => {
                    if let (Some(step), Some(from), Some(to)) =
                        (int("step"), num("from"), num("to"))
                    {
                        scales.insert(step, ScaleChange { step, from, to });
                    }
                }
                _ => {}
            }
        }
        let steps_per_epoch = steps_per_epoch.or_else(|| {
            epochs
                .values()
                .next()
                .filter(|e| e.epoch > 0 && e.step > 0)
                .map(|e| e.step / e.epoch as u64)
        });
        RunMetrics {
            name,
            steps_per_epoch,
            steps: steps.into_values().collect(),
            epochs: epochs.into_values().collect(),
            evals: evals.into_values().map(|(_, e)| e).collect(),
            scale_changes: scales.into_values().collect(),
        }
    }

    /// A global step count as (fractional) epochs, the curves' common x axis.
    pub fn epoch_of(&self, step: u64) -> f64 {
        step as f64 / self.steps_per_epoch.unwrap_or(1).max(1) as f64
    }

    /// timm's `summary.csv`: `epoch,train_loss,eval_loss,eval_top1,eval_top5,lr`, one row per
    /// finished epoch; top-1 and top-5 in percent as timm writes them, empty cells for an epoch
    /// without an evaluation.
    pub fn summary_csv(&self) -> String {
        let mut out = String::from("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n");
        let evals: BTreeMap<usize, &EvalPoint> = self.evals.iter().map(|e| (e.epoch, e)).collect();
        for e in &self.epochs {
            let lr = e.lr.or_else(|| {
                // Older logs: the last step line of the epoch.
                self.steps
                    .iter()
                    .rev()
                    .find(|s| s.step <= e.step)
                    .map(|s| s.lr)
            });
            let ev = evals.get(&e.epoch);
            let _ = writeln!(
                out,
                "{},{},{},{},{},{}",
                e.epoch,
                e.mean_loss,
                cell(ev.map(|v| v.loss)),
                cell(ev.map(|v| percent(v.top1))),
                cell(ev.map(|v| percent(v.top5))),
                // Logged from an f32: its shortest form, not the widened f64's digits.
                lr.map(|v| format!("{}", v as f32)).unwrap_or_default(),
            );
        }
        out
    }
}

fn cell(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_default()
}

/// A fraction as a percentage rounded to 1e-6 (an accuracy of n / N images is no finer).
fn percent(v: f64) -> f64 {
    (v * 1e8).round() / 1e6
}

/// Rewrite `summary.csv`, `curves.png` and `curves.svg` in a run folder from its metrics file
/// (after every epoch of `train`).
pub fn refresh(dir: &Path) -> Result<()> {
    let run = RunMetrics::read(dir)?;
    write_atomic(&dir.join(SUMMARY_FILE), run.summary_csv().as_bytes())?;
    let runs = [run];
    plot::draw(&runs, &dir.join(CURVES_PNG))?;
    plot::draw(&runs, &dir.join(CURVES_SVG))?;
    Ok(())
}

/// Write through a temporary file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = PathBuf::from(path.as_os_str().to_owned());
    tmp.as_mut_os_string().push(".tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"event":"start","steps_per_epoch":4,"step":0}
{"event":"step","epoch":1,"step":2,"loss":2.5,"lr":0.1,"loss_scale":65536.0,"images_per_sec":10.0}
{"event":"loss_scale","step":3,"from":65536.0,"to":32768.0}
{"event":"step","epoch":1,"step":4,"loss":2.25,"lr":0.2,"loss_scale":32768.0,"images_per_sec":11.0}
{"event":"epoch","epoch":1,"step":4,"mean_loss":2.375,"lr":0.2,"images_per_sec":11.0}
{"event":"eval","epoch":1,"step":4,"loss":2.0,"top1":0.25,"top5":0.75}
{"event":"step","epoch":2,"step":6,"loss":2.0,"lr":0.3,"loss_scale":32768.0,"images_per_sec":12.0}
{"event":"step","epoch":2,"step":8,"loss":9.0,"lr":0.4,"loss_scale":32768.0,"images_per_sec":12.0}
{"event":"epoch","epoch":2,"step":8,"mean_loss":9.0,"lr":0.4,"images_per_sec":12.0}
{"event":"start","steps_per_epoch":4,"step":6}
{"event":"step","epoch":2,"step":8,"loss":1.5,"lr":0.4,"loss_scale":32768.0,"images_per_sec":12.0}
{"event":"epoch","epoch":2,"step":8,"mean_loss":1.75,"lr":0.4,"images_per_sec":12.0}
{"event":"ev"#;

    #[test]
    fn a_resumed_attempt_replaces_what_the_interrupted_one_logged_past_its_step() {
        let m = RunMetrics::parse(LOG, "run".into());
        assert_eq!(m.steps_per_epoch, Some(4));
        let steps: Vec<(u64, f64)> = m.steps.iter().map(|s| (s.step, s.loss)).collect();
        assert_eq!(steps, [(2, 2.5), (4, 2.25), (6, 2.0), (8, 1.5)]);
        assert_eq!(m.epochs.len(), 2);
        assert_eq!(m.epochs[1].mean_loss, 1.75);
        assert_eq!(m.evals.len(), 1);
        assert_eq!(m.scale_changes.len(), 1);
        assert!(m.scale_changes[0].skipped());
        assert_eq!(m.epoch_of(6), 1.5);
    }

    #[test]
    fn summary_csv_has_timms_columns_and_one_row_per_epoch() {
        let m = RunMetrics::parse(LOG, "run".into());
        let csv = m.summary_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr",
                "1,2.375,2,25,75,0.2",
                "2,1.75,,,,0.4",
            ]
        );
    }
}
