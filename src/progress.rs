//! How a long job tells its caller where it is, and how the caller stops it.
//!
//! The command line draws a bar on stderr, or, where stderr is not a terminal (a batch job's
//! log), writes a line when a stage starts, at most every [`LOG_EVERY`] while it runs and when it
//! ends; the Python module hands every step to a callback and
//! cancels the job when that callback raises (or Ctrl-C arrives). Both go through [`Progress`],
//! which a job turns into one [`Tracker`] per stage.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often a stage's progress is written as a line where stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// One step of a stage: `done` of `total` units finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step<'a> {
    /// The stage: `transfer` or `inspect` (units: module pairs); in map mode, before the
    /// transfer, `residual` (units: the bottom residual map's anchor sets, then its polar
    /// factor) and `depth` (units: the layers of both models whose signatures the depth map
    /// compares, when depths differ), then `map` (units: target layers, each counted once its
    /// map is built) together with `transfer`, whose modules run a layer at a time on their
    /// layer's map; `convert` (units: tensors written).
    pub stage: &'a str,
    pub done: u64,
    pub total: u64,
}

/// Receives every step, from whichever thread finished it.
pub type Sink = Arc<dyn Fn(Step<'_>) + Send + Sync>;

/// Asked once, just before the output is renamed into place: `false` cancels the job. The
/// Python module answers it after every step before it has reached its callback, so a
/// callback that raises on the last step still leaves nothing behind.
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

/// How a job reports progress and learns that it should stop.
#[derive(Clone, Default)]
pub struct Progress {
    /// Show progress on stderr: a bar on a terminal, else lines (see the module's comment).
    pub bar: bool,
    /// Called with the first step (0 done) and after every unit.
    pub sink: Option<Sink>,
    /// Set from outside to stop the job: units not yet started are not run, and the job returns
    /// [`Error::Cancelled`] before it writes anything.
    pub cancel: Option<Arc<AtomicBool>>,
    /// See [`Gate`].
    pub gate: Option<Gate>,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("bar", &self.bar)
            .field("sink", &self.sink.as_ref().map(|_| "callback"))
            .field("cancel", &self.cancel)
            .field("gate", &self.gate.as_ref().map(|_| "callback"))
            .finish()
    }
}

impl Progress {
    /// A bar on stderr, nothing else (the command line).
    pub fn bar() -> Self {
        Progress {
            bar: true,
            ..Progress::default()
        }
    }

    /// Nothing shown, never cancelled.
    pub fn hidden() -> Self {
        Progress::default()
    }

