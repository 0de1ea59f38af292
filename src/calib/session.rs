//! A calibration session that survives what exported graphs do to runtimes: it opens the
//! instrumented model in the chosen runtime and, when a batch fails, continues in
//! onnxruntime (`--runtime auto`, tract having failed), then through smoe-opt's exact,
//! portable re-emission of the MoE blocks (tract cannot run Switch's boolean-mask reshapes;
//! shape-specialised exports fail on inputs whose routing differs from the export input's —
//! which is what every later layer sees once earlier layers are rewritten).
use super::{instrument, CalibOptions, Runtime};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::{Detection, MoeBlock};
use crate::runtime::{Session, Value};

/// An instrumented model in a runtime, with its fallbacks.
pub(crate) struct Resilient<'a> {
    model: &'a Model,
    /// The blocks re-emitted when the exported graph fails (those present in `model`).
    reemit: &'a Detection,
    /// The blocks whose inputs and router logits are read.
    watched: Vec<&'a MoeBlock>,
    opts: &'a CalibOptions,
    /// The instrumented model as exported (reopened in onnxruntime when tract fails).
    #[cfg_attr(not(feature = "ort"), allow(dead_code))]
    inst: Model,
    session: Box<dyn Session>,
    logits: Vec<String>,
    switched: bool,
    /// Whether the watched tensors are the only outputs (statistics need nothing else).
    only: bool,
    #[cfg(feature = "ort")]
    tried_ort: bool,
}

impl<'a> Resilient<'a> {
    /// Opens `model` with `watched`'s inputs and router logits as outputs; `reemit` holds
    /// the blocks of `model` to re-emit if the graph as it is cannot run.
    pub fn open(
        model: &'a Model,
        reemit: &'a Detection,
        watched: Vec<&'a MoeBlock>,
        opts: &'a CalibOptions,
    ) -> Result<Self> {
        Self::open_with(model, reemit, watched, opts, false)
    }

    /// [`Resilient::open`] whose runs return the watched blocks' inputs and router logits
    /// only: the model's own outputs, and the nodes only they need, are left out.
    pub fn open_for_stats(
        model: &'a Model,
        reemit: &'a Detection,
        watched: Vec<&'a MoeBlock>,
        opts: &'a CalibOptions,
    ) -> Result<Self> {
        Self::open_with(model, reemit, watched, opts, true)
    }

    fn open_with(
        model: &'a Model,
        reemit: &'a Detection,
        watched: Vec<&'a MoeBlock>,
        opts: &'a CalibOptions,
        only: bool,
    ) -> Result<Self> {
        let original: Vec<String> = watched.iter().map(|b| b.router.logits.clone()).collect();
        let inst = instrument(model, &watched, &original, only)?;
        let (session, logits, switched) = match crate::runtime::open(
            &inst,
            opts.runtime,
            #[cfg(feature = "ort")]
            opts.ep,
        ) {
            Ok(s) => {
                log::info!("calibrating with {}", s.runtime());
                (s, original, false)
            }
            Err(e) if opts.runtime != Runtime::Ort => {
                log::info!(
                    "the exported graph cannot be run ({e}); calibrating through smoe-opt's \
                     exact re-emission"
                );
                let (s, l) = reemitted(model, reemit, &watched, opts, false, only)
                    .map_err(|e2| super::tract_cannot(opts.runtime, &e, &e2))?;
                (s, l, true)
            }
            Err(e) => return Err(e),
        };
        Ok(Resilient {
            model,
            reemit,
            watched,
            opts,
            inst,
            session,
            logits,
            switched,
            only,
            #[cfg(feature = "ort")]
            tried_ort: false,
        })
    }

    /// The runtime in use.
    pub fn runtime(&self) -> &str {
        self.session.runtime()
    }

    /// Whether the blocks were re-emitted because the graph as it is failed.
    pub fn reemitted(&self) -> bool {
        self.switched
    }

    /// The router-logit output names of the watched blocks, in their order (they change
    /// when the blocks are re-emitted).
    pub fn logits(&self) -> &[String] {
        &self.logits
    }

    /// Runs one batch, falling back as the module says; `what` names the batch in messages.
    pub fn run(&mut self, feed: &[(String, Value)], what: &str) -> Result<Vec<(String, Value)>> {
        loop {
            let e = match self.session.run(feed) {
                Ok(o) => return Ok(o),
                Err(e) => e,
            };
            #[cfg(feature = "ort")]
            if !self.tried_ort
                && !self.switched
                && self.opts.runtime == Runtime::Auto
                && self.session.runtime() == "tract"
                && crate::runtime::ort_available()
            {
                self.tried_ort = true;
                log::info!("tract failed on {what} ({e}); continuing with onnxruntime");
                self.session = Box::new(crate::runtime::ort::OrtSession::from_model(
                    &self.inst,
                    self.opts.ep,
                )?);
                continue;
            }
            if self.switched {
                return Err(e);
            }
            self.switched = true;
            log::info!(
                "the exported graph failed on {what} ({e}); continuing through smoe-opt's \
                 exact re-emission"
            );
            let ort = self.session.runtime() == "onnxruntime";
            (self.session, self.logits) = reemitted(
                self.model,
                self.reemit,
                &self.watched,
                self.opts,
                ort,
                self.only,
            )?;
        }
    }
}

/// `model` with `reemit`'s blocks re-emitted exactly and `watched` instrumented, opened in
/// onnxruntime (`ort`) or tract; with the watched blocks' router-logit names in it.
#[cfg_attr(not(feature = "ort"), allow(unused_variables))]
fn reemitted(
    model: &Model,
    reemit: &Detection,
    watched: &[&MoeBlock],
    opts: &CalibOptions,
    ort: bool,
    only: bool,
) -> Result<(Box<dyn Session>, Vec<String>)> {
    let mut re = model.clone();
    let rw = crate::emit::reemit(&mut re, reemit, crate::emit::EmitForm::Portable)?;
    let logits: Vec<String> = watched
        .iter()
        .map(|b| {
            match reemit
                .blocks
                .iter()
                .zip(&rw)
                .find(|(x, _)| x.name == b.name)
            {
                // Not among the re-emitted blocks (e.g. already written by smoe-opt): its
                // logits keep their name.
                None => Ok(b.router.logits.clone()),
                Some((_, r)) => r.logits.clone().ok_or_else(|| Error::Graph {
                    node: Some(r.block.clone()),
                    reason: "the block was not re-emitted with its router logits".into(),
                }),
            }
        })
        .collect::<Result<_>>()?;
    let rt = if ort { Runtime::Ort } else { Runtime::Tract };
    let session = crate::runtime::open_in(
        &instrument(&re, watched, &logits, only)?,
        rt,
        #[cfg(feature = "ort")]
        opts.ep,
    )?;
    Ok((session, logits))
}
