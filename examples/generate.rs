//! Library use: load a model folder, sample with a per-step observer, save the images and a strip of the
//! predicted x0 of every step.
//!
//! `cargo run --release --example generate -- [MODEL_DIR] [PROMPT]`

use diffpref::imaging;
use diffpref::pipelines::loading::{LoadOptions, StableDiffusion};
use diffpref::pipelines::pipeline::{GenerateOptions, Pipeline, StepView};
use diffpref::pipelines::schedulers::SchedulerKind;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/tiny-sd".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red cube on a blue sphere".into());
    let model = StableDiffusion::load(dir.as_ref(), &LoadOptions::default())?;
    let pipe = Pipeline::new(&model)?;
    let opts = GenerateOptions {
        steps: 12,
        guidance_scale: 7.5,
        scheduler: Some(SchedulerKind::EulerAncestral),
        seed: 7,
        decode_steps: true,
        ..Default::default()
    };
    let mut frames = Vec::new();
    let mut on_step = |s: &StepView| -> diffpref::pipelines::Result<()> {
        println!(
            "step {:2} t={:7.2} |x_t|={:.3}",
            s.index,
            s.timestep,
            s.latents.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?
        );
        frames.push(s.pred_x0_images.expect("decode_steps is on").clone());
        Ok(())
    };
    let out = pipe.generate(&[prompt.as_str()], &[], &opts, Some(&mut on_step))?;
    std::fs::create_dir_all("out")?;
    imaging::save_png(
        &imaging::tensor_to_images(&out.images)?[0],
        "out/example.png",
    )?;
    let strip: Vec<_> = frames
        .iter()
        .map(|f| Ok(imaging::tensor_to_images(f)?.remove(0)))
        .collect::<anyhow::Result<_>>()?;
    imaging::save_png(&imaging::strip(&strip, 2), "out/example-steps.png")?;
    println!("wrote out/example.png and out/example-steps.png");
    Ok(())
}