    /// Starts a stage of `total` units (`unit` names them on the bar: "modules", "layers"):
    /// draws the bar and reports step 0.
    pub fn start(&self, stage: &'static str, unit: &str, total: u64) -> Tracker {
        let terminal = std::io::stderr().is_terminal();
        let log = (self.bar && !terminal).then(|| LineLog {
            unit: unit.to_string(),
            started: Instant::now(),
            last: Mutex::new(None),
        });
        let bar = if self.bar && terminal {
            let bar = bars().add(indicatif::ProgressBar::new(total));
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:40}}] {{pos}}/{{len}} {unit}, {{elapsed}} (eta {{eta}})"
                ))
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(stage);
            // Redrawn every second, so elapsed time and eta move during long steps too.
            bar.enable_steady_tick(Duration::from_secs(1));
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let tracker = Tracker {
            stage,
            total,
            done: Mutex::new(0),
            bar,
            log,
            sink: self.sink.clone(),
            cancel: self.cancel.clone(),
        };
        tracker.report(0);
        tracker
    }

    /// A line on stderr where progress is shown (what a long job decided before its stages,
    /// such as the mode `auto` chose).
    pub fn note(&self, text: &str) {
        if self.bar {
            eprintln!("{text}");
        }
    }

    /// [`Error::Cancelled`] once the cancel flag is set.
    pub fn check(&self) -> Result<()> {
        check(self.cancel.as_deref())
    }

    /// The last word before the output is committed: the cancel flag, then the [`Gate`].
    pub fn confirm(&self) -> Result<()> {
        self.check()?;
        match &self.gate {
            Some(gate) if !gate() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

/// The bars on stderr, drawn together: a map-mode transfer's `map` and `transfer` stages run
/// at once (one stderr per process, so one set of bars).
fn bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(indicatif::MultiProgress::new)
}

fn check(cancel: Option<&AtomicBool>) -> Result<()> {
    match cancel {
        Some(flag) if flag.load(Ordering::Relaxed) => Err(Error::Cancelled),
        _ => Ok(()),
    }
}

/// The progress of one stage; shared by the threads that run its units.
pub struct Tracker {
    stage: &'static str,
    total: u64,
    /// Held while a step is reported, so the sink sees 1, 2, 3, … in order whichever thread
    /// finishes first.
    done: Mutex<u64>,
    bar: indicatif::ProgressBar,
    log: Option<LineLog>,
    sink: Option<Sink>,
    cancel: Option<Arc<AtomicBool>>,
}

/// Progress as lines on stderr, for logs.
struct LineLog {
    unit: String,
    started: Instant,
    /// When the last line was written (None: not yet).
    last: Mutex<Option<Instant>>,
}

impl LineLog {
    /// Writes `stage: done/total unit, elapsed` at the start, at the end, and otherwise at most
    /// every [`LOG_EVERY`].
    fn write(&self, stage: &str, done: u64, total: u64) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let due = match *last {
            None => true,
            Some(t) => done == total || now.duration_since(t) >= LOG_EVERY,
        };
        if due {
            *last = Some(now);
            let secs = now.duration_since(self.started).as_secs_f64();
            eprintln!("{stage}: {done}/{total} {}, {secs:.0} s", self.unit);
        }
    }
}

impl Tracker {
    /// Before a unit starts: [`Error::Cancelled`] if the job was told to stop.
    pub fn check(&self) -> Result<()> {
        check(self.cancel.as_deref())
    }

    /// After a unit: advances the bar and tells the sink.
    pub fn step(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done += 1;
        self.bar.inc(1);
        self.report(*done);
    }

    fn report(&self, done: u64) {
        if let Some(log) = &self.log {
            log.write(self.stage, done, self.total);
        }
        if let Some(sink) = &self.sink {
            sink(Step {
                stage: self.stage,
                done,
                total: self.total,
            });
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Tracker {
    /// A stage left by an error or a cancel clears its bar too (two may be drawn at once).
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_reach_the_sink_and_cancel_stops() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancel = Arc::new(AtomicBool::new(false));
        let sink_seen = seen.clone();
        let progress = Progress {
            bar: false,
            sink: Some(Arc::new(move |s: Step<'_>| {
                sink_seen
                    .lock()
                    .unwrap()
                    .push((s.stage.to_string(), s.done, s.total))
            })),
            cancel: Some(cancel.clone()),
            gate: Some(Arc::new(|| false)),
        };
        assert!(matches!(progress.confirm(), Err(Error::Cancelled)));
        assert!(Progress::bar().confirm().is_ok());
        let t = progress.start("transfer", "modules", 2);
        assert!(t.check().is_ok());
        t.step();
        t.step();
        t.finish();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("transfer".to_string(), 0, 2),
                ("transfer".to_string(), 1, 2),
                ("transfer".to_string(), 2, 2)
            ]
        );
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(t.check(), Err(Error::Cancelled)));
        assert!(matches!(progress.check(), Err(Error::Cancelled)));
        assert!(Progress::hidden().check().is_ok());
    }

    #[test]
    fn steps_from_many_threads_arrive_in_order() {
        use rayon::prelude::*;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = seen.clone();
        let progress = Progress {
            sink: Some(Arc::new(move |s: Step<'_>| {
                sink_seen.lock().unwrap().push(s.done)
            })),
            ..Progress::default()
        };
        let t = progress.start("inspect", "modules", 2000);
        (0..2000).into_par_iter().for_each(|_| t.step());
        assert_eq!(*seen.lock().unwrap(), (0..=2000).collect::<Vec<u64>>());
    }
}
