//! smoe-opt as a library: load a model, find its MoE blocks, calibrate their routing on a
//! text, save the statistics, merge half of every layer's experts (MC-SMoE) then compress
//! the merged experts to 40% of the original expert bytes, measure the written model
//! against the original on held-out data, and save it.
//!
//! ```sh
//! cargo run --release --example library -- testdata/lm/model.onnx testdata/lm/calib.txt \
//!     testdata/lm/tokenizer.json testdata/lm/eval.npz /tmp/lm-small.onnx
//! ```
use anyhow::{bail, Context};
use smoe_opt::{calib, compress, merge, moe, reduce, Model};
use std::io::Write;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    run(&args, &mut std::io::stdout())
}

/// The walk-through, printing to `out` (the test runs it too).
pub fn run(args: &[PathBuf], out: &mut impl Write) -> anyhow::Result<()> {
    let [input, text, tokenizer, heldout, output] = args else {
        bail!("usage: library MODEL.onnx CALIB.txt TOKENIZER.json HELDOUT.npz OUT.onnx");
    };

    // 1. Load: the protobuf is read exactly; external data is mapped, not copied.
    let mut model = Model::load(input)?;

    // 2. Detect the MoE blocks (router + experts), whatever exporter wrote them.
    let det = moe::detect(&model.graph);
    for b in &det.blocks {
        writeln!(
            out,
            "{}: {} experts, top-{}, hidden {}",
            b.name,
            b.router.num_experts,
            b.router.top_k,
            b.hidden()
        )?;
    }
    if det.blocks.is_empty() {
        bail!("no MoE blocks in {}", input.display());
    }

    // 3. Calibrate: run the text through the model (tract, else onnxruntime) and collect
    //    each layer's routing statistics, plus what compression reads (input moments and
    //    routed input rows, expert outputs).
    let mut copts = calib::CalibOptions::new(calib::Source::Text {
        text: text.clone(),
        tokenizer: tokenizer.clone(),
        seq_len: 128,
    });
    copts.stats.moments = true;
    copts.stats.outputs = true;
    let stats = calib::calibrate(&model, &det, &copts)?;
    for l in &stats.layers {
        let f: Vec<String> = l.frequency.iter().map(|f| format!("{f:.2}")).collect();
        writeln!(out, "{}: routing frequencies {}", l.block, f.join(" "))?;
    }
    let stats_path = output.with_extension("stats.json");
    calib::save(&stats, &stats_path)?;

    // 4. Reduce from the saved statistics: merge to half the experts, then compress the
    //    merged experts (the planner picks low rank, pruned neurons or base + deltas per
    //    layer by calibrated error) to 40% of the original expert bytes.
    let mut opts = reduce::ReduceOptions::new(merge::MergeMethod::MSmoe, copts);
    opts.budget = Some(merge::Budget::Keep(0.5));
    opts.compress = Some(compress::CompressOptions {
        family: compress::Family::Auto,
        target: compress::TargetSize::Fraction(0.4),
        merge: None,
        layers: None,
        progress: false,
        layer_weights: None,
    });
    opts.stats = Some(stats_path);
    opts.eval_data = Some(heldout.clone());
    let outcome = reduce::reduce(&mut model, &det, &opts)?;
    for l in &outcome.layers {
        writeln!(
            out,
            "{}: {} -> {} experts{}",
            l.block,
            l.experts_before,
            l.experts_after,
            l.compression
                .as_ref()
                .map(|c| format!(
                    ", {} ({} -> {} bytes)",
                    c.family, c.bytes_before, c.bytes_after
                ))
                .unwrap_or_default()
        )?;
    }
    let fid = outcome.fidelity.context("no held-out measurement")?;
    writeln!(
        out,
        "held-out: rel L2 {:.4}, cosine {:.4}, top-1 agreement {:?}",
        fid.rel_l2, fid.cosine, fid.top1_agreement
    )?;

    // 5. Save (atomically; external data when the model needs it).
    let saved = model.save(output, &Default::default())?;
    writeln!(
        out,
        "wrote {} ({} bytes)",
        saved.model_path.display(),
        saved.total_bytes()
    )?;
    Ok(())
}
