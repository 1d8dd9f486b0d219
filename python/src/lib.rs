//! `loraxfer._native`: the engine behind the Python module (python/loraxfer/ is its face).
//!
//! Each call takes the command line's flags (`--rank=16`, …), parses them with the command
//! line's own definitions (`loraxfer::args`), and runs the job on a worker thread while the
//! calling thread waits with the GIL released. That thread wakes for every step, to hand it to
//! the progress callback, and every 100 ms, to let Ctrl-C through; a callback that raises, or
//! KeyboardInterrupt, cancels the job (nothing is written) and the exception propagates.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use loraxfer::progress::Progress;

/// What the worker thread sends the waiting thread.
enum Message<T> {
    Step {
        stage: String,
        done: u64,
        total: u64,
    },
    /// May the output be committed? (`Progress::gate`; answered on the channel inside.)
    Confirm(mpsc::SyncSender<bool>),
    Done(loraxfer::Result<T>),
}

/// How often the waiting thread looks for Ctrl-C when no step arrives.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Runs `work` on a worker thread with the GIL released; see the module comment.
fn run_released<T: Send + 'static>(
    py: Python<'_>,
    callback: Option<Py<PyAny>>,
    work: impl FnOnce(Progress) -> loraxfer::Result<T> + Send + 'static,
) -> PyResult<T> {
    let (tx, mut rx) = mpsc::channel::<Message<T>>();
    let cancel = Arc::new(AtomicBool::new(false));
    let step_tx = tx.clone();
    let gate_tx = tx.clone();
    let progress = Progress {
        bar: false,
        sink: Some(Arc::new(move |s: loraxfer::progress::Step<'_>| {
            let _ = step_tx.send(Message::Step {
                stage: s.stage.to_string(),
                done: s.done,
                total: s.total,
            });
        })),
        cancel: Some(cancel.clone()),
        gate: Some(Arc::new(move || {
            let (reply, answer) = mpsc::sync_channel(1);
            gate_tx.send(Message::Confirm(reply)).is_ok() && answer.recv().unwrap_or(false)
        })),
    };
    let worker = std::thread::Builder::new()
        .name("loraxfer".into())
        .spawn(move || {
            let result = work(progress);
            let _ = tx.send(Message::Done(result));
        })
        .map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start a thread: {e}"))
        })?;

    // The first Python error wins: it is what the caller sees once the job has stopped.
    let mut raised: Option<PyErr> = None;
    let stop = |e: PyErr, raised: &mut Option<PyErr>| {
        cancel.store(true, Ordering::Relaxed);
        raised.get_or_insert(e);
    };
    let outcome = loop {
        let (back, message) = py.detach(move || {
            let m = rx.recv_timeout(SIGNAL_POLL);
            (rx, m)
        });
        rx = back;
        match message {
            Ok(Message::Step { stage, done, total }) => {
                if let (Some(cb), None) = (&callback, &raised) {
                    if let Err(e) = cb.call1(py, (stage, done, total)) {
                        stop(e, &mut raised);
                    }
                }
            }
            Ok(Message::Confirm(reply)) => {
                // Every step before this one has been through the callback (the channel keeps
                // order); Ctrl-C gets a last look too.
                if raised.is_none() {
                    if let Err(e) = py.check_signals() {
                        stop(e, &mut raised);
                    }
                }
                let _ = reply.send(raised.is_none());
            }
            Ok(Message::Done(result)) => break Some(result),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break None,
        }
        if raised.is_none() {
            if let Err(e) = py.check_signals() {
                stop(e, &mut raised);
            }
        }
    };
    let joined = py.detach(move || worker.join());
    if let Some(e) = raised {
        return Err(e);
    }
    match (outcome, joined) {
        (Some(result), _) => result.map_err(|e| to_python(py, e)),
        (None, Err(panic)) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(to_python(
                py,
                loraxfer::Error::internal(format!("the engine stopped: {what}")),
            ))
        }
        (None, Ok(())) => Err(to_python(
            py,
            loraxfer::Error::internal("the engine ended without a result"),
        )),
    }
}

