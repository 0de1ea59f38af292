//! The `smoe-opt` command line: its flags, and each command run from them. The binary
//! (`src/main.rs`) and the Python package call [`parse`] and [`run`], so both take the same
//! arguments and say the same errors.
use crate::{inspect, pipeline, Model};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  smoe-opt model.onnx -o out.onnx --method none
                                               re-emit every MoE block in canonical form
  smoe-opt model.onnx -o out.onnx --external-data
                                               write weights to out.onnx.<hash>.data
  smoe-opt model.onnx -o small.onnx --target-size 0.5 --calib-text corpus.txt --tokenizer tokenizer.json
                                               compress the experts to half their bytes (auto plan)
  smoe-opt model.onnx -o small.onnx --keep 0.5 --calib-text corpus.txt --tokenizer tokenizer.json --report r.json
                                               merge half of every MoE layer's experts (MC-SMoE)
  smoe-opt model.onnx -o small.onnx --method prune-reap --experts 4 --calib data.npz --max-error 0.2
                                               prune to 4 experts per layer; refuse if outputs move > 20%
  smoe-opt eval model.onnx --data heldout.npz  held-out perplexity and top-1 accuracy
  smoe-opt inspect model.onnx                  summarise a model
  smoe-opt inspect model.onnx --json           the same, as JSON for tools
  smoe-opt report r.json --html r.html         a saved report as an HTML page with figures

Exit codes: 0 success, 1 failure, 2 usage error.";

/// Merge and compress the experts of Sparse Mixture-of-Experts ONNX models (MC-SMoE).
/// The parsed command line.
#[derive(Parser, Debug)]
#[command(name = "smoe-opt", version, after_help = EXAMPLES, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
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
#[command(group = clap::ArgGroup::new("target").args(["target_size", "target_bytes"]))]
struct RunArgs {
    /// The input ONNX model.
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Where to write the optimised model (never the input).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// Write tensor data to `<output>.<hash>.data` even below the 2 GiB protobuf limit.
    #[arg(long)]
    external_data: bool,
    /// Print what the run would do, with memory and disk estimates, and stop (nothing is
    /// calibrated, planned or written).
    #[arg(long)]
    dry_run: bool,
    /// What to do to the MoE blocks: `none` re-emits each in canonical form with the same
    /// experts (exact); the others reduce experts (default with --experts/--keep: m-smoe).
    /// Without --method, --experts or --keep the model is copied through unchanged.
    #[arg(long, value_enum)]
    method: Option<pipeline::Method>,
    /// Form of rewritten blocks: auto (portable, but int4/int8 com.microsoft.QMoE blocks stay
    /// QMoE, requantised), portable (standard ops, exact merged semantics; QMoE dequantised)
    /// or ort-fused (com.microsoft.MoE/QMoE where it fits; merged layers of softmax routers
    /// then use the router-merging variant).
    #[arg(long, value_enum, default_value_t = crate::emit::EmitForm::Auto)]
    emit: crate::emit::EmitForm,
    /// Keep on average M experts per reduced MoE layer.
    #[arg(long, value_name = "M", conflicts_with = "keep")]
    experts: Option<usize>,
    /// Keep this fraction of each reduced layer's experts (0 < F <= 1).
    #[arg(long, value_name = "F", value_parser = parse_fraction)]
    keep: Option<f64>,
    /// Compress the routed experts to this fraction of their bytes (0 < F <= 1): low-rank
    /// MatMul pairs, shared base + low-rank deltas, pruned neurons, merging, chosen per layer
    /// by calibrated error (--compress). With --keep/--experts the experts are merged first.
    #[arg(long, value_name = "F", value_parser = parse_fraction, conflicts_with = "target_bytes")]
    target_size: Option<f64>,
    /// Compress the routed experts to at most N bytes (f32), as --target-size.
    #[arg(long, value_name = "N")]
    target_bytes: Option<u64>,
    /// Compression family under --target-size: auto measures them all per layer.
    #[arg(long, value_enum, requires = "target")]
    compress: Option<crate::compress::Family>,
    /// How a compression plan is fitted: one-shot (every layer on the original model's
    /// activations), sequential (layer by layer, each refitted on the activations of the
    /// already rewritten earlier layers; every model run goes segment by segment, one
    /// segment in a runtime at a time), auto (both, measured end to end on calibration
    /// samples; the better is written — sequential, segment by segment, when the model would
    /// not fit comfortably in memory run whole).
    #[arg(long, value_enum, default_value_t = crate::sequential::Pipeline::Auto)]
    pipeline: crate::sequential::Pipeline,
    /// Plan as if only this much memory were available (bytes, or with a K/M/G/T suffix,
    /// powers of 1024); default: MemAvailable, capped by the cgroup's limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Neuron alignment before averaging (default: weight for m-smoe, none otherwise).
    #[arg(long, value_enum)]
    align: Option<crate::merge::Align>,
    /// How experts are grouped (default: router-logits; outputs for hc-smoe).
    #[arg(long, value_enum)]
    grouping: Option<crate::merge::Grouping>,
    /// MoE layers to reduce, as numbered by `inspect` (e.g. 0,2-3); default all.
    #[arg(long, value_parser = parse_layers)]
    layers: Option<Layers>,
    /// Routing statistics from `smoe-opt calibrate` instead of calibrating here.
    #[arg(long, value_name = "STATS.json")]
    stats: Option<PathBuf>,
    /// Held-out inputs (.npz) for the fidelity measurement; default: --holdout of the
    /// calibration samples, kept out of fitting.
    #[arg(long, value_name = "FILE.npz")]
    eval_data: Option<PathBuf>,
    /// Fraction of calibration samples held out for the fidelity measurement.
    #[arg(long, default_value_t = 0.25, value_parser = parse_holdout)]
    holdout: f64,
    /// Fail (exit 1, nothing written) when the held-out relative L2 error exceeds this.
    #[arg(long, value_name = "X", value_parser = parse_max_error)]
    max_error: Option<f64>,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Write the report as one self-contained HTML page (inline SVG figures) here.
    #[arg(long, value_name = "FILE.html")]
    report_html: Option<PathBuf>,
    #[command(flatten)]
    calib: CalibArgs,
}

