//! Bounded failure: a job must never hang silently when one rank dies, hangs or panics.
//!
//! - A rank that exits or is killed: the launcher (Open MPI's `mpirun`) notices and stops the
//!   others, naming the rank.
//! - A rank that hangs (a deadlock, a stuck file system, a lost node): the others wait in their
//!   next collective. Each collective runs inside a [`Guard`]; a watchdog thread aborts the job
//!   when one has waited longer than `--collective-timeout`, naming the collective, the rank and
//!   the step.
//! - A rank that panics: the hook prints the panic and aborts the job instead of letting this
//!   rank unwind while the others wait for it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The collective this process is waiting in, and since when.
static WAITING: Mutex<Option<(&'static str, Instant)>> = Mutex::new(None);

/// Marks a collective in progress until dropped.
pub struct Guard(());

/// Enter a collective named `what` (e.g. "gradient all-reduce").
pub fn enter(what: &'static str) -> Guard {
    *WAITING.lock().unwrap_or_else(|e| e.into_inner()) = Some((what, Instant::now()));
    Guard(())
}

impl Drop for Guard {
    fn drop(&mut self) {
        *WAITING.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The collective waited in for longer than `timeout`, if any.
fn overdue(timeout: Duration) -> Option<(&'static str, Duration)> {
    let waiting = *WAITING.lock().unwrap_or_else(|e| e.into_inner());
    let (what, since) = waiting?;
    let waited = since.elapsed();
    (waited > timeout).then_some((what, waited))
}

/// Starts the watchdog thread (once per process).
pub fn start(timeout: Duration) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let poll = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(poll);
                if let Some((what, waited)) = overdue(timeout) {
                    eprintln!(
                        "error: {}: the {what} has waited {:.0} s, longer than --collective-timeout {} s: another rank has died or hung; aborting the job",
                        super::whereabouts(),
                        waited.as_secs_f64(),
                        timeout.as_secs_f64()
                    );
                    super::abort_job(124);
                }
            })
            .expect("cannot start the collective watchdog thread");
    });
}

/// Makes a panic on any thread end the whole job, with the rank and step in the message.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("error: {} panicked; aborting the job", super::whereabouts());
        super::abort_job(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_is_overdue_only_while_held_and_past_the_timeout() {
        let g = enter("test collective");
        assert_eq!(overdue(Duration::from_secs(60)), None);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            overdue(Duration::from_millis(5)).map(|(w, _)| w),
            Some("test collective")
        );
        drop(g);
        assert_eq!(overdue(Duration::ZERO), None);
    }
}
