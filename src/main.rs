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
