//! `cargo bench`: the foundation benchmark (UNet forward, forward+backward, pipeline s/step) on the tiny
//! test model; set DIFFPREF_BENCH_SD15=1 to add the SD1.5-sized random UNet at a 32x32 latent.

use clap::Parser;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: diffpref::cli::bench::BenchArgs,
}

fn main() -> anyhow::Result<()> {
    let mut argv = vec!["bench".to_string()];
    if std::env::var("DIFFPREF_BENCH_SD15").is_ok_and(|v| v == "1") {
        argv.push("--sd15".into());
    }
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    argv.extend(["--model".to_string(), model.to_string()]);
    let w = Wrapper::parse_from(argv);
    let rows = diffpref::cli::bench::foundation(&w.args)?;
    diffpref::cli::bench::print(&rows);
    Ok(())
}
