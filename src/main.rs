use clap::Parser;

/// candle allocates a new buffer for every op's output; glibc's malloc hands buffers above its mmap threshold
/// back to the kernel on every free, so sampling and training spent about a third of their CPU time in page
/// faults. mimalloc keeps and reuses them (see `diffpref::alloc`).
#[global_allocator]
static ALLOC: diffpref::alloc::MiMalloc = diffpref::alloc::MiMalloc;

fn main() {
    diffpref::alloc::retain_freed_memory();
    // candle-core 0.11 asks for its thread count on every matmul and, unless RAYON_NUM_THREADS is set, counts
    // the physical cores by parsing /proc/cpuinfo each time (~5% of sampling). Count them once, as it would.
    // Set before any thread exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            num_cpus::get_physical().max(1).to_string(),
        );
    }
    let cli = diffpref::cli::Cli::parse();
    if let Err(e) = diffpref::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
