//! The `diffalign` command line. Flags and reporting live here; the work is in the library.

mod cli;

use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;

// Tensors are large and short-lived: glibc's malloc returns them to the kernel and faults fresh
// zeroed pages back in on every op (a quarter of a UNet forward's time); mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// Sets one of mimalloc's options (part of the library `mimalloc` links).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc's option enum (the same in its v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// The stack of each rayon worker, as large as a main thread's (8 MiB).
const MAIN_STACK: usize = 8 << 20;

fn main() {
    // candle asks for its thread count on every op, and without this variable that means reading
    // cgroup files and /proc/cpuinfo each time (several percent of a training step). Set before
    // any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle's CPU worker threads spin 25,000 times for the next op before they sleep, taking a
    // core from our kernels and gemm's rayon threads in the meantime: on 2 cores a UNet forward +
    // backward bench spent about 20% more CPU time (`perf stat`: 22.3 s against 17.9 s, mean of
    // three runs each) for no faster wall time.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    // candle's elementwise ops run on a pool of their own beside rayon's (our kernels, gemm), and
    // each pool's idle threads wait for work while the other runs, so the two share the cores
    // badly. Those ops are memory-bound and need few threads: a quarter of the cores (one on 2
    // cores, where no candle worker is left) made the unet-mid DPO step 11% faster there
    // (1.38 s to 1.23 s on an AVX-512 Xeon with 2 vCPUs); larger machines were not measured.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("CANDLE_NUM_THREADS", (n / 4).max(1).to_string());
    }
    // mimalloc still hands freed pages back to the kernel 10 ms after they fall idle, and a
    // training step reallocates them at once: keeping them saves ~40,000 page faults and 10% of
    // the CPU time of a UNet forward and backward. The peak memory is the same; it is just not
    // returned between ops. `MIMALLOC_PURGE_DELAY` in the environment still decides if set.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain option setter, called before any other thread exists.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let args = cli::Cli::parse();
    // The command runs on a worker of rayon's pool, not beside it: a parallel op started from
    // outside the pool parks the calling thread on a lock until the pool's threads finish, two
    // context switches per op; from a worker it joins the work. Workers get the main thread's
    // stack size, as candle's backward pass walks the graph recursively.
    let pool = rayon::ThreadPoolBuilder::new().stack_size(MAIN_STACK).build_global();
    let done = AtomicBool::new(false);
    let result = match pool {
        Ok(()) => rayon::scope(|s| {
            // The other workers keep looking for work between the command's parallel ops
            // instead of going to sleep after a few dozen idle rounds: on 2 cores, waking them
            // for each op cost about a tenth of a training step (the unet-mid DPO step 0.88-0.93 s
            // to 0.81 s on an AVX-512 Xeon). `DIFFALIGN_IDLE_WORKERS=sleep` turns it off, for
            // machines shared with other work.
            if std::env::var("DIFFALIGN_IDLE_WORKERS").as_deref() != Ok("sleep") {
                let runner = rayon::current_thread_index();
                for _ in 1..rayon::current_num_threads() {
                    let done = &done;
                    s.spawn(move |_| keep_warm(done, runner));
                }
            }
            let _release = Release(&done);
            cli::run(args)
        }),
        Err(_) => cli::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Sets its flag when dropped: when the command returns, and when it panics (the scope waits for
/// the [`keep_warm`] workers before it passes the panic on).
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Keeps a rayon worker taking work until `done`, yielding the core while there is none. Returns
/// at once on the `runner` thread (the command's), which must not spin.
fn keep_warm(done: &AtomicBool, runner: Option<usize>) {
    if rayon::current_thread_index() == runner {
        return;
    }
    while !done.load(Ordering::Relaxed) {
        if rayon::yield_now() == Some(rayon::Yield::Idle) {
            std::thread::yield_now();
        }
    }
}
