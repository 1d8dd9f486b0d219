//! The `loraxfer` command line: a thin front over the library.

use std::process::ExitCode;

use clap::Parser;

mod cli;

// mimalloc keeps freed pages for reuse: with the system allocator every weight decoded, every
// buffer of tens of MB, is faulted in and zeroed by the kernel afresh, which doubled the time
// spent reading weights on a full-depth transfer.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`loraxfer selftest | head -1`) panics;
    // with the default action the process ends quietly, as other command-line tools do. Only
    // stdout and stderr are pipes here, and outputs are files: a stop while one is staged is a
    // kill, whose staging directory the next run removes (a demo stopped between its steps
    // leaves its finished parts, which `demo --force` replaces).
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_DFL before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    loraxfer::io::output::install_signal_cleanup();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
