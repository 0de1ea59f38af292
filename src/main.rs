//! The `smoe-opt` command line.
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use smoe_opt::{inspect, pipeline, Model};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  smoe-opt model.onnx -o out.onnx --method none
                                               re-emit every MoE block in canonical form
  smoe-opt model.onnx -o out.onnx --external-data
                                               write weights to out.onnx.data
  smoe-opt inspect model.onnx                  summarise a model
  smoe-opt inspect model.onnx --json           the same, as JSON for tools

Exit codes: 0 success, 1 failure, 2 usage error.";

/// Merge and compress the experts of Sparse Mixture-of-Experts ONNX models (MC-SMoE).
#[derive(Parser, Debug)]
#[command(name = "smoe-opt", version, after_help = EXAMPLES, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr; no progress bars.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The input ONNX model.
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Where to write the optimised model (never the input).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// Write tensor data to `<output>.data` even below the 2 GiB protobuf limit.
    #[arg(long)]
    external_data: bool,
    /// What to do to the MoE blocks: `none` re-emits each in canonical form with the same
    /// experts (exact). Without --method the model is copied through unchanged.
    #[arg(long, value_enum)]
    method: Option<pipeline::Method>,
    /// Form of re-emitted blocks.
    #[arg(long, value_enum, default_value_t = smoe_opt::emit::EmitForm::Portable)]
    emit: smoe_opt::emit::EmitForm,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run calibration data through the model and save each MoE layer's routing statistics
    /// (JSON plus an .npz sidecar with mean outputs, input moments and routed samples).
    Calibrate {
        /// The ONNX model.
        input: PathBuf,
        /// Calibration inputs: .npz with the model's input names as keys, first axis = samples.
        #[arg(long, group = "data")]
        calib: Option<PathBuf>,
        /// Calibration text, cut into --seq-len token windows by --tokenizer.
        #[arg(long, group = "data", requires = "tokenizer")]
        calib_text: Option<PathBuf>,
        /// A Hugging Face tokenizer.json for --calib-text.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// No data: statistics from the weights only (uniform frequencies; weak).
        #[arg(long, group = "data")]
        data_free: bool,
        /// Use N random token-id sequences instead (weak: real text routes differently).
        #[arg(long, value_name = "N", group = "data")]
        calib_random: Option<usize>,
        /// Tokens per random sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Samples per runtime call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Routed input rows kept per expert.
        #[arg(long, default_value_t = 256)]
        reservoir: usize,
        /// Seed of the reservoirs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the statistics (JSON; the sidecar goes beside it as .npz).
        #[arg(short, long)]
        output: PathBuf,
        /// Runtime: auto (tract when it can run the model, else onnxruntime), tract, ort.
        #[arg(long, value_enum, default_value_t = smoe_opt::calib::Runtime::Auto)]
        runtime: smoe_opt::calib::Runtime,
        /// onnxruntime execution provider.
        #[arg(long, value_enum, default_value_t = smoe_opt::runtime::ort::Ep::Cpu)]
        ort_ep: smoe_opt::runtime::ort::Ep,
    },
    /// Summarise a model: opsets, inputs/outputs, op counts, initializers, external data.
    Inspect {
        /// The ONNX model.
        input: PathBuf,
        /// Print JSON (stable schema; see README) instead of a table.
        #[arg(long)]
        json: bool,
        /// Also print why each TopK/ArgMax/fused op that was not recognised was rejected.
        #[arg(long)]
        explain: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let level = if cli.quiet {
        log::LevelFilter::Error
    } else {
        [
            log::LevelFilter::Warn,
            log::LevelFilter::Info,
            log::LevelFilter::Debug,
        ][usize::from(cli.verbose.min(2))]
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .format_timestamp(None)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e
                .downcast_ref::<smoe_opt::Error>()
                .is_some_and(|e| matches!(e, smoe_opt::Error::Usage(_)));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    match cli.command {
        Some(Command::Inspect {
            input,
            json,
            explain,
        }) => {
            let spin = smoe_opt::progress::spinner(progress, "loading");
            let model = Model::load(&input)?;
            spin.finish_and_clear();
            let info = inspect::inspect(&model);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).context("serialising JSON")?
                );
            } else {
                print!("{}", info.to_text());
                if explain {
                    print!("{}", info.explain_text());
                }
            }
            Ok(())
        }
        Some(Command::Calibrate {
            input,
            calib,
            calib_text,
            tokenizer,
            data_free,
            calib_random,
            seq_len,
            batch,
            reservoir,
            seed,
            output,
            runtime,
            ort_ep,
        }) => {
            let model = Model::load(&input)?;
            let det = smoe_opt::moe::detect(&model.graph);
            for d in &det.diagnostics {
                log::warn!("{d}");
            }
            let source = if let Some(p) = calib {
                smoe_opt::calib::Source::Npz(p)
            } else if let Some(text) = calib_text {
                smoe_opt::calib::Source::Text {
                    text,
                    tokenizer: tokenizer.expect("clap requires --tokenizer"),
                    seq_len,
                }
            } else if let Some(n) = calib_random {
                smoe_opt::calib::Source::Random {
                    samples: n,
                    seq_len,
                }
            } else if data_free {
                smoe_opt::calib::Source::DataFree
            } else {
                return Err(smoe_opt::Error::Usage(
                    "give calibration data: --calib FILE.npz, --calib-text FILE --tokenizer tokenizer.json, \
                     --calib-random N, or --data-free"
                        .into(),
                )
                .into());
            };
            let opts = smoe_opt::calib::CalibOptions {
                runtime,
                ep: ort_ep,
                source,
                batch,
                stats: smoe_opt::calib::stats::StatsConfig {
                    reservoir,
                    seed,
                    ..Default::default()
                },
                progress,
            };
            let stats = smoe_opt::calib::calibrate(&model, &det, &opts)?;
            let side = smoe_opt::calib::save(&stats, &output)?;
            let tokens: u64 = stats.layers.first().map_or(0, |l| l.tokens);
            if !cli.quiet {
                eprintln!(
                    "smoe-opt: calibrated {} blocks on {} samples ({tokens} tokens, {:.0} tokens/s after {:.1} s setup, {}) -> {} + {}",
                    stats.layers.len(),
                    stats.samples,
                    tokens as f64 / stats.seconds_run.max(1e-9),
                    stats.seconds_setup,
                    stats.runtime,
                    output.display(),
                    side.display()
                );
            }
            Ok(())
        }
        None => {
            let (Some(input), Some(output)) = (cli.run.input, cli.run.output) else {
                return Err(smoe_opt::Error::Usage(
                    "an input model and -o OUTPUT are required".into(),
                )
                .into());
            };
            let opts = pipeline::PipelineOptions {
                save: smoe_opt::onnx::SaveOptions {
                    external_data: cli.run.external_data,
                    progress,
                    ..Default::default()
                },
                method: cli.run.method,
                emit: cli.run.emit,
            };
            let report = pipeline::run(&input, &output, &opts)?;
            log::info!(
                "wrote {} ({} bytes{})",
                report.saved.model_path.display(),
                report.saved.model_bytes,
                report
                    .saved
                    .data_path
                    .as_ref()
                    .map(|p| format!(", data {} ({} bytes)", p.display(), report.saved.data_bytes))
                    .unwrap_or_default()
            );
            if !cli.quiet {
                let rewritten = report.blocks.iter().filter(|b| b.rewritten).count();
                eprintln!(
                    "smoe-opt: {} -> {}: {} MoE blocks detected, {rewritten} rewritten; {} -> {} nodes, {}",
                    input.display(),
                    output.display(),
                    report.blocks_detected,
                    report.nodes_before,
                    report.nodes_after,
                    inspect::human_bytes(report.saved.total_bytes())
                );
            }
            Ok(())
        }
    }
}
