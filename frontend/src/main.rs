//! `morph86`: the emulator binary. Parses a QEMU-style command line, assembles the
//! machine, loads the kernel or firmware and runs the guest.
//!
//! Every user error (bad flag, missing or malformed kernel, impossible memory size) ends
//! with one clear line on stderr and a non-zero exit status; never a panic.

mod cli;
mod console;
mod demo;
mod display;
mod loader;
mod logging;
mod machine;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let argv = match cli::normalize(std::env::args()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("morph86: {e}");
            return ExitCode::from(2);
        }
    };
    let args = match cli::Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    let msg = e.to_string();
                    let first = msg.lines().next().unwrap_or("invalid arguments");
                    eprintln!("morph86: {}", first.trim_start_matches("error: "));
                    ExitCode::from(2)
                }
            };
        }
    };
    match machine::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("morph86: {e}");
            ExitCode::from(1)
        }
    }
}
