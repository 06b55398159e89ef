use clap::Parser;

/// candle allocates a new buffer for every op's output; glibc's malloc hands buffers above its mmap threshold
/// back to the kernel on every free, so sampling and training spent about a third of their CPU time in page
/// faults. mimalloc keeps and reuses them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = diffpref::cli::Cli::parse();
    if let Err(e) = diffpref::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
