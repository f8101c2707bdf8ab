//! Run logs: a progress bar (plain lines when not a terminal), the seed's `log.txt` lines, and
//! metrics as JSON lines.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

/// The run's files; in a distributed run only rank 0 has them ([`RunLog::discard`] elsewhere).
pub struct RunLog {
    log: Option<File>,
    metrics: Option<File>,
}

impl RunLog {
    /// Open (appending) `<out>/log.txt` and `<out>/metrics.jsonl`.
    pub fn open(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create the output folder {}", out.display()))?;
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(out.join(name))
                .with_context(|| format!("cannot write {}", out.join(name).display()))
        };
        Ok(RunLog {
            log: Some(open("log.txt")?),
            metrics: Some(open("metrics.jsonl")?),
        })
    }

    /// A log that writes nothing: the ranks other than 0 of a distributed run.
    pub fn discard() -> Self {
        RunLog {
            log: None,
            metrics: None,
        }
    }

    /// A line of log.txt, in the seed's format.
    pub fn line(&mut self, text: &str) -> Result<()> {
        if let Some(f) = &mut self.log {
            writeln!(f, "{text}")?;
        }
        Ok(())
    }

    /// One JSON object on a line of metrics.jsonl.
    pub fn metrics(&mut self, value: Value) -> Result<()> {
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{value}")?;
        }
        Ok(())
    }
}

/// Progress of an epoch: an indicatif bar on a terminal, otherwise a plain line every few steps;
/// nothing on the ranks other than 0 of a distributed run.
pub struct Progress {
    show: bool,
    bar: Option<ProgressBar>,
    total: u64,
    /// Steps already done when the bar started (a resumed epoch): the ETA counts from there.
    first: u64,
    every: u64,
    start: Instant,
}

impl Progress {
    pub fn new(total: u64, first: u64, prefix: String, every: u64) -> Self {
        let show = crate::dist::is_primary();
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            bar.set_prefix(prefix);
            bar.set_position(first);
            bar.reset_eta();
            bar
        });
        Progress {
            show,
            bar,
            total,
            first,
            every: every.max(1),
            start: Instant::now(),
        }
    }

    /// Report `done` steps with a message (loss, lr, images/s).
    pub fn update(&self, done: u64, msg: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(msg);
            }
            None if self.show && (done.is_multiple_of(self.every) || done == self.total) => {
                let ran = done.saturating_sub(self.first).max(1);
                let eta = self.start.elapsed().as_secs_f64() / ran as f64
                    * self.total.saturating_sub(done) as f64;
                eprintln!("  step {done}/{} {msg} ETA {eta:.0}s", self.total);
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
