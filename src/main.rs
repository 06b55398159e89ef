use clap::Parser;

fn main() {
    let cli = diffpref::cli::Cli::parse();
    if let Err(e) = diffpref::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
