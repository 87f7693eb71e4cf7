//! The `diffalign` command line. Flags and reporting live here; the work is in the library.

mod cli;

use clap::Parser;

// Tensors are large and short-lived: glibc's malloc returns them to the kernel and faults fresh
// zeroed pages back in on every op (a quarter of a UNet forward's time); mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
