//! The `diffalign` command line. Flags and reporting live here; the work is in the library.

mod cli;

use clap::Parser;

// Tensors are large and short-lived: glibc's malloc returns them to the kernel and faults fresh
// zeroed pages back in on every op (a quarter of a UNet forward's time); mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // candle asks for its thread count on every op, and without this variable that means reading
    // cgroup files and /proc/cpuinfo each time (several percent of a training step). Set before
    // any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