/// Calibration data and runtime (shared by `calibrate` and the main job).
#[derive(Args, Debug, Clone)]
struct CalibArgs {
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
    #[arg(long, value_name = "N", group = "data", value_parser = clap::value_parser!(u32).range(1..))]
    calib_random: Option<u32>,
    /// Tokens per calibration window (--calib-text) or random sequence.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    seq_len: u32,
    /// Samples per runtime call.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=65536))]
    batch: u32,
    /// Routed input rows kept per expert.
    #[arg(long, default_value_t = 1024)]
    reservoir: usize,
    /// Seed of the reservoirs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Runtime: auto (tract when it can run the model, else onnxruntime), tract, ort.
    #[arg(long, value_enum, default_value_t = crate::calib::Runtime::Auto)]
    runtime: crate::calib::Runtime,
    /// onnxruntime execution provider.
    #[arg(long, value_enum, default_value_t = crate::runtime::Ep::Cpu)]
    ort_ep: crate::runtime::Ep,
}

impl CalibArgs {
    /// The files calibration reads, with the flags naming them.
    fn input_files(&self) -> Vec<(&'static str, &std::path::Path)> {
        [
            ("--calib", &self.calib),
            ("--calib-text", &self.calib_text),
            ("--tokenizer", &self.tokenizer),
        ]
        .into_iter()
        .filter_map(|(f, p)| p.as_deref().map(|p| (f, p)))
        .collect()
    }

    fn source(&self) -> Option<crate::calib::Source> {
        use crate::calib::Source;
        if let Some(p) = &self.calib {
            Some(Source::Npz(p.clone()))
        } else if let Some(text) = &self.calib_text {
            Some(Source::Text {
                text: text.clone(),
                tokenizer: self.tokenizer.clone().expect("clap requires --tokenizer"),
                seq_len: self.seq_len as usize,
            })
        } else if let Some(n) = self.calib_random {
            Some(Source::Random {
                samples: n as usize,
                seq_len: self.seq_len as usize,
            })
        } else if self.data_free {
            Some(Source::DataFree)
        } else {
            None
        }
    }