/// The engine's error as the exception class python/loraxfer/_errors.py gives its kind, with
/// the command line's message.
fn to_python(py: Python<'_>, e: loraxfer::Error) -> PyErr {
    // An OSError's errno and filename, for the kinds raised as OSError subclasses (an existing
    // output's EEXIST is filled in by its class).
    let (errno, filename) = match &e {
        loraxfer::Error::Io { path, source, .. } => (source.raw_os_error(), Some(path)),
        loraxfer::Error::OutputExists { path } => (None, Some(path)),
        _ => (None, None),
    };
    let made = (|| -> PyResult<PyErr> {
        let errors = py.import("loraxfer._errors")?;
        let class = errors.getattr("error_class")?.call1((e.kind(),))?;
        let details = pyo3::types::PyDict::new(py);
        details.set_item("errno", errno)?;
        details.set_item(
            "filename",
            filename.map(|p| p.to_string_lossy().into_owned()),
        )?;
        let args = (e.to_string(), e.kind());
        Ok(PyErr::from_value(class.call(args, Some(&details))?))
    })();
    made.unwrap_or_else(|import_failed| import_failed)
}

/// `loraxfer transfer FLAGS` without the printing; the report as JSON.
#[pyfunction]
#[pyo3(signature = (flags, progress=None))]
fn transfer(py: Python<'_>, flags: Vec<String>, progress: Option<Py<PyAny>>) -> PyResult<String> {
    run_released(py, progress, move |progress| {
        let args = loraxfer::args::parse_transfer(&flags)?;
        let job = args.job(progress)?;
        let report = loraxfer::transfer::run(&job)?;
        Ok(serde_json::to_string(&report).expect("reports serialize"))
    })
}

/// `loraxfer inspect --json FLAGS`; the inspection as JSON.
#[pyfunction]
#[pyo3(signature = (flags, progress=None))]
fn inspect(py: Python<'_>, flags: Vec<String>, progress: Option<Py<PyAny>>) -> PyResult<String> {
    run_released(py, progress, move |progress| {
        let args = loraxfer::args::parse_inspect(&flags)?;
        let inspection = args.run(&progress)?;
        Ok(serde_json::to_string(&inspection).expect("inspections serialize"))
    })
}

/// `loraxfer export-gguf`; what was written, as JSON.
#[pyfunction]
#[pyo3(signature = (adapter, base, out, force=false))]
fn export_gguf(
    py: Python<'_>,
    adapter: std::path::PathBuf,
    base: std::path::PathBuf,
    out: std::path::PathBuf,
    force: bool,
) -> PyResult<String> {
    run_released(py, None, move |progress| {
        let done = loraxfer::io::gguf::lora::export(&adapter, &base, &out, force, &progress)?;
        Ok(serde_json::to_string(&done).expect("export summaries serialize"))
    })
}

/// `loraxfer export-mlx`; what was written, as JSON.
#[pyfunction]
#[pyo3(signature = (adapter, out, base=None, force=false))]
fn export_mlx(
    py: Python<'_>,
    adapter: std::path::PathBuf,
    out: std::path::PathBuf,
    base: Option<std::path::PathBuf>,
    force: bool,
) -> PyResult<String> {
    run_released(py, None, move |_| {
        let done =
            loraxfer::io::adapter::mlx_write::export(&adapter, base.as_deref(), &out, force)?;
        Ok(serde_json::to_string(&done).expect("export summaries serialize"))
    })
}

/// The options of `transfer` or `inspect` as the command line defines them, as JSON.
#[pyfunction]
fn options(py: Python<'_>, command: &str) -> PyResult<String> {
    loraxfer::args::option_specs(command)
        .map(|specs| serde_json::to_string(&specs).expect("option specs serialize"))
        .map_err(|e| to_python(py, e))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(transfer, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(options, m)?)?;
    m.add_function(wrap_pyfunction!(export_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(export_mlx, m)?)?;
    Ok(())
}