    fn options(&self, source: crate::calib::Source, progress: bool) -> crate::calib::CalibOptions {
        crate::calib::CalibOptions {
            runtime: self.runtime,
            #[cfg(feature = "ort")]
            ep: self.ort_ep,
            source,
            batch: self.batch as usize,
            stats: crate::calib::stats::StatsConfig {
                reservoir: self.reservoir,
                seed: self.seed,
                ..Default::default()
            },
            progress,
        }
    }
}

/// What `calibrate` collects (`--collect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Collect {
    /// Every statistic: routing, expert outputs (REAP, mean outputs), input moments, routed
    /// samples.
    All,
    /// Frequencies, routing weights and router-logit similarity only.
    Routing,
}

/// MoE layer indices from `--layers`.
#[derive(Debug, Clone)]
struct Layers(Vec<usize>);

/// The largest MoE layer index `--layers` accepts (far above any model's count; keeps a
/// range such as `0-4000000000` from allocating billions of entries).
const MAX_LAYER: usize = 65535;

/// Parses `--layers 0,2-3`.
fn parse_layers(s: &str) -> Result<Layers, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("'{part}' is not a layer index or range like 2-5");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                if b > MAX_LAYER {
                    return Err(format!(
                        "layer {b} is out of range (MoE layers are numbered 0..{MAX_LAYER})"
                    ));
                }
                out.extend(a..=b);
            }
            None => {
                let i: usize = part.parse().map_err(|_| bad())?;
                if i > MAX_LAYER {
                    return Err(format!(
                        "layer {i} is out of range (MoE layers are numbered 0..{MAX_LAYER})"
                    ));
                }
                out.push(i)
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(Layers(out))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 12G, 512M, 1000000)"))?;
    let bytes = v * (1u64 << shift) as f64;
    if v.is_finite() && v > 0.0 && bytes < u64::MAX as f64 {
        Ok(bytes as u64)
    } else {
        Err(format!("'{s}' is not a positive size"))
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 1]"))
    }
}

fn parse_max_error(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} is not a finite number >= 0"))
    }
}

fn parse_holdout(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not in [0, 1)"))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run calibration data through the model and save each MoE layer's routing statistics
    /// (JSON plus an .npz sidecar with mean outputs, input moments and routed samples).
    Calibrate {
        /// The ONNX model.
        input: PathBuf,
        #[command(flatten)]
        calib: CalibArgs,
        /// Where to write the statistics (JSON; the sidecar goes beside it as .npz).
        #[arg(short, long)]
        output: PathBuf,
        /// What to collect: every statistic (any method, compression), or routing only
        /// (frequencies, routing weights, router-logit similarity and the routed-input
        /// samples: enough for m-smoe, average and prune-frequency; no expert runs outside
        /// the model's own).
        #[arg(long, value_enum, default_value_t = Collect::All)]
        collect: Collect,
    },
    /// A language model's held-out next-token perplexity and top-1 accuracy.
    Eval {
        /// The ONNX model (token ids in, [batch, seq, vocab] logits out).
        input: PathBuf,
        /// Evaluation inputs: .npz with input_ids (and attention_mask, position_ids).
        #[arg(long)]
        data: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Samples per runtime call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Runtime: auto (tract, else onnxruntime), tract, ort.
        #[arg(long, value_enum, default_value_t = crate::calib::Runtime::Auto)]
        runtime: crate::calib::Runtime,
        /// onnxruntime execution provider.
        #[arg(long, value_enum, default_value_t = crate::runtime::Ep::Cpu)]
        ort_ep: crate::runtime::Ep,
    },
    /// Render a saved `--report` JSON file as one self-contained HTML page with figures.
    Report {
        /// The report (JSON written by --report).
        input: PathBuf,
        /// Where to write the HTML page.
        #[arg(long, value_name = "FILE.html")]
        html: PathBuf,
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

/// Writes the report files of a run whose model is already written: each in full, then all
/// committed. On any failure the model (`model_files`: the model and its data) and every
/// report already committed are removed: never a model without its reports.
fn commit_reports(
    files: Vec<(crate::fsutil::AtomicFile, crate::Result<Vec<u8>>)>,
    model_files: &[&std::path::Path],
) -> crate::Result<()> {
    let mut ready = Vec::with_capacity(files.len());
    let mut failed = None;
    for (mut f, bytes) in files {
        let written = bytes.and_then(|b| {
            std::io::Write::write_all(f.file(), &b).map_err(|e| crate::Error::io(f.target(), e))
        });
        match written {
            Ok(()) => ready.push(f),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let mut committed: Vec<PathBuf> = vec![];
    if failed.is_none() {
        for f in ready {
            let target = f.target().to_path_buf();
            match f.commit() {
                Ok(()) => committed.push(target),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
    }
    let Some(e) = failed else { return Ok(()) };
    for p in model_files
        .iter()
        .copied()
        .chain(committed.iter().map(PathBuf::as_path))
    {
        let _ = std::fs::remove_file(p);
    }
    Err(e)
}

/// Parses a command line (`args[0]` is the program name).
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(global_flags_after_subcommand(
        args.into_iter().map(Into::into).collect(),
    ))
}

/// `smoe-opt -q report …`: the global flags (`-q`, `-v`…) given before a subcommand are
/// moved after its name. (The main job's arguments conflict with subcommands, so clap
/// would otherwise read the subcommand's name as the input model.)
fn global_flags_after_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let is_global = |a: &std::ffi::OsString| {
        a.to_str().is_some_and(|a| {
            a == "--quiet"
                || a == "--verbose"
                || (a.len() > 1
                    && a.starts_with('-')
                    && !a.starts_with("--")
                    && a[1..].chars().all(|c| c == 'q' || c == 'v'))
        })
    };
    let globals = args.iter().skip(1).take_while(|a| is_global(a)).count();
    let sub = args.get(1 + globals).and_then(|a| a.to_str());
    let command = <Cli as clap::CommandFactory>::command();
    let is_subcommand =
        |s: &str| s == "help" || command.get_subcommands().any(|c| c.get_name() == s);
    if globals > 0 && sub.is_some_and(is_subcommand) {
        let flags: Vec<_> = args.drain(1..1 + globals).collect();
        args.splice(2..2, flags);
    }
    args
}

impl Cli {
    /// `-q`: only errors on stderr.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// `-v` count.
    pub fn verbose(&self) -> u8 {
        self.verbose
    }
}

/// The error's message as the command line prints it: the chain of causes, each said once
/// (an I/O error's text is already part of the message naming its file).
pub fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

/// The library error behind `e`, if there is one.
pub fn library_error(e: &anyhow::Error) -> Option<&crate::Error> {
    e.downcast_ref::<crate::Error>()
}

/// The exit code of a failed run: 2 for a usage error (flags, data or statistics that do
/// not fit the model; see [`crate::Error::exit_code`]), 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    library_error(e).map_or(1, crate::Error::exit_code)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    match cli.command {
        Some(Command::Inspect {
            input,
            json,
            explain,
        }) => {
            let spin = crate::progress::spinner(progress, "loading");
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
        Some(Command::Report { input, html }) => {
            crate::fsutil::check_distinct(&[("--html", &html)], &[("report", &input)])?;
            let page = crate::html_report::render_file(&input)?;
            crate::fsutil::write_atomic(&html, page.as_bytes())?;
            if !cli.quiet {
                eprintln!("smoe-opt: wrote {}", html.display());
            }
            Ok(())
        }
        Some(Command::Eval {
            input,
            data,
            json,
            batch,
            runtime,
            ort_ep,
        }) => {
            #[cfg(not(feature = "ort"))]
            let _ = ort_ep;
            let model = Model::load(&input)?;
            let inputs = crate::calib::load_inputs(&model, &crate::calib::Source::Npz(data))?;
            let r = crate::eval::evaluate(
                &model,
                &inputs,
                runtime,
                #[cfg(feature = "ort")]
                ort_ep,
                batch,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: perplexity {:.4}, top-1 {:.4} over {} predictions in {} samples ({})",
                    input.display(),
                    r.perplexity,
                    r.top1,
                    r.predictions,
                    r.samples,
                    r.runtime
                );
            }
            Ok(())
        }
        Some(Command::Calibrate {
            input,
            calib,
            output,
            collect,
        }) => {
            let side = output.with_extension("npz");
            let mut ins: Vec<(&str, &std::path::Path)> = vec![("input model", &input)];
            ins.extend(calib.input_files());
            crate::fsutil::check_distinct(
                &[("-o", &output), ("the statistics' .npz sidecar", &side)],
                &ins,
            )?;
            let model = Model::load(&input)?;
            for f in model.external_files() {
                crate::fsutil::check_distinct(
                    &[("-o", &output), ("the statistics' .npz sidecar", &side)],
                    &[("model's external data", &f.path)],
                )?;
            }
            let det = crate::moe::detect(&model.graph);
            for d in &det.diagnostics {
                log::warn!("{d}");
            }
            let source = calib.source().ok_or_else(|| {
                crate::Error::Usage(
                    "give calibration data: --calib FILE.npz, --calib-text FILE --tokenizer tokenizer.json, \
                     --calib-random N, or --data-free"
                        .into(),
                )
            })?;
            let mut opts = calib.options(source, progress);
            if collect == Collect::Routing {
                opts.stats =
                    crate::calib::stats::StatsConfig::routing_only(calib.reservoir, calib.seed);
            }
            let stats = crate::calib::calibrate(&model, &det, &opts)?;
            let side = crate::calib::save(&stats, &output)?;
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
            let (Some(input), Some(output)) = (cli.run.input.clone(), cli.run.output.clone())
            else {
                return Err(crate::Error::Usage(
                    "an input model and -o OUTPUT are required".into(),
                )
                .into());
            };
            let a = &cli.run;
            let budget = match (a.experts, a.keep) {
                (Some(0), _) => {
                    return Err(crate::Error::Usage("--experts must be at least 1".into()).into())
                }
                (Some(m), _) => Some(crate::merge::Budget::Experts(m)),
                (None, Some(f)) => Some(crate::merge::Budget::Keep(f)),
                (None, None) => None,
            };
            let target = match (a.target_size, a.target_bytes) {
                (Some(f), _) => Some(crate::compress::TargetSize::Fraction(f)),
                (None, Some(b)) => Some(crate::compress::TargetSize::Bytes(b)),
                (None, None) => None,
            };
            let method = match (a.method, &budget, &target) {
                (None, Some(_), _) | (None, None, Some(_)) => Some(pipeline::Method::MSmoe),
                (m, _, _) => m,
            };
            if method == Some(pipeline::Method::None) && (budget.is_some() || target.is_some()) {
                return Err(crate::Error::Usage(
                    "--method none re-emits the experts unchanged: it takes no --keep, --experts \
                     or --target-size"
                        .into(),
                )
                .into());
            }
            if a.pipeline == crate::sequential::Pipeline::Sequential && target.is_none() {
                return Err(crate::Error::Usage(
                    "--pipeline sequential refits a compression plan layer by layer: it needs \
                     --target-size or --target-bytes"
                        .into(),
                )
                .into());
            }
            let merge_method = method.and_then(pipeline::Method::reduction);
            let reduce = match (merge_method, budget, target) {
                (Some(m), budget, target) if budget.is_some() || target.is_some() => {
                    let source = a.calib.source();
                    Some(crate::reduce::ReduceOptions {
                        method: m,
                        align: a.align,
                        grouping: a.grouping,
                        budget,
                        compress: target.map(|target| crate::compress::CompressOptions {
                            family: a.compress.unwrap_or(crate::compress::Family::Auto),
                            target,
                            merge: None,
                            layers: None,
                            progress,
                            layer_weights: None,
                        }),
                        layers: a.layers.as_ref().map(|l| l.0.clone()),
                        stats: a.stats.clone(),
                        // Per-expert input moments (N·H² float64 per layer) are read by
                        // compression only, every expert's output on every token by
                        // output-based grouping only (hc-smoe, also among the auto planner's
                        // alternatives), REAP by prune-reap only: a run does not collect
                        // what it does not read.
                        calib: source.map(|s| {
                            let mut o = a.calib.options(s, progress);
                            o.stats.moments = target.is_some();
                            // (`auto` compares output-grouped merges too; a fixed family
                            // does not read the outputs)
                            let auto = a
                                .compress
                                .is_none_or(|f| f == crate::compress::Family::Auto);
                            o.stats.outputs = (target.is_some() && auto)
                                || m == crate::merge::MergeMethod::HcSmoe
                                || a.grouping == Some(crate::merge::Grouping::Outputs);
                            // Experts run in calibration only for what reads their outputs.
                            o.stats.reap = m == crate::merge::MergeMethod::PruneReap;
                            o
                        }),
                        eval_data: a.eval_data.clone(),
                        holdout: a.holdout,
                        max_error: a.max_error,
                        runtime: a.calib.runtime,
                        #[cfg(feature = "ort")]
                        ep: a.calib.ort_ep,
                        batch: a.calib.batch as usize,
                        emit: a.emit,
                        pipeline: a.pipeline,
                        memory_limit: a.memory_limit,
                    })
                }
                (Some(m), _, _) => {
                    return Err(crate::Error::Usage(format!(
                        "--method {} needs --experts M, --keep F or --target-size F",
                        serde_json::to_value(m)?.as_str().unwrap_or("?")
                    ))
                    .into())
                }
                (None, _, _) => None,
            };
            if a.dry_run {
                let req = crate::dry_run::DryRunRequest {
                    input: &input,
                    budget,
                    target,
                    layers: a.layers.as_ref().map(|l| l.0.as_slice()),
                    reservoir: a.calib.reservoir,
                    stats_file: a.stats.is_some(),
                    source: a.calib.source(),
                    pipeline: a.pipeline,
                    memory_limit: a.memory_limit,
                };
                print!("{}", crate::dry_run::dry_run(&req)?);
                return Ok(());
            }
            let opts = pipeline::PipelineOptions {
                save: crate::onnx::SaveOptions {
                    external_data: a.external_data,
                    progress,
                    ..Default::default()
                },
                method,
                emit: a.emit,
                reduce,
            };
            // Nothing the run writes may be something it reads, or each other.
            let mut outs: Vec<(&str, &std::path::Path)> = vec![("-o", &output)];
            if let Some(r) = &a.report {
                outs.push(("--report", r));
            }
            if let Some(r) = &a.report_html {
                outs.push(("--report-html", r));
            }
            let mut ins: Vec<(&str, &std::path::Path)> = vec![("input model", &input)];
            ins.extend(a.calib.input_files());
            let stats_side = a.stats.as_ref().map(|s| s.with_extension("npz"));
            for (flag, p) in [
                ("--stats", a.stats.as_deref()),
                ("--stats sidecar", stats_side.as_deref()),
                ("--eval-data", a.eval_data.as_deref()),
            ] {
                if let Some(p) = p {
                    ins.push((flag, p));
                }
            }
            crate::fsutil::check_distinct(&outs, &ins)?;
            // The report's temporary file is made first (a report that cannot be written
            // fails the run before any work); it is committed after the model, and a failed
            // commit removes the model again: never a model without its report.
            let report_file = a
                .report
                .as_deref()
                .map(crate::fsutil::AtomicFile::create)
                .transpose()?;
            let html_file = a
                .report_html
                .as_deref()
                .map(crate::fsutil::AtomicFile::create)
                .transpose()?;
            let report = pipeline::run(&input, &output, &opts)?;
            let mut files = vec![];
            if let Some(f) = report_file {
                let json = serde_json::to_vec_pretty(&report).map_err(|e| crate::Error::Write {
                    path: f.target().to_path_buf(),
                    reason: format!("serialising the report: {e}"),
                });
                files.push((f, json));
            }
            if let Some(f) = html_file {
                let page = crate::html_report::render_report(&report).map(String::into_bytes);
                files.push((f, page));
            }
            let written: Vec<&std::path::Path> = std::iter::once(output.as_path())
                .chain(report.saved.data_path.as_deref())
                .collect();
            commit_reports(files, &written)?;
            if !cli.quiet && report.reduce.is_some() {
                eprint!("{}", report.to_text());
            }
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
